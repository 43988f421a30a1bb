"""ActAvatar for ComfyUI: audio-driven talking avatars that perform text-described actions at chosen times.

Install by cloning this repository into ``ComfyUI/custom_nodes/`` and ``pip install -r requirements.txt``.

What loading the pack does (never breaking ComfyUI's start-up: every step is guarded and logged):

1. makes the bundled engine ``actavatar_core`` importable (this folder goes on ``sys.path``);
2. registers the nodes whose Python dependencies are installed, and logs which are missing and why;
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

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

#: Example inputs the shipped workflows load (LoadImage / LoadAudio), put into ComfyUI's input folder.
DEMO_IMAGE = "actavatar_demo_reference.png"
DEMO_AUDIO = "actavatar_demo_speech.wav"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def _setup() -> None:
    global NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    if _PACK_DIR not in sys.path:
        sys.path.append(_PACK_DIR)
    try:
        from .nodes import build_mappings
    except ImportError as exc:  # a dependency the node modules themselves need (torch, numpy)
        _log.error("ActAvatar: not loaded, a Python package is missing (%s). Fix: pip install -r %s",
                   exc, os.path.join(_PACK_DIR, "requirements.txt"))
        return

    import actavatar_core

    where = os.path.dirname(os.path.abspath(actavatar_core.__file__))
    if os.path.dirname(where) != _PACK_DIR:
        _log.warning("ActAvatar: using actavatar_core from %s, not the copy in this pack; uninstall the other "
                     "one (pip uninstall actavatar) if the versions differ.", where)

    classes, names, skipped = build_mappings()
    NODE_CLASS_MAPPINGS.update(classes)
    NODE_DISPLAY_NAME_MAPPINGS.update(names)
    if skipped:
        missing = sorted({m for mods in skipped.values() for m in mods})
        _log.error("ActAvatar: missing Python package(s) %s; these nodes are not registered: %s. Fix: pip install "
                   "-r %s", ", ".join(missing), ", ".join(skipped), os.path.join(_PACK_DIR, "requirements.txt"))

    try:
        from .nodes.model_folders import register_model_folders

        register_model_folders()
    except Exception as exc:  # noqa: BLE001 - never break ComfyUI's start-up
        _log.warning("ActAvatar: could not register the model folders (%s)", exc)

    if os.environ.get("ACTAVATAR_NO_DEMO_INPUTS") != "1":
        try:
            from .nodes import comfy_bridge

            if comfy_bridge.IN_COMFYUI:
                from actavatar_core.comfy_glue import write_demo_inputs

                for path in write_demo_inputs(comfy_bridge.directory("input"), DEMO_IMAGE, DEMO_AUDIO):
                    _log.info("ActAvatar: example input written to %s", path)
        except Exception as exc:  # noqa: BLE001 - the examples are a convenience
            _log.warning("ActAvatar: could not put the example inputs into ComfyUI's input folder (%s)", exc)


try:
    _setup()
except Exception as _exc:  # noqa: BLE001 - a broken pack must not break ComfyUI
    _log.exception("ActAvatar: failed to load (%s); no ActAvatar nodes are registered.", _exc)
    NODE_CLASS_MAPPINGS.clear()
    NODE_DISPLAY_NAME_MAPPINGS.clear()
