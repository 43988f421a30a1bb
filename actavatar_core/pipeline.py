"""One call from (reference image, speech, phase script) to video frames or an MP4 file.

``ActAvatarPipeline`` holds the five models (transformer, VAE, umT5 + tokenizer, wav2vec2) and runs: validate
inputs -> encode prompt and audio -> encode the reference image -> sample -> decode (streamed) -> write the MP4.
The ComfyUI nodes call the same steps one by one, so both paths share every line of math.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .audio import AudioEmbedding, encode_audio
from .errors import PhaseScriptError
from .model import compute_dtype
from .phases import DEFAULT_FPS, PhaseScript, latent_frame_count
from .sampling import Conditioning, SamplingOptions, StepInfo, build_routing, cancel_check, sample
from .text import DEFAULT_NEGATIVE, EncodedPrompt, encode_plain, encode_script
from .vae import check_size, decode_latents, decode_stream, encode_reference
from .video import Mp4Writer, load_image

#: Files of a model folder in ActAvatar's own layout (the bundled mini model uses it).
MODEL_INDEX = "actavatar_model.json"


@dataclass
class ActAvatarModels:
    transformer: Any  # ActAvatarTransformer
    vae: Any  # AutoencoderKLWan
    text_encoder: Any  # UMT5EncoderModel
    tokenizer: Any
    audio_encoder: Any  # Wav2Vec2Model
    audio_config: dict = field(default_factory=lambda: {"do_normalize": True})
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device


@dataclass
class GenerationRequest:
    """Everything a user chooses for one clip."""

    image: Any
    audio: Any
    phases: Any  # PhaseScript, JSON string/dict or compact text
    width: int = 704
    height: int = 1280
    fps: float = DEFAULT_FPS
    num_frames: int | None = None  # None: follow the audio
    negative: str | None = None  # None: the script's negative prompt, else Wan's default
    options: SamplingOptions = field(default_factory=SamplingOptions)
    phased_prompt: bool = True  # False: the flat 'global prompt' ablation (no time anchors, no block ids)
    decode_chunk: int = 4


@dataclass
class PreparedInputs:
    script: PhaseScript
    prompt: EncodedPrompt
    negative: EncodedPrompt
    audio: AudioEmbedding
    first_latent: torch.Tensor
    num_frames: int
    num_latent_frames: int


def prepare(models: ActAvatarModels, request: GenerationRequest) -> PreparedInputs:
    """Validate every input (before any heavy work) and encode prompt, audio and reference image."""
    script = PhaseScript.parse(request.phases)
    script.validate(duration=None, fps=request.fps)  # structure first: fail before any model runs
    check_size(request.width, request.height, size_step(models))
    image = load_image(request.image)
    request.options.check()
    audio = encode_audio(models.audio_encoder, request.audio, fps=request.fps, num_frames=request.num_frames,
                         do_normalize=models.audio_config.get("do_normalize", True),
                         window=models.transformer.config.audio_window)
    script.validate(duration=audio.duration, fps=request.fps)
    if len(script.phases) > models.transformer.config.max_phases:
        raise PhaseScriptError(f"This model was trained with at most {models.transformer.config.max_phases} phases.",
                               "Use fewer phases.")
    dtype = compute_dtype(models.transformer)
    prompt = encode_script(models.text_encoder, models.tokenizer, script, phased=request.phased_prompt, dtype=dtype)
    negative_text = request.negative if request.negative is not None else (script.negative or DEFAULT_NEGATIVE)
    negative = encode_plain(models.text_encoder, models.tokenizer, negative_text, dtype=dtype)
    first_latent = encode_reference(models.vae, image, request.width, request.height)
    return PreparedInputs(script, prompt, negative, audio, first_latent, audio.num_frames,
                          latent_frame_count(audio.num_frames))


def size_step(models: ActAvatarModels) -> int:
    """Pixels per transformer token side: VAE spatial stride x patch (32 for Wan2.2-5B: 16 x 2; the mini: 8 x 4)."""
    return int(models.vae.config.scale_factor_spatial) * int(models.transformer.config.patch_size[1])


def conditioning(prepared: PreparedInputs, fps: float, feather: float = 0.0) -> Conditioning:
    routing = build_routing(prepared.script, prepared.prompt.block_ids, prepared.num_latent_frames, fps, feather)
    return Conditioning(text=prepared.prompt.embeds, phase_ids=prepared.prompt.block_ids,
                        negative=prepared.negative.embeds, audio=prepared.audio.features, routing=routing)


@dataclass
class GenerationResult:
    latents: torch.Tensor
    audio: AudioEmbedding
    fps: float
    script: PhaseScript
    frames: np.ndarray | None = None
    path: Path | None = None


class ActAvatarPipeline:
    def __init__(self, models: ActAvatarModels):
        self.models = models

    def generate_latents(self, request: GenerationRequest, *, on_step: Callable[[StepInfo], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> GenerationResult:
        prepared = prepare(self.models, request)
        cond = conditioning(prepared, request.fps, request.options.feather)
        latents = sample(self.models.transformer, cond, prepared.first_latent, prepared.num_latent_frames,
                         request.options, on_step=on_step, check_cancel=cancel_check(cancel))
        return GenerationResult(latents, prepared.audio, request.fps, prepared.script)

    def generate(self, request: GenerationRequest, **kwargs: Any) -> GenerationResult:
        """Frames in memory (uint8 (T, H, W, 3))."""
        result = self.generate_latents(request, **kwargs)
        result.frames = decode_latents(self.models.vae, result.latents, request.decode_chunk,
                                       cancel_check(kwargs.get("cancel")))
        return result

    def generate_to_file(self, request: GenerationRequest, out: "str | os.PathLike", *, overwrite: bool = False,
                         metadata: dict | None = None, **kwargs: Any) -> GenerationResult:
        """Sample, then decode chunk by chunk straight into an MP4 (written atomically: a failure or a cancel
        leaves no file)."""
        from .video import atomic_target

        atomic_target(out, overwrite=overwrite)  # refuse a bad target before spending minutes on sampling
        result = self.generate_latents(request, **kwargs)
        wave = result.audio.waveform
        meta = {"actavatar": {"phases": result.script.to_json(), "fps": request.fps, "seed": request.options.seed,
                              "steps": request.options.steps, "paca_mode": request.options.paca_mode}}
        meta.update(metadata or {})
        with Mp4Writer(out, request.fps, request.width, request.height, audio=wave.samples.numpy()[None],
                       sample_rate=wave.sample_rate, metadata=meta, overwrite=overwrite) as writer:
            for chunk in decode_stream(self.models.vae, result.latents, request.decode_chunk, cancel_check(kwargs.get("cancel"))):
                writer.add(chunk)
            result.path = writer.close()
        return result


# ---------------------------------------------------------------------------------------------- model folders
def save_model_folder(models: ActAvatarModels, folder: "str | os.PathLike", *, transformer_dtype: torch.dtype | None = None,
                      info: dict | None = None) -> Path:
    """Write the five models in ActAvatar's folder layout (diffusers/transformers ``save_pretrained`` folders plus
    the ActAvatar weights file), e.g. for the bundled mini model."""
    from .model import save_actavatar_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = models.transformer
    base_sd = {k: v for k, v in base.state_dict().items()}
    from .model import is_adapter_key
    from safetensors.torch import save_file

    (folder / "transformer").mkdir(exist_ok=True)
    base_config = base.base_config()
    base_config["_class_name"] = "WanTransformer3DModel"
    (folder / "transformer" / "config.json").write_text(json.dumps(base_config, indent=2))
    save_file({k: (v.to(transformer_dtype) if transformer_dtype and v.is_floating_point() else v).contiguous()
               for k, v in base_sd.items() if not is_adapter_key(k)},
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_actavatar_weights(base, folder / "actavatar.safetensors", dtype=transformer_dtype)
    models.vae.save_pretrained(folder / "vae", safe_serialization=True)
    models.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    models.tokenizer.save_pretrained(folder / "tokenizer")
    models.audio_encoder.save_pretrained(folder / "audio_encoder", safe_serialization=True)
    index = {"format": "actavatar-model", "version": 1, "audio_config": models.audio_config, "info": info or models.info}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2))
    return folder


def load_model_folder(folder: "str | os.PathLike", *, device: Any = "cpu", dtype: torch.dtype | None = None) -> ActAvatarModels:
    """Load a folder written by :func:`save_model_folder`, or an index (``layout: comfyui-files``) over the five
    single files of :func:`~actavatar_core.export.export_comfyui_files`. All local files; nothing is downloaded."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel, Wav2Vec2Model

    from .errors import WeightsError
    from .model import build_from_weights

    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    if not index_path.is_file():
        raise WeightsError(f"'{folder}' is not an ActAvatar model folder (no {MODEL_INDEX}).",
                           "Point --model-dir at a folder written by ActAvatar (e.g. the bundled mini model).")
    index = json.loads(index_path.read_text())
    if index.get("layout") == "comfyui-files":  # the five single files ComfyUI users keep (the bundled mini model)
        from .export import load_comfyui_files

        models = load_comfyui_files(folder / index.get("files", "comfyui"), name=index["name"], dtype=dtype, device=device)
        models.info.update(index.get("info", {}))
        return models
    base = WanTransformer3DModel.from_pretrained(folder / "transformer", local_files_only=True, torch_dtype=dtype)
    transformer = build_from_weights(base, folder / "actavatar.safetensors").to(device).eval()
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", local_files_only=True).to(device).eval()
    text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    audio_encoder = Wav2Vec2Model.from_pretrained(folder / "audio_encoder", local_files_only=True).to(device).eval()
    return ActAvatarModels(transformer, vae, text_encoder, tokenizer, audio_encoder,
                           index.get("audio_config", {"do_normalize": True}), index.get("info", {}))


def tiny_models(seed: int = 0, device: Any = "cpu") -> ActAvatarModels:
    """Randomly initialised tiny models of the real classes: the smoke run, and tests. Their output is noise-like."""
    from .model import ActAvatarTransformer
    from .tiny import TINY_UMT5, TINY_WAV2VEC2, tiny_audio_encoder, tiny_text_encoder, tiny_tokenizer, tiny_vae, tiny_wan_transformer

    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), seed=seed)
    audio_encoder = tiny_audio_encoder(seed=seed)
    base = tiny_wan_transformer(seed=seed, text_dim=TINY_UMT5["d_model"])
    torch.manual_seed(seed)
    transformer = ActAvatarTransformer.from_base(base, audio_feature_dim=TINY_WAV2VEC2["hidden_size"],
                                                 audio_num_layers=TINY_WAV2VEC2["num_hidden_layers"] + 1)
    vae = tiny_vae(seed=seed)
    models = ActAvatarModels(transformer.to(device), vae.to(device), text_encoder.to(device), tokenizer,
                             audio_encoder.to(device), {"do_normalize": True}, {"name": "tiny-random (smoke run)"})
    return models
