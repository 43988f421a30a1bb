"""Every ComfyUI import of the pack, in one place.

The pack runs inside ComfyUI and uses ComfyUI's own machinery:

* devices and memory: ``comfy.model_management`` picks the device (a ``--cpu`` ComfyUI runs us on the CPU), and
  every model is wrapped in a ``comfy.model_patcher.ModelPatcher`` and loaded with ``load_models_gpu``, so ComfyUI
  frees its own models when memory is short and can offload ours when it needs room;
* progress, previews, interrupts: ``comfy.utils.ProgressBar`` (whose hook also raises on ``POST /interrupt``),
  ``latent_preview``'s previewer for the Wan2.2 latent format, ``throw_exception_if_processing_interrupted``;
* files: ``folder_paths`` (model folders, the output and input folders), ``VideoFromFile`` for VIDEO outputs.

ComfyUI's modules are looked up when a function runs (ComfyUI has loaded them before any custom node), never at
import, so importing the pack parses no command line and probes no device. Tests put doubles of these modules in
``sys.modules`` (``tests/comfy_doubles.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger("ActAvatar")


def _comfy(name: str) -> ModuleType:
    """One of ComfyUI's modules ('comfy.model_management', 'folder_paths', ...), as ComfyUI loaded it."""
    return importlib.import_module(name)


def max_resolution() -> int:
    """Core's ``nodes.MAX_RESOLUTION``, the largest width/height core's own image and video nodes accept."""
    return int(_comfy("nodes").MAX_RESOLUTION)


# ================================================================================================ interrupts
def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (POST /interrupt)."""
    _comfy("comfy.model_management").throw_exception_if_processing_interrupted()


def interrupt_exception_types() -> tuple[type[BaseException], ...]:
    return (_comfy("comfy.model_management").InterruptProcessingException,)


# ================================================================================================ progress
def progress_bar(total: int) -> Any:
    """ComfyUI's ProgressBar (WebSocket ``progress`` messages + previews; raises on interrupt)."""
    return _comfy("comfy.utils").ProgressBar(total)


def latent_previewer(device: Any) -> Callable[[torch.Tensor], Any] | None:
    """A function turning normalised Wan2.2 latents (1, 48, F, h, w) into ComfyUI's preview tuple, following the
    ``--preview-method`` / the frontend's per-prompt choice (None: previews are off)."""
    try:
        latent_formats = _comfy("comfy.latent_formats")
        previewer = _comfy("latent_preview").get_previewer(device, latent_formats.Wan22())
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
    if placement == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu
    mm = _comfy("comfy.model_management")
    role = _KIND_DEVICES[kind]
    if role == "unet":
        return mm.get_torch_device(), mm.unet_offload_device()
    if role == "vae":
        return mm.vae_device(), mm.vae_offload_device()
    # Text and audio encoders: ComfyUI keeps them on the CPU when fp16 is not usable on the GPU; we follow it.
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def intermediate_device() -> torch.device:
    """Where node outputs (latents, frames) live between nodes."""
    return _comfy("comfy.model_management").intermediate_device()


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, kind: str, device: torch.device) -> torch.dtype:
    """The compute dtype: explicit, or 'auto'. Auto on the CPU is float32 (half precision is slow and lossy there);
    on a GPU the diffusion model follows ComfyUI's unet_dtype (which honours --bf16-unet, --fp16-unet, ...), the
    encoders and the VAE use bfloat16 where supported, else float16 (audio, VAE) or float32 (umT5 overflows fp16)."""
    if precision != "auto":
        return _PRECISIONS[precision]
    if device.type == "cpu":
        return torch.float32
    mm = _comfy("comfy.model_management")
    if kind == "diffusion":
        return mm.unet_dtype(device, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32 if kind == "text" else torch.float16


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
    """One of our torch modules under ComfyUI's memory management.

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
        # force_full_load: our modules have no ComfyUI cast hooks, so a partial (lowvram) load would leave
        # layers on the CPU; ComfyUI makes room by unloading its own models instead.
        _comfy("comfy.model_management").load_models_gpu([self.patcher], memory_required=int(memory_required),
                                                         force_full_load=True)

    @property
    def dtype_bytes(self) -> int:
        return next(self.module.parameters()).element_size()

    def offload(self) -> None:
        mm = _comfy("comfy.model_management")
        for loaded in list(getattr(mm, "current_loaded_models", [])):
            if getattr(loaded, "model", None) is self.patcher:
                try:
                    loaded.model_unload()
                    mm.current_loaded_models.remove(loaded)
                except Exception as exc:  # noqa: BLE001 - offloading is best effort
                    log.warning("ActAvatar: could not offload %s (%s)", self.name, exc)
        mm.soft_empty_cache()


def manage(module: torch.nn.Module, kind: str, placement: str = "auto", name: str = "") -> ManagedModel:
    """Put a freshly loaded module (on its offload device) under ComfyUI's model management."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown device placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    load_device, offload_device = devices(kind, placement)
    module.eval()
    patcher = _comfy("comfy.model_patcher").ModelPatcher(_host(module, offload_device), load_device=load_device,
                                                         offload_device=offload_device)
    return ManagedModel(module, load_device, offload_device, placement, patcher, name)


# ================================================================================================ folders and files
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt"}


def register_model_folder(folder: str, path: str | os.PathLike, extensions: set[str] | None = None) -> None:
    """Add a folder to a model-folder list (creating the list with ``extensions`` for a new folder name, e.g.
    'actavatar' under models/). Paths that do not exist yet are fine: they list no files."""
    folder_paths = _comfy("folder_paths")
    if folder not in folder_paths.folder_names_and_paths:
        default = os.path.join(folder_paths.models_dir, folder)
        folder_paths.folder_names_and_paths[folder] = ([default], set(extensions or MODEL_EXTENSIONS))
    folder_paths.add_model_folder_path(folder, str(path))


def filename_list(folder: str) -> list[str]:
    """The model files of a folder, as ComfyUI lists them (relative paths, sorted)."""
    try:
        return list(_comfy("folder_paths").get_filename_list(folder))
    except KeyError:
        return []


def full_path(folder: str, name: str) -> str:
    """The path of a model file picked in a combo; a clear error when it is gone."""
    from actavatar_core.errors import WeightsError

    found = _comfy("folder_paths").get_full_path(folder, name)
    if not found:
        raise WeightsError(f"The model file '{name}' is not in the '{folder}' model folder.",
                           f"Put it into ComfyUI/models/{folder}/ (or pick another file) and refresh the node.")
    return found


def directory(kind: str) -> str:
    """ComfyUI's 'output', 'input' or 'temp' directory."""
    folder_paths = _comfy("folder_paths")
    return {"output": folder_paths.get_output_directory, "input": folder_paths.get_input_directory,
            "temp": folder_paths.get_temp_directory}[kind]()


def models_directory() -> str:
    """ComfyUI's models/ folder (honours --base-directory)."""
    return _comfy("folder_paths").models_dir


def metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata."""
    return bool(getattr(_comfy("comfy.cli_args").args, "disable_metadata", False))


def video_from_file(path: str | os.PathLike) -> Any:
    """A VIDEO value for a written file (core's VideoFromFile), so it chains into core's video nodes."""
    from comfy_api.latest import InputImpl

    return InputImpl.VideoFromFile(str(path))
