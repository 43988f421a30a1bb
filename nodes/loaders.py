"""Loader nodes: the model files users already have (ComfyUI/community single files) -> ActAvatar models.

Every loader reads its file with ``actavatar_core.loading`` onto the offload device (RAM), and hands the module to
ComfyUI's model management (:func:`comfy_bridge.manage`), which moves it to the GPU when a node uses it and frees
or offloads it when memory is needed. Re-queueing never reloads: ComfyUI caches the loader's output as long as
the inputs and the file (``fingerprint_inputs``: path, size, modification time) are unchanged.
"""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from . import comfy_bridge as bridge
from .model_folders import default_choice
from .values import AudioEncoder, AudioEncoderType, LoadedModel, Model, TextEncoder, TextEncoderType, Vae

log = logging.getLogger("ActAvatar")

PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
DEVICES = list(bridge.PLACEMENTS)
_PRECISION_TIP = ("Compute precision. auto: float32 on the CPU; on a GPU ComfyUI's choice for the diffusion model "
                  "(bf16 where supported) and bf16/fp16 for the others.")
_DEVICE_TIP = ("auto: ComfyUI's device (the GPU, or the CPU with --cpu); the model stays loaded until ComfyUI needs the "
               "memory. offload_after_use: move it back to RAM as soon as the node is done (less VRAM, slower "
               "re-runs). cpu: always run on the CPU.")


def _combo(name: str, folder: str, tooltip: str, extra: list[str] | None = None) -> io.Combo.Input:
    """A picker of a model folder's files (the bundled mini model's file first choice)."""
    names = (extra or []) + bridge.filename_list(folder)
    default = default_choice(folder, [n for n in names if n not in (extra or [])])
    if extra and default is None:
        default = extra[0]
    return io.Combo.Input(name, options=names, default=default, tooltip=tooltip)


def _precision() -> io.Combo.Input:
    return io.Combo.Input("precision", options=PRECISIONS, default="auto", tooltip=_PRECISION_TIP)


def _device() -> io.Combo.Input:
    return io.Combo.Input("device", options=DEVICES, default="auto", tooltip=_DEVICE_TIP)


def file_signature(folder: str, name: str) -> str:
    """Stable while the file is unchanged (so ComfyUI's cache keeps the loaded model), different after it changed."""
    if name == "none":
        return "none"
    try:
        path = bridge.full_path(folder, name)
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except Exception:  # noqa: BLE001 - a missing file is reported by the loader itself
        return f"missing|{name}"


class ActAvatarModelLoader(io.ComfyNode):
    """The Wan2.2 TI2V-5B diffusion model (the user's file) plus the ActAvatar weights (audio adapter + phase
    embeddings) -> ACTAVATAR_MODEL."""

    REQUIRES = ("diffusers", "transformers", "safetensors")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarModelLoader", display_name="ActAvatar Model Loader", category="ActAvatar/loaders",
            description=("Loads the Wan2.2 TI2V-5B diffusion model from models/diffusion_models (e.g. "
                         "wan2.2_ti2v_5B_fp16.safetensors) and the ActAvatar weights from models/actavatar."),
            inputs=[
                _combo("model_name", "diffusion_models", "The Wan2.2 TI2V-5B diffusion model (models/diffusion_models)."),
                _combo("actavatar_weights", "actavatar", "ActAvatar weights (models/actavatar): the audio adapter and "
                       "phase embeddings. 'none' gives an untrained adapter (no lip sync).", ["none"]),
                _precision(), _device(),
            ],
            outputs=[Model.Output(display_name="model")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str, actavatar_weights: str, precision: str = "auto",
                           device: str = "auto") -> str:
        return file_signature("diffusion_models", model_name) + "&" + file_signature("actavatar", actavatar_weights)

    @classmethod
    def execute(cls, model_name: str, actavatar_weights: str, precision: str = "auto",
                device: str = "auto") -> io.NodeOutput:
        from actavatar_core.loading import load_wan_transformer
        from actavatar_core.model import build_from_weights

        path = bridge.full_path("diffusion_models", model_name)
        weights = None if actavatar_weights == "none" else bridge.full_path("actavatar", actavatar_weights)
        load_device, offload_device = bridge.devices("diffusion", device)
        dtype = bridge.resolve_dtype(precision, "diffusion", load_device)
        base = load_wan_transformer(path, dtype=dtype, device=offload_device, require_ti2v=True)
        model = build_from_weights(base, weights).eval()
        if weights is None:
            log.warning("ActAvatar: no ActAvatar weights picked; the audio adapter is untrained (no lip sync).")
        managed = bridge.manage(model, "diffusion", device, name=model_name)
        return io.NodeOutput(LoadedModel(managed, path, {"weights": weights, "dtype": str(dtype)}))


class ActAvatarTextEncoderLoader(io.ComfyNode):
    """umT5-XXL (ComfyUI's umt5_xxl_fp16 / fp8_scaled files carry their tokenizer) -> ACTAVATAR_TEXT_ENCODER."""

    REQUIRES = ("transformers", "safetensors", "tokenizers")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarTextEncoderLoader", display_name="ActAvatar Text Encoder Loader",
            category="ActAvatar/loaders",
            description=("Loads the umT5-XXL text encoder from models/text_encoders (e.g. "
                         "umt5_xxl_fp8_e4m3fn_scaled.safetensors)."),
            inputs=[
                _combo("text_encoder_name", "text_encoders", "umT5-XXL (models/text_encoders), the file ComfyUI's Wan "
                       "workflows use; its tokenizer is read from the file."),
                _precision(), _device(),
            ],
            outputs=[TextEncoderType.Output(display_name="text_encoder")],
        )

    @classmethod
    def fingerprint_inputs(cls, text_encoder_name: str, precision: str = "auto", device: str = "auto") -> str:
        return file_signature("text_encoders", text_encoder_name)

    @classmethod
    def execute(cls, text_encoder_name: str, precision: str = "auto", device: str = "auto") -> io.NodeOutput:
        from actavatar_core.loading import load_umt5

        path = bridge.full_path("text_encoders", text_encoder_name)
        load_device, offload_device = bridge.devices("text", device)
        dtype = bridge.resolve_dtype(precision, "text", load_device)
        model, tokenizer = load_umt5(path, dtype=dtype, device=offload_device)
        managed = bridge.manage(model, "text", device, name=text_encoder_name)
        return io.NodeOutput(TextEncoder(managed, path, {"dtype": str(dtype)}, tokenizer=tokenizer))


class ActAvatarVAELoader(io.ComfyNode):
    """The Wan2.2 VAE (48 latent channels; wan2.2_vae.safetensors) -> ACTAVATAR_VAE."""

    REQUIRES = ("diffusers", "safetensors")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarVAELoader", display_name="ActAvatar VAE Loader", category="ActAvatar/loaders",
            description=("Loads the Wan2.2 VAE from models/vae (wan2.2_vae.safetensors; the 14B models' Wan2.1 VAE "
                         "does not fit)."),
            inputs=[_combo("vae_name", "vae", "The Wan2.2 VAE (models/vae), wan2.2_vae.safetensors."),
                    _precision(), _device()],
            outputs=[Vae.Output(display_name="vae")],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name: str, precision: str = "auto", device: str = "auto") -> str:
        return file_signature("vae", vae_name)

    @classmethod
    def execute(cls, vae_name: str, precision: str = "auto", device: str = "auto") -> io.NodeOutput:
        from actavatar_core.loading import load_wan_vae

        path = bridge.full_path("vae", vae_name)
        load_device, offload_device = bridge.devices("vae", device)
        dtype = bridge.resolve_dtype(precision, "vae", load_device)
        model = load_wan_vae(path, dtype=dtype, device=offload_device)
        managed = bridge.manage(model, "vae", device, name=vae_name)
        return io.NodeOutput(LoadedModel(managed, path, {"dtype": str(dtype)}))


class ActAvatarAudioEncoderLoader(io.ComfyNode):
    """wav2vec2 (ComfyUI's audio_encoders files, e.g. wav2vec2_large_english_fp16) -> ACTAVATAR_AUDIO_ENCODER."""

    REQUIRES = ("transformers", "safetensors")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarAudioEncoderLoader", display_name="ActAvatar Audio Encoder Loader",
            category="ActAvatar/loaders",
            description=("Loads a wav2vec2 audio encoder from models/audio_encoders (e.g. "
                         "wav2vec2_large_english_fp16.safetensors)."),
            inputs=[
                _combo("audio_encoder_name", "audio_encoders", "wav2vec2 (models/audio_encoders); use the one the "
                       "ActAvatar weights were trained with (wav2vec2 large for the release)."),
                _precision(), _device(),
            ],
            outputs=[AudioEncoderType.Output(display_name="audio_encoder")],
        )

    @classmethod
    def fingerprint_inputs(cls, audio_encoder_name: str, precision: str = "auto", device: str = "auto") -> str:
        return file_signature("audio_encoders", audio_encoder_name)

    @classmethod
    def execute(cls, audio_encoder_name: str, precision: str = "auto", device: str = "auto") -> io.NodeOutput:
        from actavatar_core.loading import load_wav2vec2

        path = bridge.full_path("audio_encoders", audio_encoder_name)
        load_device, offload_device = bridge.devices("audio", device)
        dtype = bridge.resolve_dtype(precision, "audio", load_device)
        model, config = load_wav2vec2(path, dtype=dtype, device=offload_device)
        managed = bridge.manage(model, "audio", device, name=audio_encoder_name)
        return io.NodeOutput(AudioEncoder(managed, path, dict(config), do_normalize=bool(config.get("do_normalize", True))))
