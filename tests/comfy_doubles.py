"""Test doubles of the ComfyUI modules the pack uses at run time, and the real ``comfy_api`` the nodes are built on.

The nodes import ComfyUI's V3 API (``comfy_api.latest``) from a real ComfyUI checkout (``COMFYUI_DIR``; its
``comfy_api`` imports no model code and probes no device). What a running ComfyUI server provides beside it
(``comfy.model_management``'s devices, memory management and interrupt flag, ``comfy.utils.ProgressBar``,
``comfy.model_patcher.ModelPatcher``, ``folder_paths``, ``latent_preview``) is replaced here by small doubles that
record what the nodes do, installed per test with :func:`install` (the ``comfy`` fixture), so the nodes run
in-process on the CPU. The real server is exercised by ``tests/integration``.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def comfyui_dir() -> Path | None:
    """The ComfyUI checkout named by COMFYUI_DIR (None when unset or not a checkout with ``comfy_api``)."""
    raw = os.environ.get("COMFYUI_DIR")
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    return path if (path / "comfy_api" / "latest" / "__init__.py").is_file() else None


def require_comfy_api() -> None:
    """Make ComfyUI's ``comfy_api`` importable (COMFYUI_DIR goes to the end of sys.path, so the pack's own
    ``nodes`` package keeps precedence over ComfyUI's ``nodes.py``), or skip the calling test module."""
    try:
        import comfy_api.latest  # noqa: F401 - already importable (an installed ComfyUI)
        return
    except ImportError:
        pass
    folder = comfyui_dir()
    if folder is None:
        pytest.skip("the nodes are built on ComfyUI's comfy_api: set COMFYUI_DIR to a ComfyUI checkout (0.33+)",
                    allow_module_level=True)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    import comfy_api.latest  # noqa: F401


class Interrupted(Exception):
    """The double of ``comfy.model_management.InterruptProcessingException``."""


class ComfyDoubles:
    """The doubles of one test: modules to put in ``sys.modules`` plus what they recorded."""

    MAX_RESOLUTION = 16384  # core's nodes.MAX_RESOLUTION

    def __init__(self) -> None:
        self.progress_log: list[tuple[int, int, bool]] = []
        self.loads: list[tuple[str, int]] = []
        self.interrupt_flag = False
        self.folders: dict[str, tuple[list[str], set[str]]] = {}
        self.directories: dict[str, str] = {}
        self.previewer: Any = None
        self.modules = {
            "comfy.model_management": self._model_management(),
            "comfy.utils": self._utils(),
            "comfy.model_patcher": self._model_patcher(),
            "comfy.latent_formats": self._latent_formats(),
            "latent_preview": self._latent_preview(),
            "folder_paths": self._folder_paths(),
        }

    # -------------------------------------------------------------------------------- what tests set
    def request_interrupt(self, value: bool = True) -> None:
        """What POST /interrupt does: the next interrupt check raises."""
        self.interrupt_flag = value

    def set_folder_paths(self, folder: str, paths: list[str | os.PathLike]) -> None:
        from nodes.comfy_bridge import MODEL_EXTENSIONS

        self.folders[folder] = ([str(p) for p in paths], set(MODEL_EXTENSIONS))

    def set_directory(self, kind: str, path: str | os.PathLike) -> None:
        """The 'output', 'input', 'temp' or 'models' directory."""
        self.directories[kind] = str(path)

    # -------------------------------------------------------------------------------- the modules
    def _model_management(self) -> types.ModuleType:
        mm = types.ModuleType("comfy.model_management")
        cpu = torch.device("cpu")
        doubles = self
        mm.InterruptProcessingException = Interrupted
        mm.current_loaded_models = []

        def throw_exception_if_processing_interrupted() -> None:
            if doubles.interrupt_flag:
                doubles.interrupt_flag = False
                raise Interrupted("Processing interrupted")

        def load_models_gpu(patchers: list, memory_required: int = 0, force_full_load: bool = False) -> None:
            for patcher in patchers:
                doubles.loads.append((type(patcher.model).__name__, int(memory_required)))
                patcher.model.inner.to(patcher.load_device)

        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.interrupt_current_processing = self.request_interrupt
        mm.load_models_gpu = load_models_gpu
        mm.soft_empty_cache = lambda *a, **k: None
        for name in ("get_torch_device", "unet_offload_device", "vae_device", "vae_offload_device",
                     "text_encoder_device", "text_encoder_offload_device", "intermediate_device"):
            setattr(mm, name, lambda: cpu)
        mm.unet_dtype = lambda device=None, supported_dtypes=(): torch.float32
        mm.should_use_bf16 = lambda device=None: False
        return mm

    def _utils(self) -> types.ModuleType:
        utils = types.ModuleType("comfy.utils")
        log = self.progress_log

        class ProgressBar:
            """Records every update as (value, total, has_preview)."""

            def __init__(self, total: int):
                self.total, self.current = total, 0

            def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
                self.total = total if total is not None else self.total
                self.current = min(value, self.total)
                log.append((self.current, self.total, preview is not None))

        utils.ProgressBar = ProgressBar
        return utils

    @staticmethod
    def _model_patcher() -> types.ModuleType:
        module = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:
            def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device

        module.ModelPatcher = ModelPatcher
        return module

    @staticmethod
    def _latent_formats() -> types.ModuleType:
        module = types.ModuleType("comfy.latent_formats")
        module.Wan22 = lambda: "Wan22"
        return module

    def _latent_preview(self) -> types.ModuleType:
        module = types.ModuleType("latent_preview")
        module.get_previewer = lambda device, latent_format: self.previewer
        return module

    def _folder_paths(self) -> types.ModuleType:
        doubles = self

        class FolderPaths(types.ModuleType):
            @property
            def models_dir(self) -> str:
                return doubles.directories.get("models", str(Path.cwd() / "models"))

        fp = FolderPaths("folder_paths")
        fp.folder_names_and_paths = self.folders

        def add_model_folder_path(folder: str, path: str, is_default: bool = False) -> None:
            paths = doubles.folders.setdefault(folder, ([], set()))[0]
            if path not in paths:
                paths.append(path)

        def get_filename_list(folder: str) -> list[str]:
            paths, extensions = doubles.folders[folder]
            names: set[str] = set()
            for base in paths:
                root = Path(base)
                if root.is_dir():
                    names.update(p.relative_to(root).as_posix() for p in root.rglob("*")
                                 if p.is_file() and (not extensions or p.suffix.lower() in extensions))
            return sorted(names)

        def get_full_path(folder: str, name: str) -> str | None:
            for base in doubles.folders.get(folder, ([], set()))[0]:
                candidate = Path(base) / name
                if candidate.is_file() and Path(base).resolve() in candidate.resolve().parents:
                    return str(candidate)
            return None

        def directory(kind: str):
            def get() -> str:
                if kind not in doubles.directories:
                    raise RuntimeError(f"no {kind} directory set in the test (comfy.set_directory)")
                return doubles.directories[kind]
            return get

        fp.add_model_folder_path = add_model_folder_path
        fp.get_filename_list = get_filename_list
        fp.get_full_path = get_full_path
        fp.get_output_directory = directory("output")
        fp.get_input_directory = directory("input")
        fp.get_temp_directory = directory("temp")
        return fp


def install(monkeypatch: pytest.MonkeyPatch) -> ComfyDoubles:
    """Put fresh doubles into ``sys.modules`` for one test (monkeypatch restores the real entries after it)."""
    require_comfy_api()
    doubles = ComfyDoubles()
    for name, module in doubles.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    from nodes import comfy_bridge

    monkeypatch.setattr(comfy_bridge, "max_resolution", lambda: ComfyDoubles.MAX_RESOLUTION)
    return doubles


@pytest.fixture
def comfy(monkeypatch: pytest.MonkeyPatch) -> ComfyDoubles:
    """The ComfyUI doubles of one test (see :func:`install`)."""
    return install(monkeypatch)
