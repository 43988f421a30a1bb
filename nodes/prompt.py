"""Phase Prompt (the timeline: base prompt + timed action phases, and the clip's frame rate) and Phase Encode."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from actavatar_core.phases import DEFAULT_FPS

from . import conventions as conv
from .values import ConditioningType, PhaseConditioning, PhasePromptType, TextEncoderType

DEFAULT_SCRIPT = conv.EXAMPLE_SCRIPT.dumps()


class ActAvatarPhasePrompt(io.ComfyNode):
    """A phase script (base prompt + actions at chosen times) and the clip's frame rate -> PHASE_PROMPT.

    The frame rate is set here once; the Sampler builds the audio windows and the latent grid with it and outputs
    it for the video writer. A bad script, or a duration longer than the model can make, is refused at queue time
    (HTTP 400 from POST /prompt) with the engine's message; checks that need the clip length run when the audio is
    known.
    """

    REQUIRES = ()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarPhasePrompt", display_name="ActAvatar Phase Prompt", category="ActAvatar",
            description=("Base prompt plus text actions at chosen times: the JSON phase script "
                         '{"version": 1, "base": ..., "negative": ..., "phases": [{"start", "end", "text"}]} or the '
                         "compact form 'A man talks | 0-2s: waves | 2-4s: points down'."),
            inputs=[
                io.String.Input("phase_script", multiline=True, default=DEFAULT_SCRIPT,
                                tooltip="The phase script (JSON or compact text). Times are seconds from the first "
                                        "frame; windows are [start, end)."),
                io.Float.Input("duration", default=0.0, min=conv.DURATION_RANGE[0], max=conv.DURATION_RANGE[1],
                               step=0.01, tooltip="Clip length in seconds; 0 = follow the connected audio."),
                io.Float.Input("fps", default=DEFAULT_FPS, min=conv.FPS_RANGE[0], max=conv.FPS_RANGE[1], step=0.001,
                               tooltip="Frame rate of the video (the single place it is set; ActAvatar was trained "
                                       "at 25)."),
                io.Audio.Input("audio", optional=True,
                               tooltip="The speech; its length is the clip length when duration is 0."),
            ],
            outputs=[PhasePromptType.Output(display_name="phase_prompt")],
        )

    @classmethod
    def validate_inputs(cls, phase_script: Any = None, duration: Any = 0.0, fps: Any = DEFAULT_FPS) -> bool | str:
        if phase_script is None:  # linked from another node: checked when it runs
            return True
        if conv.left_unconverted(duration, fps):
            return True  # ComfyUI reports a value that is not a number on its own input
        problem = conv.phase_prompt_problem(phase_script, 0.0 if duration is None else duration,
                                            DEFAULT_FPS if fps is None else fps)
        return True if problem is None else problem

    @classmethod
    def execute(cls, phase_script: str, duration: float = 0.0, fps: float = DEFAULT_FPS,
                audio: dict | None = None) -> io.NodeOutput:
        return io.NodeOutput(conv.make_phase_prompt(phase_script, duration, fps, audio))


class ActAvatarPhaseEncode(io.ComfyNode):
    """umT5-encode the phase prompt (every token tagged with its phase) and the negative prompt."""

    REQUIRES = ("transformers",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ActAvatarPhaseEncode", display_name="ActAvatar Phase Encode", category="ActAvatar",
            description="Encodes the phase prompt with time anchors and phase ids for PACA, plus the negative prompt.",
            inputs=[
                TextEncoderType.Input("text_encoder"),
                PhasePromptType.Input("phase_prompt"),
                io.String.Input("negative", multiline=True, default="", optional=True,
                                tooltip="Negative prompt. Empty: the script's own negative, else Wan's default "
                                        "negative prompt."),
            ],
            outputs=[ConditioningType.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder, phase_prompt, negative: str = "") -> io.NodeOutput:
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
        return io.NodeOutput(PhaseConditioning(prompt.to(out), neg.to(out), phase_prompt, negative_text))
