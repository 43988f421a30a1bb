"""Loading the model files users actually have: ComfyUI/community single files and diffusers/HF folders.

Every loader works offline: configs come from the file's shapes (or a local JSON in ``actavatar_core/configs``
when the shapes are the full-size models'), tokenizers from the user's file or folder; nothing asks a hub.

The common path of every loader:

1. open the file lazily (:class:`~actavatar_core.convert.source.TensorSource`) and *identify* it from key names
   and shapes; a file of the wrong kind is refused with what it looks like and what was expected;
2. work out the renames (file key -> model key) and the config;
3. build the model on the ``meta`` device (no memory), then read, dequantise, cast and rename one tensor at a time
   and hand the result to ``load_state_dict(assign=True)``, so a 10 GB file never exists twice in memory;
4. refuse missing keys (listing a few) and unexpected ones; rebuild non-persistent buffers (Wan's RoPE tables).

Public API: :func:`read_state_dict`, :func:`identify_checkpoint`, :func:`load_wan_transformer`,
:func:`load_wan_vae`, :func:`load_umt5`, :func:`load_wav2vec2` (+ :class:`CheckpointInfo`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .convert import quant
from .convert import umt5 as umt5_conv
from .convert import wan_transformer as wt
from .convert import wan_vae as vae_conv
from .convert import wav2vec2 as w2v_conv
from .convert.identify import KINDS, CheckpointInfo, identify
from .convert.settings import read_settings
from .convert.source import FP8_DTYPES, TensorSource, read_json, weight_files
from .errors import WeightsError

__all__ = ["CheckpointInfo", "KINDS", "read_state_dict", "identify_checkpoint", "load_wan_transformer",
           "load_wan_vae", "load_umt5", "load_wav2vec2", "CONFIG_DIR", "local_config", "check_weights_file",
           "check_model_folder"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: What each loader expects, for the "wrong kind of file" message: (what, fix).
_EXPECTED = {
    "wan_transformer": ("the Wan2.2 TI2V-5B transformer",
                        "Pick wan2.2_ti2v_5B_fp16.safetensors in models/diffusion_models (or a diffusers folder of "
                        "Wan-AI/Wan2.2-TI2V-5B-Diffusers)."),
    "wan22_vae": ("the Wan2.2 VAE", "The 5B model needs the Wan2.2 VAE, wan2.2_vae.safetensors, in models/vae."),
    "umt5": ("the umT5-XXL text encoder",
             "Pick umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors in models/text_encoders."),
    "wav2vec2": ("a wav2vec2 audio encoder",
                 "Pick wav2vec2_large_english_fp16.safetensors (or wav2vec2-chinese-base_fp16.safetensors) in "
                 "models/audio_encoders."),
}


# ================================================================================================ reading
def read_state_dict(path: "str | os.PathLike[str]", device: "str | torch.device" = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a weights file (or of a model folder's shards) as a dict, on ``device``.

    ``.safetensors`` is read with safetensors; ``.pt/.pth/.bin/.ckpt`` only with ``torch.load(weights_only=True)``
    (a file that needs pickled objects or code is refused); anything else is refused. Errors are
    :class:`WeightsError` with the problem and the fix.
    """
    with TensorSource(path) as src:
        return {k: src.get(k).to(device) for k in src.keys()}


#: The parts of an ActAvatar model folder in the diffusers/transformers layout (``save_model_folder``).
MODEL_FOLDER_PARTS = ("transformer", "vae", "text_encoder", "audio_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf")


def check_weights_file(path: "str | os.PathLike[str]") -> None:
    """Refuse a weights file that cannot be loaded safely, before any library opens it: safetensors must parse
    (header and size; no tensor is read), torch files must load with ``weights_only=True`` (memory-mapped, so a
    pickle is refused without reading the tensors), other formats are refused with the reason."""
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise WeightsError(f"'{path.name}' is a Python pickle, which ActAvatar never loads.",
                           "Use the .safetensors release of this model.")
    with TensorSource(path):
        pass


def check_model_folder(folder: "str | os.PathLike[str]") -> dict[str, Any]:
    """Check an ActAvatar model folder without loading it and return its index (``actavatar_model.json``).

    Every weights file it holds (either layout: the diffusers/transformers sub-folders, or the exported single
    files of ``layout: comfyui-files``) must be one ActAvatar reads safely (:func:`check_weights_file`), so a
    pickled ``.bin`` is refused with the reason instead of reaching a library loader."""
    folder = Path(folder)
    fix = "Point --model-dir at a folder written by ActAvatar (e.g. the bundled mini model, or 'actavatar export')."
    if not folder.exists():
        raise WeightsError(f"The model folder '{folder}' does not exist.", fix)
    if not folder.is_dir():
        raise WeightsError(f"'{folder}' is a file, not a model folder.", fix)
    index_path = folder / "actavatar_model.json"
    if not index_path.is_file():
        raise WeightsError(f"'{folder}' is not an ActAvatar model folder (no actavatar_model.json).", fix)
    index = read_json(index_path)
    if not isinstance(index, dict) or index.get("format", "actavatar-model") != "actavatar-model":
        raise WeightsError(f"'{index_path}' is not an ActAvatar model index.", fix)
    if index.get("layout") == "comfyui-files":
        files = folder / str(index.get("files", "comfyui"))
        weights = sorted(p for p in files.rglob("*") if p.suffix.lower() in _WEIGHT_SUFFIXES) if files.is_dir() else []
        if not weights:
            raise WeightsError(f"The model folder '{folder}' lists its files in '{files.name}/', which holds no "
                               "weights file.", "Export the model again with 'actavatar export'.")
    else:
        weights = []
        for part in MODEL_FOLDER_PARTS:
            sub = folder / part
            if not sub.is_dir():
                raise WeightsError(f"The model folder '{folder}' has no {part}/ folder.",
                                   "Copy the whole model folder (transformer, vae, text_encoder, tokenizer, "
                                   "audio_encoder and actavatar.safetensors).")
            present = sorted(p for p in sub.iterdir() if p.suffix.lower() in _WEIGHT_SUFFIXES)
            for path in present:
                check_weights_file(path)  # part by part, so the first unsafe file is named, not a later gap
            weights += [p for p in weight_files(sub) if p not in present]  # shards an index lists elsewhere
        weights.append(folder / "actavatar.safetensors")
    for path in weights:
        check_weights_file(path)
    return index


def identify_checkpoint(sd_or_path: "dict[str, torch.Tensor] | str | os.PathLike[str]") -> CheckpointInfo:
    """What a state dict, weights file or model folder looks like (kind, key layout, description, key facts).

    Reads only names, shapes and dtypes (plus a few bytes of quantisation metadata), never the tensors of a file.
    """
    if isinstance(sd_or_path, dict):
        sd = sd_or_path
        metas = {k: (tuple(v.shape), v.dtype) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        plan = quant.plan(metas, lambda k: metas[k][1], None, lambda k: sd[k], "the state dict")
        return identify(metas, None, quant_style=plan.style)
    path = Path(sd_or_path)
    if path.is_dir() and (path / "model_index.json").exists() and not _has_weights(path):
        index = read_json(path / "model_index.json")
        parts = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list))
        return CheckpointInfo("unknown", "diffusers", f"a diffusers pipeline folder ({', '.join(parts)})",
                              {"components": parts, "pipeline": index.get("_class_name")}, path=str(path))
    with TensorSource(path) as src:
        info = _identify_source(src)
    info.path = str(path)
    return info


def _identify_source(src: TensorSource) -> CheckpointInfo:
    metas = src.metas()
    plan = quant.plan(metas, lambda k: metas[k][1], src.metadata, src.get, f"'{src.path.name}'")
    return identify(metas, src.metadata, quant_style=plan.style)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.safetensors.index.json"))


def _model_folder(path: Path, subfolder: str) -> Path | None:
    """For a folder: the model folder itself, or its ``subfolder`` (a diffusers pipeline root)."""
    if not path.is_dir():
        return None
    if not _has_weights(path) and (path / subfolder).is_dir():
        return path / subfolder
    return path


def _expect(info: CheckpointInfo, kind: str, name: str) -> None:
    if info.kind == kind:
        return
    what, fix = _EXPECTED[kind]
    if kind == "wan22_vae" and info.kind == "wan21_vae":
        raise WeightsError(f"'{name}' looks like {info.description}; the 5B model needs the Wan2.2 VAE "
                           "(48 latent channels).",
                           "Pick wan2.2_vae.safetensors in models/vae (wan_2.1_vae.safetensors is for the 14B models).")
    raise WeightsError(f"'{name}' looks like {info.description}, but {what} was expected.", fix)


def local_config(name: str) -> dict[str, Any]:
    """A JSON config from ``actavatar_core/configs`` (keys starting with ``_`` are notes/extras)."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _use_full_size(inferred: dict[str, Any], name: str, keys: Iterable[str]) -> dict[str, Any]:
    """The local full-size config when the file's shapes are those of the full-size model, else ``inferred``."""
    full = local_config(name)
    if all(_same(inferred.get(k), full.get(k)) for k in keys):
        return {**inferred, **_public(full)}
    return inferred


# ================================================================================================ building
def _dtype_policy(dtype: torch.dtype | None, stored: str | None) -> torch.dtype:
    """The target dtype: the caller's, else the file's own (fp8 files compute in bfloat16)."""
    if dtype is not None:
        return dtype
    if stored is None:
        return torch.float32
    d = getattr(torch, stored, torch.float32)
    if d in FP8_DTYPES:
        return torch.bfloat16
    return d if d.is_floating_point else torch.float32


def _keep_fp32(cls: type, dtype: torch.dtype, library: str) -> Callable[[str], bool]:
    """Which parameters stay float32 at a half dtype, following each library's own ``_keep_in_fp32_modules`` rule
    (diffusers: fp16 and bf16; transformers: fp16 only)."""
    modules = list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    active = dtype in ((torch.float16, torch.bfloat16) if library == "diffusers" else (torch.float16,))
    if not modules or not active:
        return lambda name: False
    return lambda name: any(m in name.split(".") for m in modules)


def _on_meta(factory: Callable[[], torch.nn.Module], name: str = "the file") -> torch.nn.Module:
    """Build a model without allocating its weights (they are assigned from the file afterwards). A config that
    cannot build one (a damaged config.json, odd metadata) is a WeightsError, not the library's traceback."""
    try:
        with torch.device("meta"):
            return factory()
    except WeightsError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as exc:
        raise _bad_config(name, exc) from None


def _bad_config(name: str, exc: BaseException) -> WeightsError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WeightsError(f"The config of '{name}' does not describe a model that can be built ({text[:200]}).",
                        "Re-download the model folder (its config.json), or use the original single file.")


def _short_list(items: Iterable[str], n: int = 5) -> str:
    items = sorted(items)
    head = ", ".join(items[:n])
    return head + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _stream_into(model: torch.nn.Module, src: TensorSource, renames: dict[str, str], *, dtype: torch.dtype,
                 device: "str | torch.device", keep_fp32: Callable[[str], bool], name: str,
                 required: set[str] | None = None, optional: Iterable[str] = (),
                 derived: dict[str, Callable[[], torch.Tensor]] | None = None) -> list[str]:
    """Read ``renames`` ({model key: file key}) into ``model`` tensor by tensor. Returns missing optional keys.

    ``required``: model keys the file must provide (default: all of the model's state-dict keys except
    ``optional``); ``derived``: model keys computed from other tensors (e.g. a weight norm split).
    """
    plan = quant.plan(src.keys(), src.dtype, src.metadata, src.get, f"'{name}'")
    renames = {new: old for new, old in renames.items() if old not in plan.drop}
    expected = set(model.state_dict().keys())
    optional = set(optional)
    derived = derived or {}
    required = (expected - optional) if required is None else set(required)
    provided = set(renames) | set(derived)
    unexpected = provided - expected
    if unexpected:
        raise WeightsError(
            f"'{name}' has {len(unexpected)} tensor(s) this model does not have ({_short_list(unexpected)}); "
            "it is probably a different variant or a damaged conversion.",
            "Use the original release of the file (see the model file table in docs/METHOD.md).")
    missing = required - provided
    if missing:
        raise WeightsError(f"'{name}' is missing {len(missing)} tensor(s) the model needs ({_short_list(missing)}).",
                           "Re-download the file; it is incomplete or was saved from a different model.")
    state: dict[str, torch.Tensor] = {}
    for new, old in renames.items():
        tensor = src.get(old)
        target = torch.float32 if keep_fp32(new) else dtype
        if old in plan.scale_keys:
            tensor = quant.dequantize(tensor, src.get(plan.scale_keys[old]), target)
        elif tensor.is_floating_point() or tensor.dtype in FP8_DTYPES:
            tensor = tensor.to(target)
        state[new] = _aligned(tensor.to(device))
        del tensor
    for new, fn in derived.items():
        t = fn()
        state[new] = t.to(device=device, dtype=torch.float32 if keep_fp32(new) else dtype)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln][:3]
        raise WeightsError(f"'{name}' does not fit the model its keys describe ({'; '.join(lines) or exc}).",
                           "The file is damaged or a variant ActAvatar does not know; use the original release.") from None
    del state
    return sorted(optional - provided)


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in storage aligned like any freshly allocated tensor (64 bytes).

    Why: safetensors hands out CPU tensors at odd offsets, and CPU kernels take other vectorised paths (other
    rounding, and slower) on unaligned weights, so a loaded model would differ in the last bits from the same model
    built in memory. The copy is one tensor at a time, so the "never two full copies" rule holds.
    """
    if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % 64:
        return tensor.clone()
    return tensor


def _rebuild_meta_buffers(model: torch.nn.Module, device: "str | torch.device") -> None:
    """Non-persistent buffers (Wan's RoPE tables) are computed in ``__init__``; rebuild them for real."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg = model.config
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, WanRotaryPosEmbed) and any(b.is_meta for b in child.buffers()):
                with torch.device(device):
                    rope = WanRotaryPosEmbed(cfg.attention_head_dim, tuple(cfg.patch_size), cfg.rope_max_seq_len)
                setattr(parent, child_name, rope)


def _materialise_extras(model: torch.nn.Module, device: "str | torch.device", dtype: torch.dtype,
                        keep_fp32: Callable[[str], bool]) -> None:
    """Give parameters the file does not hold (a subclass's added modules) real storage and initial values.

    The subclass decides how: ``materialise_extra_weights(device, dtype)``
    when it has one (ActAvatarTransformer does); otherwise each owning module gets ``to_empty`` +
    ``reset_parameters()``, and parameters of modules without one are zero-initialised.
    """
    if not any(p.is_meta for p in model.parameters()):
        return
    device = torch.device(device)
    hook = getattr(model, "materialise_extra_weights", None)
    if callable(hook):
        hook(device, dtype)
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_meta]
        if not own:
            continue
        module.to_empty(device=device, recurse=False)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for n, _ in own:
                torch.nn.init.zeros_(getattr(module, n))
        for n, p in module.named_parameters(recurse=False):
            full = f"{name}.{n}" if name else n
            p.data = p.data.to(torch.float32 if keep_fp32(full) else dtype)


def _check_no_meta(model: torch.nn.Module, what: str) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: {what} still has tensors without data after loading: {_short_list(left)}")


# ================================================================================================ transformer
def _diffusers_init_keys(cls: type) -> set[str]:
    import inspect

    keys: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            keys |= set(inspect.signature(init).parameters) - {"self", "args", "kwargs"}
    return keys


def load_wan_transformer(path: "str | os.PathLike[str]", *, dtype: torch.dtype | None = None,
                         device: "str | torch.device" = "cpu", cls: type | None = None,
                         config: dict[str, Any] | None = None, require_ti2v: bool = False):
    """A diffusers ``WanTransformer3DModel`` (or ``cls``, a subclass) from a Wan transformer file or folder.

    Accepts a diffusers folder (``config.json`` + safetensors shards, or a pipeline folder with ``transformer/``),
    or a single file with original Wan keys (with or without ``model.diffusion_model.``; ComfyUI's
    ``wan2.2_ti2v_5B_fp16.safetensors``, fp8-scaled files too) or diffusers keys. The config comes from the folder's
    ``config.json`` or from the shapes (heads of 128, Wan's convention; TI2V-5B shapes use
    ``configs/wan22_ti2v_5b_transformer.json``), where the file's metadata records them (files written by
    ``actavatar export``: ``model_config``, see :mod:`actavatar_core.convert.settings`) the head split, ``eps`` and
    ``rope_max_seq_len`` come from there; ``config`` overrides entries (e.g. ``num_attention_heads`` for a width that
    is not a multiple of 128, or a subclass's own options).

    With ``cls``, the base weights must all be in the file; the subclass's added parameters are initialised by its
    ``materialise_extra_weights(device, dtype)`` hook (else ``reset_parameters``).
    ``dtype`` None keeps the file's dtype (fp8 -> bfloat16); ``_keep_in_fp32_modules`` stay float32 at half dtypes.
    ``require_ti2v`` refuses a Wan transformer without 48 latent channels (Wan2.1/14B).
    """
    from diffusers import WanTransformer3DModel

    path = Path(path)
    cls = cls or WanTransformer3DModel
    if not (isinstance(cls, type) and issubclass(cls, WanTransformer3DModel)):
        raise TypeError(f"cls must be a subclass of diffusers.WanTransformer3DModel, not {cls!r}")
    folder = _model_folder(path, "transformer")
    with TensorSource(folder or path) as src:
        name = path.name
        info = _identify_source(src)
        _expect(info, "wan_transformer", name)
        if info.facts.get("variant"):
            raise WeightsError(f"'{name}' looks like {info.description}; ActAvatar builds on the plain Wan2.2 TI2V-5B "
                               "transformer, which has none of its extra modules.", _EXPECTED["wan_transformer"][1])
        if require_ti2v and not info.facts.get("ti2v"):
            raise WeightsError(f"'{name}' looks like {info.description}; ActAvatar needs the Wan2.2 TI2V-5B "
                               "transformer (48 latent channels, Wan2.2 VAE).", _EXPECTED["wan_transformer"][1])
        prefix = info.prefix
        bare = [k[len(prefix):] for k in src.keys() if k.startswith(prefix)]
        layout = wt.layout_of(bare)
        dim = int(info.facts["dim"])
        if folder is not None and (folder / "config.json").exists():
            cfg = {k: v for k, v in read_json(folder / "config.json").items() if not k.startswith("_")}
        else:
            cfg = _use_full_size(info.config, "wan22_ti2v_5b_transformer",
                                 ("patch_size", "in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim",
                                  "num_layers", "num_attention_heads", "image_dim"))
            cfg.update(read_settings(src.metadata, wt.MODEL_CLASS, wt.FILE_SETTINGS, f"'{name}'"))
        cfg = wt.apply_overrides(cfg, config, dim)
        if not cfg.get("num_attention_heads") or not cfg.get("attention_head_dim"):
            raise WeightsError(f"'{name}' has width {dim}, not a multiple of 128, so its attention head count cannot "
                               "be read from the file.",
                               "Pass config={'num_attention_heads': N}, or load a diffusers folder with its config.json.")
        if cfg["num_attention_heads"] * cfg["attention_head_dim"] != dim:
            raise WeightsError(f"'{name}' has width {dim}, but the config says {cfg['num_attention_heads']} heads x "
                               f"{cfg['attention_head_dim']}.", "Fix the config (heads x head size must equal the width).")
        try:
            cfg["patch_size"] = tuple(cfg["patch_size"])
        except TypeError as exc:
            raise _bad_config(name, exc) from None
        target = _dtype_policy(dtype, info.dtype)
        init_keys = _diffusers_init_keys(cls)
        model = _on_meta(lambda: cls(**{k: v for k, v in cfg.items() if k in init_keys}), name)
        if cls is WanTransformer3DModel:
            required = None
        else:
            base_cfg = {k: v for k, v in cfg.items() if k in _diffusers_init_keys(WanTransformer3DModel)}
            required = set(_on_meta(lambda: WanTransformer3DModel(**base_cfg), name).state_dict().keys())
        renames = wt.rename_map(src.keys(), layout, prefix)
        keep = _keep_fp32(cls, target, "diffusers")
        _stream_into(model, src, renames, dtype=target, device=device, keep_fp32=keep, name=name, required=required,
                     optional=set(model.state_dict().keys()) - required if required is not None else ())
    _rebuild_meta_buffers(model, device)
    _materialise_extras(model, device, target, keep)
    _check_no_meta(model, "the transformer")
    return model.eval()


# ================================================================================================ VAE
def load_wan_vae(path: "str | os.PathLike[str]", *, dtype: torch.dtype | None = None,
                 device: "str | torch.device" = "cpu", config: dict[str, Any] | None = None):
    """A diffusers ``AutoencoderKLWan`` (Wan2.2, 48 latent channels) from a diffusers folder or a single file.

    Single files may be in the original Wan2.2 layout (ComfyUI's ``wan2.2_vae.safetensors``; converted here, since
    diffusers' ``from_single_file`` cannot) or in diffusers keys. The config is inferred from shapes
    (``configs/wan22_vae.json``, with the latent mean/std, for the full-size VAE; tiny VAEs get mean 0 / std 1),
    except that the latent mean/std recorded in the file's metadata win (files written by ``actavatar export``:
    the original layout has no tensor for the trained stats).
    A Wan2.1 VAE (16 channels) is refused: the 5B model needs the Wan2.2 VAE.
    """
    from diffusers import AutoencoderKLWan

    path = Path(path)
    folder = _model_folder(path, "vae")
    with TensorSource(folder or path) as src:
        name = path.name
        info = _identify_source(src)
        _expect(info, "wan22_vae", name)
        prefix = info.prefix
        layout = vae_conv.layout_of({k[len(prefix):] for k in src.keys() if k.startswith(prefix)})
        renames: dict[str, str] = {}
        unknown: list[str] = []
        for k in src.keys():
            if not k.startswith(prefix):
                continue
            bare = k[len(prefix):]
            new = vae_conv.rename_original22(bare) if layout == "wan22_original" else bare
            if new is None:
                unknown.append(k)
            else:
                renames[new] = k
        if unknown:
            raise WeightsError(f"'{name}' has {len(unknown)} tensor(s) that are not part of a Wan2.2 VAE "
                               f"({_short_list(unknown)}).", _EXPECTED["wan22_vae"][1])
        if folder is not None and (folder / "config.json").exists():
            cfg = _public(read_json(folder / "config.json"))
            if int(cfg.get("z_dim", 48)) == 16:
                _expect(CheckpointInfo("wan21_vae", "diffusers", "a Wan2.1 VAE (16 latent channels)"), "wan22_vae", name)
        else:
            shapes = {new: src.shape(old) for new, old in renames.items()}
            try:
                cfg = vae_conv.infer_config(shapes, lambda k: shapes[k])
            except KeyError as exc:
                raise WeightsError(f"'{name}' is an incomplete Wan2.2 VAE (no {exc}).",
                                   "Re-download wan2.2_vae.safetensors.") from None
            cfg = _use_full_size(cfg, "wan22_vae", ("base_dim", "decoder_base_dim", "z_dim", "dim_mult",
                                                    "num_res_blocks", "temperal_downsample", "in_channels",
                                                    "out_channels"))
            cfg.update(_vae_settings(src.metadata, int(cfg["z_dim"]), name))
        cfg.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
        target = _dtype_policy(dtype, info.dtype)
        init_keys = _diffusers_init_keys(AutoencoderKLWan)
        model = _on_meta(lambda: AutoencoderKLWan(**{k: v for k, v in cfg.items() if k in init_keys}), name)
        keep = _keep_fp32(AutoencoderKLWan, target, "diffusers")
        _stream_into(model, src, renames, dtype=target, device=device, keep_fp32=keep, name=name)
    _check_no_meta(model, "the VAE")
    return model.eval()


def _vae_settings(metadata: dict[str, str], z_dim: int, name: str) -> dict[str, Any]:
    """The VAE settings recorded in the metadata, checked: one mean and one positive std per latent channel."""
    found = read_settings(metadata, vae_conv.MODEL_CLASS, vae_conv.FILE_SETTINGS, f"'{name}'")
    for key in ("latents_mean", "latents_std"):
        if key not in found:
            continue
        value = found[key]
        ok = isinstance(value, list) and len(value) == z_dim and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if ok and key == "latents_std":
            ok = all(v > 0 for v in value)
        if not ok:
            raise WeightsError(f"'{name}' records {key} in its metadata that does not fit its {z_dim} latent channels.",
                               "Re-export the VAE with 'actavatar export', or re-download it.")
        found[key] = [float(v) for v in value]
    return found


# ================================================================================================ umT5
def load_umt5(path: "str | os.PathLike[str]", *, dtype: torch.dtype | None = None,
              device: "str | torch.device" = "cpu", tokenizer: Any = None, config: dict[str, Any] | None = None):
    """``(UMT5EncoderModel, tokenizer)`` from a umT5 file or folder.

    Files: ComfyUI's ``umt5_xxl_fp16.safetensors`` and ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (dequantised:
    ``weight * scale_weight``; newer ``comfy_quant``/``weight_scale`` files too), HF encoder or encoder-decoder
    checkpoints; folders: a diffusers ``text_encoder/`` or HF model folder (``config.json`` + weights), or a
    pipeline root with ``text_encoder/`` + ``tokenizer/``.

    Tokenizer, first found: ``tokenizer`` (a tokenizer object, a folder, ``tokenizer.json`` or ``spiece.model``);
    the ``spiece_model`` tensor inside ComfyUI's file; ``spiece.model``/``tokenizer.json``/``tokenizer/`` next to
    the file (for a ``text_encoder/`` folder also ``../tokenizer/``). Otherwise a :class:`WeightsError` says where to
    get one. The config is inferred from shapes (tiny models too; ``configs/umt5_xxl.json`` for umT5-XXL); the
    relative-position range, norm epsilon and FFN activation recorded in the file's metadata win (exported files).
    """
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    folder = _model_folder(path, "text_encoder")
    with TensorSource(folder or path) as src:
        name = path.name
        info = _identify_source(src)
        _expect(info, "umt5", name)
        prefix = info.prefix
        renames: dict[str, str] = {}
        for k in src.keys():
            if k.startswith(prefix):
                mk = umt5_conv.model_key(k[len(prefix):])
                if mk is not None:
                    renames[mk] = k
        if "shared.weight" not in renames and f"{prefix}encoder.embed_tokens.weight" in src:
            renames["shared.weight"] = f"{prefix}encoder.embed_tokens.weight"
        if folder is not None and (folder / "config.json").exists():
            cfg = _public(read_json(folder / "config.json"))
        else:
            cfg = _use_full_size(info.config, "umt5_xxl", ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                                                          "num_heads", "relative_attention_num_buckets"))
            cfg.update(read_settings(src.metadata, umt5_conv.MODEL_CLASS, umt5_conv.FILE_SETTINGS, f"'{name}'"))
        cfg.update(config or {})
        cfg.pop("model_type", None)
        target = _dtype_policy(dtype, info.dtype)
        tok = _resolve_tokenizer(tokenizer, src, prefix, path, folder, name, vocab_size=int(cfg["vocab_size"]))
        model = _on_meta(lambda: UMT5EncoderModel(UMT5Config(**cfg)), name)
        keep = _keep_fp32(UMT5EncoderModel, target, "transformers")
        _stream_into(model, src, renames, dtype=target, device=device, keep_fp32=keep, name=name,
                     optional={"encoder.embed_tokens.weight"})
    model.set_input_embeddings(model.shared)
    _check_no_meta(model, "the text encoder")
    return model.eval(), tok


def _tokenizer_from_path(p: Path, vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    from .convert.spm import build_tokenizer

    if p.is_dir():
        for candidate in (p / "tokenizer.json", p / "spiece.model"):
            if candidate.exists():
                return _tokenizer_from_path(candidate, vocab_size)
        raise WeightsError(f"The tokenizer folder '{p}' has neither tokenizer.json nor spiece.model.",
                           "Use the tokenizer/ folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers, or google/umt5-xxl's spiece.model.")
    if p.suffix == ".json":
        specials: dict[str, Any] = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        cfg_file = p.parent / "tokenizer_config.json"
        if cfg_file.exists():
            tcfg = read_json(cfg_file)
            for key in ("pad_token", "eos_token", "unk_token", "bos_token"):
                value = tcfg.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    specials[key] = value
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p), model_max_length=512, **specials)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"'{p}' is not a readable tokenizer.json ({exc}).",
                               "Use the tokenizer/ folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers.") from None
        tok.padding_side = "right"
        return tok
    return build_tokenizer(p.read_bytes(), source=f"'{p.name}'")


def _resolve_tokenizer(tokenizer: Any, src: TensorSource, prefix: str, path: Path, folder: Path | None, name: str,
                       vocab_size: int):
    from .convert.spm import build_tokenizer, spm_bytes_from_tensor

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        p = Path(tokenizer)
        if not p.exists():
            raise WeightsError(f"The tokenizer path '{p}' does not exist (tokenizers are never downloaded).",
                               "Point to a tokenizer folder, tokenizer.json or spiece.model on disk.")
        tok = _tokenizer_from_path(p, vocab_size)
    else:
        tok = None
        for key in (umt5_conv.TOKENIZER_KEY, prefix + umt5_conv.TOKENIZER_KEY):
            if key in src:
                tok = build_tokenizer(spm_bytes_from_tensor(src.get(key)), source=f"the spiece_model inside '{name}'")
                break
        if tok is None:
            base = folder if folder is not None else path.parent
            candidates = [] if folder is not None else [path.with_name(path.stem + ".spiece.model")]
            candidates += [base / "tokenizer", base / "spiece.model", base / "tokenizer.json"]
            if folder is not None:
                candidates += [folder.parent / "tokenizer"]
            for c in candidates:
                if c.exists():
                    tok = _tokenizer_from_path(c, vocab_size)
                    break
        if tok is None:
            where = folder if folder is not None else path.parent
            raise WeightsError(
                f"No tokenizer for '{name}': the file has no spiece_model tensor and no tokenizer lies next to it "
                "(ActAvatar never downloads one).",
                "Use ComfyUI's umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors (they carry the "
                f"tokenizer), or put spiece.model from google/umt5-xxl into {where}/ (or the tokenizer/ folder of "
                f"Wan-AI/Wan2.2-TI2V-5B-Diffusers as {where}/tokenizer/), or pass tokenizer=<path>.")
    if len(tok) > vocab_size:
        raise WeightsError(f"The tokenizer for '{name}' has {len(tok)} tokens but the model only {vocab_size}; "
                           "they do not belong together.", "Use the umT5 tokenizer (google/umt5-xxl spiece.model).")
    if vocab_size == 256384 and len(tok) < 256000:
        raise WeightsError(f"The tokenizer for '{name}' has {len(tok)} tokens; umT5-XXL needs the 256,300-token umT5 "
                           "tokenizer (this looks like a T5 tokenizer).",
                           "Use google/umt5-xxl's spiece.model or the tokenizer/ folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers.")
    return tok


# ================================================================================================ wav2vec2
def _recorded_flag(metadata: dict[str, str], key: str, name: str) -> bool | None:
    """A "true"/"false" metadata entry (None when absent); anything else is a damaged file."""
    if key not in metadata:
        return None
    value = str(metadata[key]).strip().lower()
    if value not in ("true", "false"):
        raise WeightsError(f"'{name}' has '{key}={metadata[key]}' in its metadata; expected true or false.",
                           "Re-export the file with 'actavatar export', or re-download it.")
    return value == "true"


def load_wav2vec2(path: "str | os.PathLike[str]", *, dtype: torch.dtype | None = None,
                  device: "str | torch.device" = "cpu", config: dict[str, Any] | None = None):
    """``(Wav2Vec2Model, info)`` from ComfyUI's audio-encoder files or HF checkpoints/folders.

    ``info``: ``{"do_normalize", "sample_rate": 16000, "num_layers", "hidden_size"}``. ``do_normalize`` follows
    ComfyUI (large: True; base, i.e. chinese-wav2vec2-base: False) unless a folder's ``preprocessor_config.json``
    or the file's ``do_normalize`` metadata (exported files) says otherwise. Keys with or without ``wav2vec2.``;
    CTC/pre-training heads are ignored. The config is inferred from shapes (tiny models included; heads are 64
    wide, or 16 wide for widths that are not a multiple of 64); the head count, strides, activations, norm epsilon
    and norm placement recorded in the file's metadata win (exported files).
    """
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    path = Path(path)
    folder = _model_folder(path, "audio_encoder")
    with TensorSource(folder or path) as src:
        name = path.name
        info = _identify_source(src)
        if info.kind == "whisper":
            raise WeightsError(f"'{name}' looks like {info.description}; ActAvatar's audio features come from wav2vec2.",
                               _EXPECTED["wav2vec2"][1])
        _expect(info, "wav2vec2", name)
        prefix = info.prefix
        renames: dict[str, str] = {}
        for k in src.keys():
            if k.startswith(prefix):
                mk = w2v_conv.model_key(k[len(prefix):])
                if mk is not None:
                    renames[mk] = k
        derived: dict[str, Callable[[], torch.Tensor]] = {}
        plain = "encoder.pos_conv_embed.conv.weight"
        if plain in renames:  # a file with the weight norm folded in: split it back (g = |w| over all dims but 2)
            old = renames.pop(plain)
            derived[plain.replace("weight", "parametrizations.weight.original1")] = lambda: src.get(old).float()
            derived[plain.replace("weight", "parametrizations.weight.original0")] = \
                lambda: torch.linalg.vector_norm(src.get(old).float(), dim=(0, 1), keepdim=True)
        do_normalize = None
        if folder is not None and (folder / "config.json").exists():
            cfg = _public(read_json(folder / "config.json"))
            pre = folder / "preprocessor_config.json"
            if pre.exists():
                do_normalize = bool(read_json(pre).get("do_normalize", True))
        else:
            cfg = dict(info.config)
            for flavour in ("wav2vec2_large", "wav2vec2_base"):
                cfg = _use_full_size(cfg, flavour, ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                    "conv_dim", "feat_extract_norm", "num_conv_pos_embeddings"))
            cfg.update(read_settings(src.metadata, w2v_conv.MODEL_CLASS, w2v_conv.FILE_SETTINGS, f"'{name}'"))
            do_normalize = _recorded_flag(src.metadata, w2v_conv.DO_NORMALIZE_KEY, name)
        cfg.update(config or {})
        if do_normalize is None:
            do_normalize = bool(cfg.get("do_stable_layer_norm", cfg.get("feat_extract_norm") == "layer"))
        cfg.pop("model_type", None)
        target = _dtype_policy(dtype, info.dtype)
        wcfg = _on_meta(lambda: Wav2Vec2Config(**cfg), name)
        model = _on_meta(lambda: Wav2Vec2Model(wcfg), name)
        keep = _keep_fp32(Wav2Vec2Model, target, "transformers")
        missing_optional = _stream_into(model, src, renames, dtype=target, device=device, keep_fp32=keep, name=name,
                                        optional=w2v_conv.OPTIONAL_KEYS, derived=derived)
    for key in missing_optional:  # training-only parameters (masked_spec_embed): zeros
        module_name, _, param = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        setattr(module, param, torch.nn.Parameter(torch.zeros(getattr(module, param).shape, device=device, dtype=target)))
    _check_no_meta(model, "the audio encoder")
    return model.eval(), {"do_normalize": do_normalize, "sample_rate": 16000,
                          "num_layers": int(wcfg.num_hidden_layers), "hidden_size": int(wcfg.hidden_size)}
