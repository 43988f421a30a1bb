"""Phase Prompt (the timeline: base prompt + timed action phases, and the clip's frame rate) and Phase Encode."""

from __future__ import annotations

from typing import Any

from actavatar_core import comfy_glue as glue
from actavatar_core.phases import DEFAULT_FPS

from .values import CONDITIONING, PHASE_PROMPT, TEXT_ENCODER, PhaseConditioning

DEFAULT_SCRIPT = glue.EXAMPLE_SCRIPT.dumps()


class ActAvatarPhasePrompt:
    """A phase script (base prompt + actions at chosen times) and the clip's frame rate -> PHASE_PROMPT.

    The frame rate is set here once; the Sampler builds the audio windows and the latent grid with it and outputs
    it for the video writer. A bad script is refused at queue time (HTTP 400 from POST /prompt) with the engine's
    message; checks that need the clip length run when the audio is known.
    """

    CATEGORY = "ActAvatar"
    FUNCTION = "build"
    RETURN_TYPES = (PHASE_PROMPT,)
    RETURN_NAMES = ("phase_prompt",)
    DESCRIPTION = ("Base prompt plus text actions at chosen times: the JSON phase script "
                   '{"version": 1, "base": ..., "negative": ..., "phases": [{"start", "end", "text"}]} or the compact '
                   "form 'A man talks | 0-2s: waves | 2-4s: points down'.")
    REQUIRES = ()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "phase_script": ("STRING", {"multiline": True, "default": DEFAULT_SCRIPT,
                                            "tooltip": "The phase script (JSON or compact text). Times are seconds "
                                                       "from the first frame; windows are [start, end)."}),
                "duration": ("FLOAT", {"default": 0.0, "min": glue.DURATION_RANGE[0], "max": glue.DURATION_RANGE[1],
                                       "step": 0.01, "tooltip": "Clip length in seconds; 0 = follow the connected audio."}),
                "fps": ("FLOAT", {"default": DEFAULT_FPS, "min": glue.FPS_RANGE[0], "max": glue.FPS_RANGE[1],
                                  "step": 0.001, "tooltip": "Frame rate of the video (the single place it is set; "
                                                            "ActAvatar was trained at 25)."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "The speech; its length is the clip length when duration is 0."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, phase_script: Any = None, duration: Any = 0.0, fps: Any = DEFAULT_FPS) -> bool | str:
        if phase_script is None:  # linked from another node: checked when it runs
            return True
        problem = glue.phase_prompt_problem(phase_script, 0.0 if duration is None else duration,
                                            DEFAULT_FPS if fps is None else fps)
        return True if problem is None else problem

    def build(self, phase_script: str, duration: float = 0.0, fps: float = DEFAULT_FPS, audio: dict | None = None):
        return (glue.make_phase_prompt(phase_script, duration, fps, audio),)


class ActAvatarPhaseEncode:
    """umT5-encode the phase prompt (every token tagged with its phase) and the negative prompt."""

    CATEGORY = "ActAvatar"
    FUNCTION = "encode"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    DESCRIPTION = "Encodes the phase prompt with time anchors and phase ids for PACA, plus the negative prompt."
    REQUIRES = ("transformers",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER,),
                "phase_prompt": (PHASE_PROMPT,),
            },
            "optional": {
                "negative": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Negative prompt. Empty: the script's own negative, else Wan's "
                                                   "default negative prompt."}),
            },
        }

    def encode(self, text_encoder, phase_prompt, negative: str = ""):
        import torch

        from actavatar_core.text import DEFAULT_NEGATIVE, encode_plain, encode_script

        from . import comfy_bridge as bridge

        script = phase_prompt.script
        negative_text = negative.strip() or script.negative or DEFAULT_NEGATIVE
        out = bridge.intermediate_device()
        with text_encoder.managed.use() as model:
            bridge.throw_if_interrupted()
            prompt = encode_script(model, text_encoder.tokenizer, script, dtype=torch.float32)
            neg = encode_plain(model, text_encoder.tokenizer, negative_text, dtype=torch.float32)
        return (PhaseConditioning(prompt.to(out), neg.to(out), phase_prompt, negative_text),)
