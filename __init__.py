"""ActAvatar for ComfyUI: audio-driven talking avatars that perform text-described actions at chosen times.

Install by cloning this repository into ``ComfyUI/custom_nodes/`` and ``pip install -r requirements.txt``.

What loading the pack does (never breaking ComfyUI's start-up: every step is guarded and logged):

1. makes the bundled engine ``actavatar_core`` importable (this folder goes on ``sys.path``);
2. registers the nodes (ComfyUI's V3 schema) through ``comfy_entrypoint``: those whose Python dependencies are
   installed; the log says which are missing and why;
3. adds the ``models/actavatar`` model folder and the bundled mini model's folders to ComfyUI's pickers;
4. copies the example image and speech used by the shipped workflows into ComfyUI's input folder, if absent
   (set ``ACTAVATAR_NO_DEMO_INPUTS=1`` to skip);
5. serves ``web/`` (the phase timeline editor) via ``WEB_DIRECTORY``.
"""

from __future__ import annotations

import logging
import os
import sys

_log = logging.getLogger("ActAvatar")
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))

WEB_DIRECTORY = "./web"

#: Example inputs the shipped workflows load (LoadImage / LoadAudio), put into ComfyUI's input folder.
DEMO_IMAGE = "actavatar_demo_reference.png"
DEMO_AUDIO = "actavatar_demo_speech.wav"

#: The node classes registered by :func:`comfy_entrypoint` (filled when the pack loads; empty if it could not).
NODES: list = []

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]


def _setup() -> None:
    if _PACK_DIR not in sys.path:
        sys.path.append(_PACK_DIR)
    try:
        from .nodes import build_mappings
    except ImportError as exc:  # a dependency the node modules need (torch, numpy, ComfyUI's comfy_api)
        _log.error("ActAvatar: not loaded, a Python package is missing (%s). Fix: pip install -r %s (and use a "
                   "ComfyUI with the V3 node API, comfy_api.latest)", exc, os.path.join(_PACK_DIR, "requirements.txt"))
        return

    import actavatar_core

    where = os.path.dirname(os.path.abspath(actavatar_core.__file__))
    if os.path.dirname(where) != _PACK_DIR:
        _log.warning("ActAvatar: using actavatar_core from %s, not the copy in this pack; uninstall the other "
                     "one (pip uninstall actavatar) if the versions differ.", where)

    try:
        from .nodes.model_folders import register_model_folders

        register_model_folders()
    except Exception as exc:  # noqa: BLE001 - never break ComfyUI's start-up
        _log.warning("ActAvatar: could not register the model folders (%s)", exc)

    classes, _, skipped = build_mappings()
    NODES.extend(classes.values())
    if skipped:
        missing = sorted({m for mods in skipped.values() for m in mods})
        _log.error("ActAvatar: missing Python package(s) %s; these nodes are not registered: %s. Fix: pip install "
                   "-r %s", ", ".join(missing), ", ".join(skipped), os.path.join(_PACK_DIR, "requirements.txt"))

    if os.environ.get("ACTAVATAR_NO_DEMO_INPUTS") != "1":
        try:
            from .nodes import comfy_bridge
            from .nodes.conventions import write_demo_inputs

            for path in write_demo_inputs(comfy_bridge.directory("input"), DEMO_IMAGE, DEMO_AUDIO):
                _log.info("ActAvatar: example input written to %s", path)
        except Exception as exc:  # noqa: BLE001 - the examples are a convenience
            _log.warning("ActAvatar: could not put the example inputs into ComfyUI's input folder (%s)", exc)


try:
    _setup()
except Exception as _exc:  # noqa: BLE001 - a broken pack must not break ComfyUI
    _log.exception("ActAvatar: failed to load (%s); no ActAvatar nodes are registered.", _exc)
    NODES.clear()


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension holding the nodes registered above (none if the pack could not
    load, which the log explains; ComfyUI starts regardless)."""
    from comfy_api.latest import ComfyExtension

    class _Empty(ComfyExtension):
        async def get_node_list(self) -> list:
            return []

    if not NODES:
        return _Empty()
    from .nodes import ActAvatarExtension

    return ActAvatarExtension(NODES)
