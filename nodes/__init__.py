"""ActAvatar's ComfyUI nodes, on ComfyUI's V3 schema (``comfy_api.latest``: ``io.ComfyNode`` classes).

Node ids, input names and order, and output types are a public contract (workflows store widget values by
position, API prompts by input name); never rename or reorder them.

:func:`build_mappings` registers only the nodes whose Python dependencies are importable and logs the rest, so a
missing optional package never leaves ComfyUI with broken nodes; :class:`ActAvatarExtension` hands those nodes to
ComfyUI through the pack's ``comfy_entrypoint``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

from comfy_api.latest import ComfyExtension, io

from .audio_encode import ActAvatarAudioEncode
from .loaders import ActAvatarAudioEncoderLoader, ActAvatarModelLoader, ActAvatarTextEncoderLoader, ActAvatarVAELoader
from .native_phase import ActAvatarPhaseControl, ActAvatarPhaseGuider, ActAvatarPhaseTextEncode
from .output import ActAvatarDecode, ActAvatarSaveVideo
from .prompt import ActAvatarPhaseEncode, ActAvatarPhasePrompt
from .sampler import ActAvatarSampler

log = logging.getLogger("ActAvatar")

#: node id -> (class, display name), in menu order; each class's schema repeats both (a test keeps them equal).
NODES: dict[str, tuple[type[io.ComfyNode], str]] = {
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
    "ActAvatarPhaseTextEncode": (ActAvatarPhaseTextEncode, "ActAvatar Phase Text Encode"),
    "ActAvatarPhaseControl": (ActAvatarPhaseControl, "ActAvatar Phase Control"),
    "ActAvatarPhaseGuider": (ActAvatarPhaseGuider, "ActAvatar Phase Guider"),
}
#: The node classes, in menu order.
NODE_LIST: list[type[io.ComfyNode]] = [cls for cls, _ in NODES.values()]


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


def build_mappings(available: Callable[[tuple[str, ...]], list[str]] = missing_modules
                   ) -> tuple[dict[str, type], dict[str, str], dict[str, list[str]]]:
    """({node id: class}, {node id: display name}, {skipped node id: missing modules})."""
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


class ActAvatarExtension(ComfyExtension):
    """What the pack's ``comfy_entrypoint`` gives ComfyUI: the nodes whose dependencies are installed."""

    def __init__(self, nodes: list[type[io.ComfyNode]]):
        self.nodes = list(nodes)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(self.nodes)
