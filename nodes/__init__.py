"""ActAvatar's ComfyUI nodes (V1 classes: plain classes, unit-testable without ComfyUI).

Node ids are a public contract (workflows and API prompts name them); never rename them.

:func:`build_mappings` registers only the nodes whose Python dependencies are importable and logs the rest, so a
missing optional package never leaves ComfyUI with broken nodes.
"""

from __future__ import annotations

import importlib.util
import logging

from .audio_encode import ActAvatarAudioEncode
from .loaders import ActAvatarAudioEncoderLoader, ActAvatarModelLoader, ActAvatarTextEncoderLoader, ActAvatarVAELoader
from .output import ActAvatarDecode, ActAvatarSaveVideo
from .prompt import ActAvatarPhaseEncode, ActAvatarPhasePrompt
from .sampler import ActAvatarSampler

log = logging.getLogger("ActAvatar")

#: node id -> (class, display name)
NODES: dict[str, tuple[type, str]] = {
    "ActAvatarModelLoader": (ActAvatarModelLoader, "ActAvatar Model Loader"),
    "ActAvatarTextEncoderLoader": (ActAvatarTextEncoderLoader, "ActAvatar Text Encoder Loader"),
    "ActAvatarVAELoader": (ActAvatarVAELoader, "ActAvatar VAE Loader"),
    "ActAvatarAudioEncoderLoader": (ActAvatarAudioEncoderLoader, "ActAvatar Audio Encoder Loader"),
    "ActAvatarPhasePrompt": (ActAvatarPhasePrompt, "ActAvatar Phase Prompt"),
    "ActAvatarPhaseEncode": (ActAvatarPhaseEncode, "ActAvatar Phase Encode"),
    "ActAvatarAudioEncode": (ActAvatarAudioEncode, "ActAvatar Audio Encode"),
    "ActAvatarSampler": (ActAvatarSampler, "ActAvatar Sampler"),
    "ActAvatarDecode": (ActAvatarDecode, "ActAvatar Decode"),
    "ActAvatarSaveVideo": (ActAvatarSaveVideo, "ActAvatar Save Video"),
}


def missing_modules(names: tuple[str, ...] | list[str]) -> list[str]:
    """The top-level modules among ``names`` that cannot be imported here."""
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def build_mappings(available=missing_modules) -> tuple[dict[str, type], dict[str, str], dict[str, list[str]]]:
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, {skipped node id: missing modules})."""
    classes: dict[str, type] = {}
    names: dict[str, str] = {}
    skipped: dict[str, list[str]] = {}
    for node_id, (cls, display) in NODES.items():
        missing = available(tuple(getattr(cls, "REQUIRES", ())))
        if missing:
            skipped[node_id] = missing
            continue
        classes[node_id] = cls
        names[node_id] = display
    return classes, names, skipped
