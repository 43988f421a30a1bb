"""The values that travel on ActAvatar's own socket types (loaded models and conditioning).

Socket types (public names, used in workflows): ACTAVATAR_MODEL, ACTAVATAR_TEXT_ENCODER, ACTAVATAR_VAE,
ACTAVATAR_AUDIO_ENCODER, PHASE_PROMPT (:class:`nodes.conventions.PhasePrompt`), ACTAVATAR_CONDITIONING,
ACTAVATAR_AUDIO (:class:`nodes.conventions.SpeechClip`). Each is a V3 custom type (``io.Custom``) whose ``Input`` and
``Output`` the node schemas use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io

from .comfy_bridge import ManagedModel
from .conventions import PhasePrompt

Model = io.Custom("ACTAVATAR_MODEL")
TextEncoderType = io.Custom("ACTAVATAR_TEXT_ENCODER")
Vae = io.Custom("ACTAVATAR_VAE")
AudioEncoderType = io.Custom("ACTAVATAR_AUDIO_ENCODER")
PhasePromptType = io.Custom("PHASE_PROMPT")
ConditioningType = io.Custom("ACTAVATAR_CONDITIONING")
AudioEmbeds = io.Custom("ACTAVATAR_AUDIO")


@dataclass
class LoadedModel:
    """A loaded model file: the module under ComfyUI's memory management plus what the nodes need beside it."""

    managed: ManagedModel
    source: str
    info: dict = field(default_factory=dict)

    @property
    def module(self) -> Any:
        return self.managed.module


@dataclass
class TextEncoder(LoadedModel):
    tokenizer: Any = None


@dataclass
class AudioEncoder(LoadedModel):
    do_normalize: bool = True


@dataclass
class PhaseConditioning:
    """Encoded phase prompt and negative prompt, with the phase prompt (script and frame rate) they came from."""

    prompt: Any  # actavatar_core.text.EncodedPrompt
    negative: Any  # actavatar_core.text.EncodedPrompt
    phase_prompt: PhasePrompt
    negative_text: str = ""

    @property
    def script(self):
        return self.phase_prompt.script

    @property
    def fps(self) -> float:
        return self.phase_prompt.fps
