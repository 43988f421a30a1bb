"""One call from (reference image, speech, phase script) to video frames or an MP4 file.

``ActAvatarPipeline`` holds the five models (an :class:`~actavatar_core.bundle.ActAvatarModels`) and runs: validate
inputs -> encode prompt and speech -> encode the reference image -> :func:`generate_clip_latents` -> decode
(streamed) -> write the MP4.

:func:`generate_clip_latents` is the one engine entry from encoded text, speech features and the reference latent to
the clip's latents: it windows the speech features per latent frame, routes the phases and samples. The command line
(through :class:`ActAvatarPipeline`) and the ComfyUI Sampler node both call it, so both paths share every line of
math. Speech features are wav2vec2's hidden states of the whole speech as given (:func:`encode_speech`), the same
numbers as ComfyUI's AudioEncoderEncode gives, so they are computed once, before the clip length is known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .audio import (
    SAMPLE_RATE, AudioEmbedding, Waveform, embed_features, fit_waveform, load_waveform, wav2vec2_hidden_states,
)
from .bundle import ActAvatarModels
from .errors import PhaseScriptError, WeightsError
from .limits import audio_seconds, check_clip, limits_of
from .model import compute_dtype
from .phases import DEFAULT_FPS, PhaseScript, frames_for_duration, latent_frame_count
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
class SpeechFeatures:
    """Encoded speech: wav2vec2's hidden states of the whole speech, (T, L, C) at 50 Hz with the embedding output
    first (what ComfyUI's AudioEncoderEncode calls ``encoded_audio_all_layers``), and the 16 kHz mono speech they
    came from (None when only the features are known)."""

    features: torch.Tensor
    waveform: Waveform | None
    duration: float  # seconds of speech


def encode_speech(audio_encoder: Any, source: Any, *, do_normalize: bool = True,
                  sample_rate: int | None = None) -> SpeechFeatures:
    """Decode and check the speech (any file, a ComfyUI AUDIO, a waveform), then run wav2vec2 on all of it."""
    wave = load_waveform(source, sample_rate)
    return SpeechFeatures(wav2vec2_hidden_states(audio_encoder, wave, do_normalize), wave, wave.duration)


def speech_clip_frames(speech: SpeechFeatures, fps: float, num_frames: int | None = None) -> int:
    """The clip's frame count: fixed by the caller (checked to be 4k+1) or the smallest 4k+1 covering the speech."""
    if num_frames:
        latent_frame_count(int(num_frames))
        return int(num_frames)
    return frames_for_duration(speech.duration, fps)


def check_speech_features(features: torch.Tensor, config: Any) -> None:
    """Refuse speech features the model's audio adapter was not trained on (another wav2vec2 size), naming the fix."""
    layers, dim = int(features.shape[-2]), int(features.shape[-1])
    if (layers, dim) != (config.audio_num_layers, config.audio_feature_dim):
        flavour = {1024: "wav2vec2 large (wav2vec2_large_english_fp16.safetensors)",
                   768: "wav2vec2 base (wav2vec2-chinese-base_fp16.safetensors)"}.get(
            config.audio_feature_dim, f"a {config.audio_feature_dim}-wide wav2vec2")
        raise WeightsError(
            f"The audio features have {layers} layers of width {dim}, but this ActAvatar model's audio adapter was "
            f"trained on {config.audio_num_layers} layers of width {config.audio_feature_dim}.",
            f"Use the audio encoder the ActAvatar weights were trained with: {flavour}; or pick the ActAvatar "
            "weights that match your audio encoder.")


def window_speech(speech: SpeechFeatures, *, fps: float, num_frames: int, window: int) -> AudioEmbedding:
    """The speech for a clip of ``num_frames`` at ``fps``: its features interpolated to the video frames and
    windowed per latent frame (past the end of the speech its last features repeat), and the speech trimmed or
    padded with silence to the clip."""
    wave = speech.waveform
    if wave is None:  # features only: a silent waveform of the clip's length for the bookkeeping
        wave = Waveform(torch.zeros(int(round(num_frames / fps * SAMPLE_RATE))), SAMPLE_RATE)
    return embed_features(speech.features.float(), fit_waveform(wave, num_frames, fps), fps=fps,
                          num_frames=num_frames, source_duration=speech.duration, window=window)


@dataclass
class ClipLatents:
    latents: torch.Tensor  # normalised latents (1, C, F_lat, h, w)
    audio: AudioEmbedding
    script: PhaseScript


def generate_clip_latents(transformer: Any, *, prompt: EncodedPrompt, negative: EncodedPrompt,
                          speech: SpeechFeatures, reference_latent: torch.Tensor, script: PhaseScript, fps: float,
                          num_frames: int, options: SamplingOptions,
                          on_step: Callable[[StepInfo], None] | None = None,
                          check_cancel: Callable[[], None] | None = None) -> ClipLatents:
    """The engine entry: encoded phase prompt and negative, speech features and the reference image's latent ->
    the clip's latents. Checks the script against the clip and the features against the model, windows the speech
    per latent frame, routes the phases over time and samples."""
    config = transformer.config
    script = script.validate(duration=num_frames / fps, fps=fps)
    if len(script.phases) > config.max_phases:
        raise PhaseScriptError(f"The script has {len(script.phases)} phases; this model was trained with at most "
                               f"{config.max_phases}.", "Merge neighbouring phases or split the clip.")
    check_speech_features(speech.features, config)
    audio = window_speech(speech, fps=fps, num_frames=num_frames, window=config.audio_window)
    num_latent = latent_frame_count(num_frames)
    routing = build_routing(script, prompt.block_ids, num_latent, fps, options.feather)
    cond = Conditioning(text=prompt.embeds, phase_ids=prompt.block_ids, negative=negative.embeds,
                        audio=audio.features, routing=routing)
    latents = sample(transformer, cond, reference_latent, num_latent, options, on_step=on_step,
                     check_cancel=check_cancel)
    return ClipLatents(latents, audio, script)


@dataclass
class PreparedInputs:
    script: PhaseScript
    prompt: EncodedPrompt
    negative: EncodedPrompt
    speech: SpeechFeatures
    first_latent: torch.Tensor
    num_frames: int


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
    speech = encode_speech(models.audio_encoder, request.audio,
                           do_normalize=models.audio_config.get("do_normalize", True))
    num_frames = speech_clip_frames(speech, request.fps, request.num_frames)
    check_clip(fps=request.fps, num_frames=num_frames, limits=limits)  # audio whose length was not known
    script.validate(duration=num_frames / request.fps, fps=request.fps)
    check_speech_features(speech.features, models.transformer.config)
    if len(script.phases) > models.transformer.config.max_phases:
        raise PhaseScriptError(f"This model was trained with at most {models.transformer.config.max_phases} phases.",
                               "Use fewer phases.")
    dtype = compute_dtype(models.transformer)
    prompt = encode_script(models.text_encoder, models.tokenizer, script, phased=request.phased_prompt, dtype=dtype)
    negative_text = request.negative if request.negative is not None else (script.negative or DEFAULT_NEGATIVE)
    negative = encode_plain(models.text_encoder, models.tokenizer, negative_text, dtype=dtype)
    first_latent = encode_reference(models.vae, image, request.width, request.height)
    return PreparedInputs(script, prompt, negative, speech, first_latent, num_frames)


def size_step(models: ActAvatarModels) -> int:
    """Pixels per transformer token side: VAE spatial stride x patch (32 for Wan2.2-5B: 16 x 2; the mini: 8 x 4)."""
    return int(models.vae.config.scale_factor_spatial) * int(models.transformer.config.patch_size[1])


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
        clip = generate_clip_latents(self.models.transformer, prompt=prepared.prompt, negative=prepared.negative,
                                     speech=prepared.speech, reference_latent=prepared.first_latent,
                                     script=prepared.script, fps=request.fps, num_frames=prepared.num_frames,
                                     options=request.options, on_step=on_step, check_cancel=cancel_check(cancel))
        return GenerationResult(clip.latents, clip.audio, request.fps, clip.script)

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
