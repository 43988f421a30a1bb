"""The model bundle: the five models ActAvatar runs, as one object, and every way to store and load it.

Why one module: the pipeline, the export command, training and the nodes' tests all need the bundle, and both
storage formats (ActAvatar's model folder and the five ComfyUI single files) load into it; keeping them here means no
module that uses the bundle has to import another that does.

Model folder (:func:`save_model_folder` / :func:`load_model_folder`): diffusers/transformers ``save_pretrained``
folders plus the ActAvatar weights file and an ``actavatar_model.json`` index (an index may instead point at five
single files, ``layout: comfyui-files``, which is how the bundled mini model ships).

Single files (:func:`export_comfyui_files` / :func:`load_comfyui_files`): the five files ComfyUI users put in their
``models/`` folders, in the community layouts that :mod:`actavatar_core.loading` reads (and that ComfyUI's own files
use):

| file | layout |
|---|---|
| ``diffusion_models/{name}_transformer.safetensors`` | original Wan keys behind ``model.diffusion_model.``, the base transformer only |
| ``vae/{name}_vae.safetensors`` | original Wan2.2 VAE keys (``wan2.2_vae.safetensors``) |
| ``text_encoders/{name}_umt5.safetensors`` | ComfyUI's umT5 keys + the ``spiece_model`` uint8 tensor (the tokenizer) |
| ``audio_encoders/{name}_wav2vec2.safetensors`` | ComfyUI's wav2vec2 keys |
| ``actavatar/{name}.safetensors`` | ActAvatar adapter weights (``save_actavatar_weights``) |

What the layouts cannot express (a head split that breaks Wan's 128-wide convention, the VAE's trained latent
stats, umT5's relative-position range, wav2vec2's head count and ``do_normalize``) goes into each file's safetensors
metadata (:mod:`actavatar_core.convert.settings`), which the loaders read back. Round trip: :func:`load_comfyui_files`
on the written files gives models whose generation equals the original's (exported with ``dtype=None``/fp32).
Key renames are the inverses of the loaders' (diffusers' own converter for the transformer), each verified by a
round trip before anything is written. Every file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ActAvatarError, OutputPathError, WeightsError

__all__ = ["ActAvatarModels", "MODEL_INDEX", "save_model_folder", "load_model_folder", "tiny_models",
           "export_comfyui_files", "export_paths", "load_comfyui_files", "COMFY_FOLDERS", "EXPORT_DTYPES"]

#: Files of a model folder in ActAvatar's own layout (the bundled mini model uses it).
MODEL_INDEX = "actavatar_model.json"


@dataclass
class ActAvatarModels:
    """The five models one generation needs, plus the audio encoder's settings and free-form info (name, generation
    defaults, the SentencePiece model bytes when known)."""

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


#: Which ComfyUI ``models/`` sub-folder each file goes to, and the suffix after ``{name}``.
COMFY_FOLDERS: dict[str, tuple[str, str]] = {
    "transformer": ("diffusion_models", "_transformer"),
    "vae": ("vae", "_vae"),
    "text_encoder": ("text_encoders", "_umt5"),
    "audio_encoder": ("audio_encoders", "_wav2vec2"),
    "actavatar": ("actavatar", ""),
}
#: ``--dtype`` choices of the command.
EXPORT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
#: ComfyUI's prefix in front of diffusion-model keys (files saved from a whole ComfyUI model carry it).
COMFY_PREFIX = "model.diffusion_model."
EXPORTED_BY = "actavatar export"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")


# ---------------------------------------------------------------------------------------------- paths
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith("."):
        raise OutputPathError(f"'{name}' is not usable as a model file name.",
                              "Use letters, digits, '.', '_' and '-' only (e.g. actavatar_mini), no folders.")
    return name


def export_paths(folder: "str | os.PathLike[str]", name: str = "actavatar_mini") -> dict[str, Path]:
    """Where :func:`export_comfyui_files` writes (and :func:`load_comfyui_files` reads) each file."""
    folder = Path(folder)
    name = _check_name(name)
    return {part: folder / sub / f"{name}{suffix}.safetensors" for part, (sub, suffix) in COMFY_FOLDERS.items()}


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous()


# ---------------------------------------------------------------------------------------------- tokenizer
def spiece_bytes(models: Any) -> bytes:
    """The SentencePiece model bytes for the umT5 file: ``models.info["spiece_model"]``, else the ``spiece.model``
    the tokenizer was saved (and loaded) with."""
    data = (models.info or {}).get("spiece_model")
    if isinstance(data, (bytes, bytearray)) and data:
        return bytes(data)
    tok = models.tokenizer
    candidates = []
    vocab_file = getattr(tok, "vocab_file", None)
    if isinstance(vocab_file, str) and vocab_file:
        candidates.append(Path(vocab_file))
    source = getattr(tok, "name_or_path", None)
    if isinstance(source, str) and source:
        candidates.append(Path(source) / "spiece.model")
    for c in candidates:
        if c.is_file() and c.suffix == ".model":
            return c.read_bytes()
    raise WeightsError(
        "The tokenizer has no SentencePiece model to store in the umT5 file (ComfyUI's umT5 files carry the "
        "tokenizer as a 'spiece_model' tensor): models.info has no 'spiece_model' and the tokenizer was not "
        "loaded from a folder with a spiece.model.",
        "Export a model trained by ActAvatar's recipe (its folder has tokenizer/spiece.model), or put the "
        "SentencePiece model bytes in models.info['spiece_model'].")


def _check_tokenizer(data: bytes, tokenizer: Any) -> None:
    """Refuse a SentencePiece model that does not tokenize like the model's tokenizer: the exported umT5 file would
    silently give other token ids."""
    from .convert.spm import build_tokenizer
    from .text import DEFAULT_NEGATIVE

    rebuilt = build_tokenizer(data, source="the SentencePiece model to export")
    probes = ("Phase 1 [0s-2.5s]: A person talks to the camera and raises the left hand.", DEFAULT_NEGATIVE)
    for text in probes:
        want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        got = list(rebuilt(text, add_special_tokens=False)["input_ids"])
        if want != got:
            raise WeightsError("The SentencePiece model to export does not tokenize like the model's tokenizer "
                               f"(e.g. '{text[:40]}...'), so the exported text encoder would see other tokens.",
                               "Put the SentencePiece model the tokenizer was built from in "
                               "models.info['spiece_model'].")


# ---------------------------------------------------------------------------------------------- the parts
def _transformer_renames(transformer: Any) -> dict[str, str]:
    """{model key: key in the file} of the base transformer (adapter keys excluded), verified."""
    from .convert import wan_transformer as wt
    from .model import is_adapter_key

    keys = [k for k in transformer.state_dict() if not is_adapter_key(k)]
    peft = [k for k in keys if ".base_layer." in k or ".lora_" in k]
    if peft:
        raise WeightsError(f"The transformer carries LoRA layers ({peft[0]} ...), which the ComfyUI layout has no "
                           "place for.", "Merge the LoRA into the weights (merge_and_unload) before exporting.")
    try:
        return {k: COMFY_PREFIX + o for k, o in wt.original_rename_map(keys).items()}
    except ValueError as exc:
        raise WeightsError(f"The transformer cannot be written in the original Wan layout: {exc}.",
                           "Export a plain Wan2.2 TI2V transformer (with the ActAvatar adapter).") from None


def _vae_renames(vae: Any) -> dict[str, str]:
    from .convert import wan_vae as vae_conv

    try:
        return vae_conv.original22_rename_map(vae.state_dict())
    except ValueError as exc:
        raise WeightsError(f"The VAE cannot be written in the original Wan2.2 layout: {exc}.",
                           "Export a Wan2.2 VAE (diffusers AutoencoderKLWan with is_residual=True).") from None


def _transformer_file(transformer: Any, renames: dict[str, str], dtype: torch.dtype | None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .convert import wan_transformer as wt
    from .convert.settings import settings_metadata

    state = transformer.state_dict()
    tensors = {new: _cast(state[k], dtype) for k, new in renames.items()}
    config = transformer.base_config() if hasattr(transformer, "base_config") else dict(transformer.config)
    return tensors, {**settings_metadata(wt.MODEL_CLASS, config), "exported_by": EXPORTED_BY}


def _vae_file(vae: Any, renames: dict[str, str], dtype: torch.dtype | None
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .convert import wan_vae as vae_conv
    from .convert.settings import settings_metadata

    state = vae.state_dict()
    tensors = {new: _cast(state[k], dtype) for k, new in renames.items()}
    return tensors, {**settings_metadata(vae_conv.MODEL_CLASS, dict(vae.config)), "exported_by": EXPORTED_BY}


def _umt5_file(text_encoder: Any, spm: bytes, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .convert import umt5 as umt5_conv
    from .convert.settings import settings_metadata

    state = text_encoder.state_dict()
    if "shared.weight" not in state:
        raise WeightsError("The text encoder has no 'shared.weight' embedding; it is not a umT5 encoder.",
                           "Export a transformers UMT5EncoderModel.")
    # ComfyUI's T5 has no tied encoder.embed_tokens copy; everything else keeps transformers' names.
    tensors = {k: _cast(v, dtype) for k, v in state.items() if umt5_conv.model_key(k) == k}
    tensors[umt5_conv.TOKENIZER_KEY] = torch.frombuffer(bytearray(spm), dtype=torch.uint8)
    return tensors, {**settings_metadata(umt5_conv.MODEL_CLASS, text_encoder.config.to_dict()),
                     "exported_by": EXPORTED_BY}


def _wav2vec2_renames(audio_encoder: Any) -> dict[str, str]:
    from .convert import wav2vec2 as w2v_conv

    if getattr(audio_encoder.config, "add_adapter", False):
        raise WeightsError("The audio encoder has a wav2vec2 adapter stack, which ComfyUI's layout has no place for.",
                           "Export a plain Wav2Vec2Model.")
    renames: dict[str, str] = {}
    for k in audio_encoder.state_dict():
        # ComfyUI stores the positional conv's weight norm with the parametrization names (older torch: weight_g/v).
        new = k.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        new = new.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        if w2v_conv.model_key(new) != new:
            raise WeightsError(f"The audio encoder has a tensor '{k}' that is not part of wav2vec2's encoder.",
                               "Export a plain Wav2Vec2Model (no CTC or pre-training head).")
        renames[k] = new
    return renames


def _wav2vec2_file(audio_encoder: Any, renames: dict[str, str], do_normalize: bool, dtype: torch.dtype | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .convert import wav2vec2 as w2v_conv
    from .convert.settings import settings_metadata

    state = audio_encoder.state_dict()
    tensors = {new: _cast(state[k], dtype) for k, new in renames.items()}
    meta = {**settings_metadata(w2v_conv.MODEL_CLASS, audio_encoder.config.to_dict()),
            w2v_conv.DO_NORMALIZE_KEY: "true" if do_normalize else "false", "exported_by": EXPORTED_BY}
    return tensors, meta


# ---------------------------------------------------------------------------------------------- export / load
def export_comfyui_files(models: ActAvatarModels, folder: "str | os.PathLike[str]", *, name: str = "actavatar_mini",
                         dtype: torch.dtype | None = torch.float16, overwrite: bool = False) -> dict[str, Path]:
    """Write ``models`` (an :class:`ActAvatarModels`) as the five ComfyUI model files under
    ``folder`` (a ComfyUI ``models/`` folder or any folder laid out like one). Returns {part: path}.

    ``dtype``: what floating tensors are stored as (fp16 like ComfyUI's releases; None keeps each tensor's own,
    which is what an exact round trip needs). Everything that can be refused (an existing file without
    ``overwrite``, a missing SentencePiece model, a layout the files cannot hold) is refused before anything is
    written.
    """
    from .model import ActAvatarTransformer, save_actavatar_weights

    paths = export_paths(folder, name)
    if dtype is not None and not dtype.is_floating_point:
        raise ActAvatarError(f"dtype {dtype} is not a floating dtype.", "Use torch.float16, torch.float32 or None.")
    if not isinstance(models.transformer, ActAvatarTransformer):
        raise WeightsError("The transformer is not an ActAvatarTransformer, so there are no ActAvatar weights to "
                           "export.", "Export models loaded or trained by ActAvatar.")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputPathError(f"{existing[0]} already exists{more}.",
                              "Pick another --name or --out, or pass overwrite=True (--overwrite).")
    spm = spiece_bytes(models)
    _check_tokenizer(spm, models.tokenizer)
    do_normalize = bool((models.audio_config or {}).get("do_normalize", True))
    # Every rename first (cheap, names only): a layout problem must not leave half an export behind.
    transformer_renames = _transformer_renames(models.transformer)
    vae_renames = _vae_renames(models.vae)
    audio_renames = _wav2vec2_renames(models.audio_encoder)
    writers = [
        ("transformer", lambda: _transformer_file(models.transformer, transformer_renames, dtype)),
        ("vae", lambda: _vae_file(models.vae, vae_renames, dtype)),
        ("text_encoder", lambda: _umt5_file(models.text_encoder, spm, dtype)),
        ("audio_encoder", lambda: _wav2vec2_file(models.audio_encoder, audio_renames, do_normalize, dtype)),
    ]
    for part, build in writers:
        tensors, metadata = build()
        _save_atomic(paths[part], tensors, metadata)
        del tensors
    save_actavatar_weights(models.transformer, paths["actavatar"], contents="adapter", dtype=dtype,
                           extra_metadata={"exported_by": EXPORTED_BY})
    return paths


def load_comfyui_files(source: "dict[str, str | os.PathLike[str]] | str | os.PathLike[str]", *,
                       name: str = "actavatar_mini", dtype: torch.dtype | None = None,
                       device: "str | torch.device" = "cpu") -> ActAvatarModels:
    """The :class:`ActAvatarModels` of five exported files, loaded with the community-file
    loaders (what the ComfyUI nodes do): ``source`` is the dict :func:`export_comfyui_files` returned, or the folder
    it wrote into (with ``name``)."""
    from . import loading
    from .convert import umt5 as umt5_conv
    from .convert.spm import spm_bytes_from_tensor
    from .convert.source import TensorSource
    from .model import build_from_weights

    paths = {k: Path(v) for k, v in source.items()} if isinstance(source, dict) else export_paths(source, name)
    base = loading.load_wan_transformer(paths["transformer"], dtype=dtype, device=device, require_ti2v=True)
    transformer = build_from_weights(base, paths["actavatar"]).to(device).eval()
    vae = loading.load_wan_vae(paths["vae"], dtype=dtype, device=device)
    text_encoder, tokenizer = loading.load_umt5(paths["text_encoder"], dtype=dtype, device=device)
    audio_encoder, audio_info = loading.load_wav2vec2(paths["audio_encoder"], dtype=dtype, device=device)
    with TensorSource(paths["text_encoder"]) as src:
        spm = spm_bytes_from_tensor(src.get(umt5_conv.TOKENIZER_KEY)) if umt5_conv.TOKENIZER_KEY in src else None
    info: dict[str, Any] = {"name": Path(paths["actavatar"]).stem}
    if spm:
        info["spiece_model"] = spm
    return ActAvatarModels(transformer, vae, text_encoder, tokenizer, audio_encoder,
                           {"do_normalize": audio_info["do_normalize"]}, info)


# ---------------------------------------------------------------------------------------------- model folders
def save_model_folder(models: ActAvatarModels, folder: "str | os.PathLike", *, transformer_dtype: torch.dtype | None = None,
                      info: dict | None = None) -> Path:
    """Write the five models in ActAvatar's folder layout (diffusers/transformers ``save_pretrained`` folders plus
    the ActAvatar weights file), e.g. for the bundled mini model."""
    from safetensors.torch import save_file

    from .model import is_adapter_key, save_actavatar_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = models.transformer
    base_sd = base.state_dict()

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
    single files of :func:`export_comfyui_files`. All local files; nothing is downloaded."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel, Wav2Vec2Model

    from .model import build_from_weights

    folder = Path(folder)
    from .loading import check_model_folder

    index = check_model_folder(folder)  # every weights file safe to open (a pickled .bin is refused, with why)
    if index.get("layout") == "comfyui-files":  # the five single files ComfyUI users keep (the bundled mini model)
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
