"""Model folders: ComfyUI's standard ones, the new ``models/actavatar`` folder, and the bundled mini model.

The mini model ships inside the pack at ``actavatar_core/weights/mini/comfyui/<folder>/``; registering those
folders as extra search paths makes its files appear in the loaders' pickers with no install step, next to the
user's own files in ``ComfyUI/models/<folder>/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import comfy_bridge as bridge

PACK_DIR = Path(__file__).resolve().parents[1]
MINI_COMFY_DIR = PACK_DIR / "actavatar_core" / "weights" / "mini" / "comfyui"

#: Picker folder -> the bundled mini model's file in it (the shipped workflows use these names).
MINI_FILES = {
    "diffusion_models": "actavatar_mini_transformer.safetensors",
    "text_encoders": "actavatar_mini_umt5.safetensors",
    "vae": "actavatar_mini_vae.safetensors",
    "audio_encoders": "actavatar_mini_wav2vec2.safetensors",
    "actavatar": "actavatar_mini.safetensors",
}
#: ActAvatar weights are only ever read from safetensors.
ACTAVATAR_EXTENSIONS = {".safetensors"}

_REGISTERED = {"done": False}


def register_model_folders(mini_dir: str | os.PathLike | None = None) -> None:
    """Create the 'actavatar' model folder (models/actavatar) and add the bundled mini model's folders."""
    base = Path(mini_dir) if mini_dir is not None else MINI_COMFY_DIR
    bridge.register_model_folder("actavatar", _default_actavatar_dir(), ACTAVATAR_EXTENSIONS)
    for folder in MINI_FILES:
        bridge.register_model_folder(folder, base / folder,
                                     ACTAVATAR_EXTENSIONS if folder == "actavatar" else None)
    _REGISTERED["done"] = True


def _default_actavatar_dir() -> Path:
    """models/actavatar of the running ComfyUI (honours --base-directory)."""
    return Path(bridge.models_directory()) / "actavatar"


def default_choice(folder: str, names: list[str]) -> str | None:
    """The picker default: the bundled mini model's file when present, else the first file."""
    mini = MINI_FILES.get(folder)
    if mini in names:
        return mini
    return names[0] if names else None
