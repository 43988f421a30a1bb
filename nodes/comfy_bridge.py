"""Every ComfyUI import of the pack, in one place, with stand-ins so the nodes run (and are tested) without ComfyUI.

Inside ComfyUI this module uses ComfyUI's own machinery:

* devices and memory: ``comfy.model_management`` picks the device (a ``--cpu`` ComfyUI runs us on the CPU), and
  every model is wrapped in a ``comfy.model_patcher.ModelPatcher`` and loaded with ``load_models_gpu``, so ComfyUI
  frees its own models when memory is short and can offload ours when it needs room;
* progress, previews, interrupts: ``comfy.utils.ProgressBar`` (whose hook also raises on ``POST /interrupt``),
  ``latent_preview``'s previewer for the Wan2.2 latent format, ``throw_exception_if_processing_interrupted``;
* files: ``folder_paths`` (model folders, the output and input folders), ``VideoFromFile`` for VIDEO outputs.

Outside ComfyUI (unit tests, scripts) the stand-ins below behave the same way on the CPU: folders come from
:func:`set_folder_paths`, interrupts from :func:`request_interrupt`, progress updates are recorded in
:data:`PROGRESS_LOG`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger("ActAvatar")

# Inside ComfyUI these modules are loaded before any custom node. Only then are they used: importing them into a
# process that is not ComfyUI (a test run with ComfyUI on sys.path) would parse its command line and probe CUDA.
_mm = _model_patcher = _comfy_utils = _folder_paths = None
IN_COMFYUI = False
if "comfy.model_management" in sys.modules and "folder_paths" in sys.modules:
    try:
        import comfy.model_management as _mm
        import comfy.model_patcher as _model_patcher
        import comfy.utils as _comfy_utils
        import folder_paths as _folder_paths

        IN_COMFYUI = True
    except ImportError:  # a broken ComfyUI install: run with the stand-ins
        _mm = _model_patcher = _comfy_utils = _folder_paths = None


# ================================================================================================ interrupts
class Interrupted(Exception):
    """Stand-in for ComfyUI's InterruptProcessingException outside ComfyUI."""


_INTERRUPT = {"flag": False}


def request_interrupt(value: bool = True) -> None:
    """Outside ComfyUI: make the next interrupt check raise (what POST /interrupt does inside ComfyUI)."""
    if IN_COMFYUI:
        _mm.interrupt_current_processing(value)
    else:
        _INTERRUPT["flag"] = value


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (POST /interrupt)."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()
    elif _INTERRUPT["flag"]:
        _INTERRUPT["flag"] = False
        raise Interrupted("Processing interrupted")


def interrupt_exception_types() -> tuple[type[BaseException], ...]:
    return (_mm.InterruptProcessingException,) if IN_COMFYUI else (Interrupted,)


# ================================================================================================ progress
#: Outside ComfyUI: every progress update as (value, total, has_preview).
PROGRESS_LOG: list[tuple[int, int, bool]] = []


class _RecordingProgressBar:
    def __init__(self, total: int):
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        self.total = total if total is not None else self.total
        self.current = min(value, self.total)
        PROGRESS_LOG.append((self.current, self.total, preview is not None))


def progress_bar(total: int):
    """ComfyUI's ProgressBar (WebSocket ``progress`` messages + previews; raises on interrupt), or a recorder."""
    return _comfy_utils.ProgressBar(total) if IN_COMFYUI else _RecordingProgressBar(total)


def latent_previewer(device: Any) -> Callable[[torch.Tensor], Any] | None:
    """A function turning normalised Wan2.2 latents (1, 48, F, h, w) into ComfyUI's preview tuple, following the
    ``--preview-method`` / the frontend's per-prompt choice (None: previews are off, or outside ComfyUI)."""
    if not IN_COMFYUI:
        return None
    try:
        import comfy.latent_formats
        import latent_preview

        previewer = latent_preview.get_previewer(device, comfy.latent_formats.Wan22())
    except Exception as exc:  # noqa: BLE001 - a preview must never break a run
        log.debug("ActAvatar: no latent previewer (%s)", exc)
        return None
    if previewer is None:
        return None
    return lambda x0: previewer.decode_latent_to_preview_image("JPEG", x0)


# ================================================================================================ devices
PLACEMENTS = ("auto", "offload_after_use", "cpu")
_KIND_DEVICES = {"diffusion": "unet", "text": "text_encoder", "vae": "vae", "audio": "text_encoder"}


def devices(kind: str, placement: str = "auto") -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a model kind ('diffusion', 'text', 'vae', 'audio') and placement."""
    cpu = torch.device("cpu")
    if placement == "cpu" or not IN_COMFYUI:
        return cpu, cpu
    role = _KIND_DEVICES[kind]
    if role == "unet":
        return _mm.get_torch_device(), _mm.unet_offload_device()
    if role == "vae":
        return _mm.vae_device(), _mm.vae_offload_device()
    # Text and audio encoders: ComfyUI keeps them on the CPU when fp16 is not usable on the GPU; we follow it.
    return _mm.text_encoder_device(), _mm.text_encoder_offload_device()


def intermediate_device() -> torch.device:
    """Where node outputs (latents, frames) live between nodes."""
    return _mm.intermediate_device() if IN_COMFYUI else torch.device("cpu")


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, kind: str, device: torch.device) -> torch.dtype:
    """The compute dtype: explicit, or 'auto'. Auto on the CPU is float32 (half precision is slow and lossy there);
    on a GPU the diffusion model follows ComfyUI's unet_dtype (which honours --bf16-unet, --fp16-unet, ...), the
    encoders and the VAE use bfloat16 where supported, else float16 (audio, VAE) or float32 (umT5 overflows fp16)."""
    if precision != "auto":
        return _PRECISIONS[precision]
    if device.type == "cpu":
        return torch.float32
    if IN_COMFYUI:
        if kind == "diffusion":
            return _mm.unet_dtype(device, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
        if _mm.should_use_bf16(device):
            return torch.bfloat16
        return torch.float32 if kind == "text" else torch.float16
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


# ================================================================================================ model management
class _Host(torch.nn.Module):
    """What ComfyUI's ModelPatcher wraps: our diffusers/transformers module as a child, with the plain ``device``
    attribute the patcher writes (diffusers/transformers models have a read-only ``device`` property)."""

    def __init__(self, inner: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = inner
        self.device = device


_HOST_CLASSES: dict[str, type] = {}


def _host(inner: torch.nn.Module, device: torch.device) -> _Host:
    """A host whose class name says what it holds (ComfyUI logs "Requested to load <class name>")."""
    name = "ActAvatar" + inner.__class__.__name__.replace("ActAvatar", "")
    cls = _HOST_CLASSES.setdefault(name, type(name, (_Host,), {}))
    return cls(inner, device)


@dataclass
class ManagedModel:
    """One of our torch modules under ComfyUI's memory management (or plainly on the CPU outside ComfyUI).

    Use it as ``with managed.use() as module: ...``: the module is moved to its load device first (ComfyUI frees
    other models if needed) and, with placement 'offload_after_use', moved back to RAM afterwards.
    """

    module: torch.nn.Module
    load_device: torch.device
    offload_device: torch.device
    placement: str = "auto"
    patcher: Any = None
    name: str = ""
    extra: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def use(self, memory_required: int = 0) -> Iterator[torch.nn.Module]:
        """The module on its load device for the ``with`` block; ``memory_required``: bytes of activations to
        keep free beside the weights (ComfyUI unloads other models to make room)."""
        self.load(memory_required)
        try:
            yield self.module
        finally:
            if self.placement == "offload_after_use":
                self.offload()

    def load(self, memory_required: int = 0) -> None:
        if self.patcher is not None:
            # force_full_load: our modules have no ComfyUI cast hooks, so a partial (lowvram) load would leave
            # layers on the CPU; ComfyUI makes room by unloading its own models instead.
            _mm.load_models_gpu([self.patcher], memory_required=int(memory_required), force_full_load=True)
        else:
            self.module.to(self.load_device)

    @property
    def dtype_bytes(self) -> int:
        return next(self.module.parameters()).element_size()

    def offload(self) -> None:
        if self.patcher is not None:
            for loaded in list(getattr(_mm, "current_loaded_models", [])):
                if getattr(loaded, "model", None) is self.patcher:
                    try:
                        loaded.model_unload()
                        _mm.current_loaded_models.remove(loaded)
                    except Exception as exc:  # noqa: BLE001 - offloading is best effort
                        log.warning("ActAvatar: could not offload %s (%s)", self.name, exc)
            _mm.soft_empty_cache()
        else:
            self.module.to(self.offload_device)


def manage(module: torch.nn.Module, kind: str, placement: str = "auto", name: str = "") -> ManagedModel:
    """Put a freshly loaded module (on its offload device) under ComfyUI's model management."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown device placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    load_device, offload_device = devices(kind, placement)
    module.eval()
    patcher = None
    if IN_COMFYUI:
        patcher = _model_patcher.ModelPatcher(_host(module, offload_device), load_device=load_device,
                                              offload_device=offload_device)
    return ManagedModel(module, load_device, offload_device, placement, patcher, name)


# ================================================================================================ folders and files
#: Outside ComfyUI: folder name -> list of directories (tests fill it with set_folder_paths).
_FOLDERS: dict[str, list[str]] = {}
_DIRS: dict[str, str] = {}
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt"}


def set_folder_paths(folder: str, paths: list[str | os.PathLike]) -> None:
    """Outside ComfyUI: where the files of a model folder (diffusion_models, vae, ...) are looked up."""
    _FOLDERS[folder] = [str(p) for p in paths]


def set_directory(kind: str, path: str | os.PathLike) -> None:
    """Outside ComfyUI: the 'output', 'input' or 'temp' directory."""
    _DIRS[kind] = str(path)


def register_model_folder(folder: str, path: str | os.PathLike, extensions: set[str] | None = None) -> None:
    """Add a folder to a model-folder list (creating the list with ``extensions`` for a new folder name, e.g.
    'actavatar' under models/). Paths that do not exist yet are fine: they list no files."""
    path = str(path)
    if IN_COMFYUI:
        if folder not in _folder_paths.folder_names_and_paths:
            default = os.path.join(_folder_paths.models_dir, folder)
            _folder_paths.folder_names_and_paths[folder] = ([default], set(extensions or MODEL_EXTENSIONS))
        _folder_paths.add_model_folder_path(folder, path)
    else:
        paths = _FOLDERS.setdefault(folder, [])
        if path not in paths:
            paths.append(path)


def filename_list(folder: str) -> list[str]:
    """The model files of a folder, as ComfyUI lists them (relative paths, sorted)."""
    if IN_COMFYUI:
        try:
            return list(_folder_paths.get_filename_list(folder))
        except KeyError:
            return []
    names: set[str] = set()
    for base in _FOLDERS.get(folder, []):
        root = Path(base)
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS:
                    names.add(p.relative_to(root).as_posix())
    return sorted(names)


def full_path(folder: str, name: str) -> str:
    """The path of a model file picked in a combo; a clear error when it is gone."""
    from actavatar_core.errors import WeightsError

    found = None
    if IN_COMFYUI:
        found = _folder_paths.get_full_path(folder, name)
    else:
        for base in _FOLDERS.get(folder, []):
            candidate = Path(base) / name
            if candidate.is_file() and Path(base).resolve() in candidate.resolve().parents:
                found = str(candidate)
                break
    if not found:
        raise WeightsError(f"The model file '{name}' is not in the '{folder}' model folder.",
                           f"Put it into ComfyUI/models/{folder}/ (or pick another file) and refresh the node.")
    return found


def directory(kind: str) -> str:
    """ComfyUI's 'output', 'input' or 'temp' directory."""
    if IN_COMFYUI:
        return {"output": _folder_paths.get_output_directory, "input": _folder_paths.get_input_directory,
                "temp": _folder_paths.get_temp_directory}[kind]()
    if kind not in _DIRS:
        raise RuntimeError(f"no {kind} directory set (call comfy_bridge.set_directory outside ComfyUI)")
    return _DIRS[kind]


def models_directory() -> str:
    """ComfyUI's models/ folder (outside ComfyUI: the 'models' directory set with set_directory, else ./models)."""
    if IN_COMFYUI:
        return _folder_paths.models_dir
    return _DIRS.get("models", os.path.join(os.getcwd(), "models"))


def metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata."""
    if not IN_COMFYUI:
        return False
    from comfy.cli_args import args

    return bool(getattr(args, "disable_metadata", False))


class FileVideo:
    """Stand-in for ComfyUI's VideoFromFile outside ComfyUI (path and components on request)."""

    def __init__(self, path: str):
        self.path = path

    def get_stream_source(self) -> str:
        return self.path


def video_from_file(path: str | os.PathLike) -> Any:
    """A VIDEO value for a written file (core's VideoFromFile), so it chains into core's video nodes."""
    if IN_COMFYUI:
        from comfy_api.latest import InputImpl

        return InputImpl.VideoFromFile(str(path))
    return FileVideo(str(path))
