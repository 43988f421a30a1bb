"""One call from (reference image, speech, phase script) to video frames or an MP4 file.

``ActAvatarPipeline`` holds the five models (an :class:`~actavatar_core.bundle.ActAvatarModels`) and runs: validate
inputs -> encode prompt and audio -> encode the reference image -> sample -> decode (streamed) -> write the MP4.
The ComfyUI nodes call the same steps one by one, so both paths share every line of math.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .audio import AudioEmbedding, encode_audio
from .bundle import ActAvatarModels
from .errors import PhaseScriptError
from .limits import audio_seconds, check_clip, limits_of
from .model import compute_dtype
from .phases import DEFAULT_FPS, PhaseScript, latent_frame_count
from .sampling import Conditioning, SamplingOptions, StepInfo, build_routing, cancel_check, sample
from .text import DEFAULT_NEGATIVE, EncodedPrompt, encode_plain, encode_script
from .vae import check_size, decode_latents, decode_stream, encode_reference
from .video import Mp4Writer, load_image


@dataclass
class GenerationRequest:
    """Everything a user chooses for one clip."""

    image: Any
    audio: Any
    phases: Any  # PhaseScript, JSON string/dict or compact text
    width: int = 704
    height: int = 1280
    fps: float = DEFAULT_FPS
    num_frames: int | None = None  # None: follow the audio
    negative: str | None = None  # None: the script's negative prompt, else Wan's default
    options: SamplingOptions = field(default_factory=SamplingOptions)
    phased_prompt: bool = True  # False: the flat 'global prompt' ablation (no time anchors, no block ids)
    decode_chunk: int = 4


@dataclass
class PreparedInputs:
    script: PhaseScript
    prompt: EncodedPrompt
    negative: EncodedPrompt
    audio: AudioEmbedding
    first_latent: torch.Tensor
    num_frames: int
    num_latent_frames: int


def prepare(models: ActAvatarModels, request: GenerationRequest) -> PreparedInputs:
    """Validate every input (before any heavy work) and encode prompt, audio and reference image."""
    script = PhaseScript.parse(request.phases)
    script.validate(duration=None, fps=request.fps)  # structure first: fail before any model runs
    check_size(request.width, request.height, size_step(models))
    limits = limits_of(models)  # the rotary table's length: refuse a too-long clip before any audio is encoded
    check_clip(fps=request.fps, num_frames=request.num_frames, audio_seconds=audio_seconds(request.audio),
               width=request.width, height=request.height, limits=limits)
    image = load_image(request.image)
    request.options.check()
    audio = encode_audio(models.audio_encoder, request.audio, fps=request.fps, num_frames=request.num_frames,
                         do_normalize=models.audio_config.get("do_normalize", True),
                         window=models.transformer.config.audio_window)
    check_clip(fps=request.fps, num_frames=audio.num_frames, limits=limits)  # audio whose length was not known
    script.validate(duration=audio.duration, fps=request.fps)
    if len(script.phases) > models.transformer.config.max_phases:
        raise PhaseScriptError(f"This model was trained with at most {models.transformer.config.max_phases} phases.",
                               "Use fewer phases.")
    dtype = compute_dtype(models.transformer)
    prompt = encode_script(models.text_encoder, models.tokenizer, script, phased=request.phased_prompt, dtype=dtype)
    negative_text = request.negative if request.negative is not None else (script.negative or DEFAULT_NEGATIVE)
    negative = encode_plain(models.text_encoder, models.tokenizer, negative_text, dtype=dtype)
    first_latent = encode_reference(models.vae, image, request.width, request.height)
    return PreparedInputs(script, prompt, negative, audio, first_latent, audio.num_frames,
                          latent_frame_count(audio.num_frames))


def size_step(models: ActAvatarModels) -> int:
    """Pixels per transformer token side: VAE spatial stride x patch (32 for Wan2.2-5B: 16 x 2; the mini: 8 x 4)."""
    return int(models.vae.config.scale_factor_spatial) * int(models.transformer.config.patch_size[1])


def conditioning(prepared: PreparedInputs, fps: float, feather: float = 0.0) -> Conditioning:
    routing = build_routing(prepared.script, prepared.prompt.block_ids, prepared.num_latent_frames, fps, feather)
    return Conditioning(text=prepared.prompt.embeds, phase_ids=prepared.prompt.block_ids,
                        negative=prepared.negative.embeds, audio=prepared.audio.features, routing=routing)


@dataclass
class GenerationResult:
    latents: torch.Tensor
    audio: AudioEmbedding
    fps: float
    script: PhaseScript
    frames: np.ndarray | None = None
    path: Path | None = None


class ActAvatarPipeline:
    def __init__(self, models: ActAvatarModels):
        self.models = models

    def generate_latents(self, request: GenerationRequest, *, on_step: Callable[[StepInfo], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> GenerationResult:
        prepared = prepare(self.models, request)
        cond = conditioning(prepared, request.fps, request.options.feather)
        latents = sample(self.models.transformer, cond, prepared.first_latent, prepared.num_latent_frames,
                         request.options, on_step=on_step, check_cancel=cancel_check(cancel))
        return GenerationResult(latents, prepared.audio, request.fps, prepared.script)

    def generate(self, request: GenerationRequest, **kwargs: Any) -> GenerationResult:
        """Frames in memory (uint8 (T, H, W, 3))."""
        result = self.generate_latents(request, **kwargs)
        result.frames = decode_latents(self.models.vae, result.latents, request.decode_chunk,
                                       cancel_check(kwargs.get("cancel")))
        return result

    def generate_to_file(self, request: GenerationRequest, out: "str | os.PathLike", *, overwrite: bool = False,
                         metadata: dict | None = None, **kwargs: Any) -> GenerationResult:
        """Sample, then decode chunk by chunk straight into an MP4 (written atomically: a failure or a cancel
        leaves no file)."""
        from .video import atomic_target, speech_track

        atomic_target(out, overwrite=overwrite)  # refuse a bad target before spending minutes on sampling
        result = self.generate_latents(request, **kwargs)
        wave = result.audio.waveform
        meta = {"actavatar": {"phases": result.script.to_json(), "fps": request.fps, "seed": request.options.seed,
                              "steps": request.options.steps, "paca_mode": request.options.paca_mode}}
        meta.update(metadata or {})
        speech, rate = speech_track(request.audio, wave)  # the original speech (rate, channels), not the 16 kHz mono
        with Mp4Writer(out, request.fps, request.width, request.height, audio=speech,
                       sample_rate=rate, metadata=meta, overwrite=overwrite) as writer:
            for chunk in decode_stream(self.models.vae, result.latents, request.decode_chunk, cancel_check(kwargs.get("cancel"))):
                writer.add(chunk)
            result.path = writer.close()
        return result
