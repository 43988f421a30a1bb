"""Test-only ComfyUI pack for the timeline browser test (never shipped).

Always provides ``ActAvatarTestPhaseProbe``, an output node that reports the phase script the engine received.
With ACTAVATAR_STUB_PHASE_PROMPT=1 it also provides a stand-in ``ActAvatarPhasePrompt`` with the contract's schema
(used until the real node exists) and serves the repository's web/ folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actavatar_core.phases import PhaseScript  # noqa: E402


def _find_script(value, depth=0):
    if isinstance(value, PhaseScript):
        return value
    if depth > 3:
        return None
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [getattr(value, k) for k in dir(value) if not k.startswith("_") and not callable(getattr(value, k, None))]
    for item in items:
        found = _find_script(item, depth + 1)
        if found is not None:
            return found
    return None


class ActAvatarTestPhaseProbe:
    CATEGORY = "ActAvatar/testing"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"phase_prompt": ("PHASE_PROMPT",)}}

    def probe(self, phase_prompt):
        script = _find_script(phase_prompt)
        text = script.dumps() if script is not None else json.dumps({"repr": repr(phase_prompt)[:2000]})
        return {"ui": {"phase_script": [text]}}


class StubPhasePrompt:
    """Same schema as the real node (issue contract); parses and validates with actavatar_core.phases."""

    CATEGORY = "ActAvatar"
    RETURN_TYPES = ("PHASE_PROMPT",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        default = PhaseScript(base="A woman in a red blazer talks to the camera").dumps()
        return {
            "required": {
                "phase_script": ("STRING", {"multiline": True, "default": default}),
                "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 600.0, "step": 0.01}),
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.001}),
            },
            "optional": {"audio": ("AUDIO",)},
        }

    def build(self, phase_script, duration, fps, audio=None):
        seconds = duration if duration > 0 else None
        if seconds is None and audio is not None:
            waveform = audio["waveform"]
            seconds = waveform.shape[-1] / float(audio["sample_rate"])
        script = PhaseScript.parse(phase_script).validate(seconds, fps)
        return ({"script": script, "duration": seconds, "fps": fps},)


NODE_CLASS_MAPPINGS = {"ActAvatarTestPhaseProbe": ActAvatarTestPhaseProbe}
NODE_DISPLAY_NAME_MAPPINGS = {"ActAvatarTestPhaseProbe": "ActAvatar Test Phase Probe"}
WEB_DIRECTORY = None

if os.environ.get("ACTAVATAR_STUB_PHASE_PROMPT") == "1":
    NODE_CLASS_MAPPINGS["ActAvatarPhasePrompt"] = StubPhasePrompt
    NODE_DISPLAY_NAME_MAPPINGS["ActAvatarPhasePrompt"] = "ActAvatar Phase Prompt"
    WEB_DIRECTORY = str(REPO / "web")
