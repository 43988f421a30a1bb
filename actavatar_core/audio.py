"""Speech audio -> wav2vec2 features windowed per latent frame.

Steps: decode (PyAV, any common format) or take a waveform; mix to mono; resample to 16 kHz (torchaudio's resampler,
imported only when the audio is not 16 kHz already); fit to the clip length; run ``Wav2Vec2Model``
and keep the hidden states of every layer (embedding output included); interpolate from wav2vec2's 50 Hz to the
video frame rate; give each latent frame a window of ``W`` video-rate audio frames centred on its time.

Length rule: unless the caller fixes the frame count, the clip follows the audio: the smallest 4k+1 frames that
cover it, the audio padded with silence up to that length. When the frame count is fixed, longer audio is
trimmed to the clip and shorter audio padded with silence, so the features and the saved MP4 always cover
exactly the video.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ActAvatarError, AudioInputError
from .phases import VAE_TEMPORAL_STRIDE, frames_for_duration, latent_frame_count

SAMPLE_RATE = 16000
#: wav2vec2's feature stride and receptive field at 16 kHz (samples).
W2V_HOP, W2V_FIELD = 320, 400
#: Quieter than this peak amplitude counts as silent.
SILENCE_PEAK = 1e-4
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384000
#: Video-rate audio frames per latent frame window (4 frames of the latent frame plus 2 of context each side).
DEFAULT_WINDOW = 8


@dataclass
class Waveform:
    """Mono float32 audio at ``sample_rate``."""

    samples: torch.Tensor  # (S,)
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.numel() / self.sample_rate


# ---------------------------------------------------------------------------------------------- decoding
def decode_audio_file(path: "str | os.PathLike") -> tuple[np.ndarray, int]:
    """Decode any audio (or video-with-audio) file PyAV can read: float32 (channels, samples) and its rate."""
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"The audio file '{path}' does not exist.", "Check the path; WAV, MP3, FLAC, OGG, M4A and MP4 work.")
    if path.stat().st_size == 0:
        raise AudioInputError(f"The audio file '{path.name}' is empty (0 bytes).", "Record or export the speech again.")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioInputError(f"'{path.name}' has no audio stream.", "Use a file that contains the speech track.")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="fltp")
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except AudioInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds; all mean "cannot decode"
        raise AudioInputError(f"'{path.name}' could not be decoded as audio ({exc.__class__.__name__}: {exc}).",
                              "Convert it to WAV or MP3 (e.g. ffmpeg -i in.xxx out.wav).") from None
    if not chunks:
        raise AudioInputError(f"'{path.name}' contains no audio samples.", "Use a file with speech in it.")
    return np.concatenate(chunks, axis=1).astype(np.float32), int(rate)


def load_waveform(source: Any, sample_rate: int | None = None) -> Waveform:
    """Mono 16 kHz waveform from a path, a ComfyUI AUDIO dict ``{"waveform": (B, C, S), "sample_rate"}``, or an
    array/tensor (``sample_rate`` required). Zero-length, silent, non-finite and unusable-rate audio is refused."""
    if isinstance(source, (str, os.PathLike)):
        data, rate = decode_audio_file(source)
        name = Path(source).name
        samples = torch.from_numpy(data)
    elif isinstance(source, dict) and "waveform" in source:
        rate = source.get("sample_rate")
        samples = torch.as_tensor(source["waveform"]).float()
        if samples.ndim == 3:
            samples = samples[0]
        name = "the AUDIO input"
    else:
        if sample_rate is None:
            raise AudioInputError("A raw waveform was given without its sample rate.", "Pass sample_rate (e.g. 16000).")
        rate, samples, name = sample_rate, torch.as_tensor(np.asarray(source) if not torch.is_tensor(source) else source).float(), "the waveform"
    check_sample_rate(rate, name)
    if samples.ndim == 1:
        samples = samples[None]
    if samples.ndim != 2:
        raise AudioInputError(f"{name} has shape {tuple(samples.shape)}; expected (channels, samples).", "Pass mono or stereo audio.")
    if samples.shape[1] == 0:
        raise AudioInputError(f"{name} has no samples (zero length).", "Use a recording that actually contains speech.")
    if not torch.isfinite(samples).all():
        raise AudioInputError(f"{name} contains NaN or infinite samples.", "Re-export the audio; it is corrupted.")
    mono = samples.mean(dim=0)
    if float(mono.abs().max()) < SILENCE_PEAK:
        raise AudioInputError(f"{name} is silent (peak amplitude {float(mono.abs().max()):.1e}).",
                              "Use the speech recording the avatar should speak, not an empty or muted track.")
    return Waveform(resample(mono, int(rate), SAMPLE_RATE), SAMPLE_RATE)


def check_sample_rate(rate: Any, name: str = "the audio") -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer)) or not math.isfinite(rate) or int(rate) != rate:
        raise AudioInputError(f"{name} has sample rate {rate!r}, which is not a whole number of Hz.", "Give the sample rate in Hz, e.g. 16000 or 44100.")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioInputError(
            f"{name} has a sample rate of {rate} Hz; speech needs between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz.",
            "Check that the rate matches the samples (a wrong rate plays at the wrong speed); resample to 16000 Hz.",
        )


def resample(samples: torch.Tensor, rate_in: int, rate_out: int) -> torch.Tensor:
    """Band-limited resampling of a 1-D float tensor with torchaudio's ``functional.resample`` (Hann-windowed sinc,
    ``lowpass_filter_width`` 6, ``rolloff`` 0.99). torchaudio is imported here, not at module import, so the engine
    (and the ComfyUI pack, whose ComfyUI installs torchaudio) imports without it; 16 kHz audio never needs it."""
    if rate_in == rate_out:
        return samples.float().contiguous()
    try:
        from torchaudio.functional import resample as torchaudio_resample
    except (ImportError, OSError) as exc:
        raise ActAvatarError(
            f"Resampling {rate_in} Hz audio to {rate_out} Hz needs torchaudio, which cannot be imported "
            f"({exc.__class__.__name__}: {exc}).",
            "Install the torchaudio build that matches your torch (pip install torchaudio; ComfyUI installs it), "
            f"or give the speech at {rate_out} Hz (e.g. sox in.wav -r {rate_out} out.wav).") from None
    out = torchaudio_resample(samples.float()[None], rate_in, rate_out, lowpass_filter_width=6, rolloff=0.99,
                              resampling_method="sinc_interp_hann")
    return out[0].contiguous()


def fit_waveform(wave: Waveform, num_frames: int, fps: float) -> Waveform:
    """Trim or zero-pad to exactly the clip's duration, ``num_frames / fps`` seconds."""
    target = int(round(num_frames / fps * wave.sample_rate))
    s = wave.samples
    s = s[:target] if s.numel() >= target else F.pad(s, (0, target - s.numel()))
    return Waveform(s, wave.sample_rate)


def clip_frames_for(wave: Waveform, fps: float, num_frames: int | None = None) -> int:
    """The clip's frame count: fixed by the caller (checked to be 4k+1) or the smallest 4k+1 covering the audio."""
    if num_frames is None:
        return frames_for_duration(wave.duration, fps)
    latent_frame_count(num_frames)
    return num_frames


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def wav2vec2_hidden_states(model: Any, wave: Waveform, do_normalize: bool = True) -> torch.Tensor:
    """All hidden states of a transformers ``Wav2Vec2Model``: (T, L+1, C) at 50 Hz."""
    param = next(model.parameters())
    x = wave.samples.float()
    if do_normalize:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    if x.numel() < W2V_FIELD:
        x = F.pad(x, (0, W2V_FIELD - x.numel()))
    out = model(x[None].to(device=param.device, dtype=param.dtype), output_hidden_states=True)
    # The last entry is taken after the encoder's final layer norm (``last_hidden_state``), as ComfyUI's
    # ``encoded_audio_all_layers`` has it, so features from either source are the same numbers.
    states = list(out.hidden_states[:-1]) + [out.last_hidden_state]
    return torch.stack(states, dim=2)[0].float()  # (T, L+1, C)


def features_from_layers(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack a list of per-layer (B, T, C) or (T, C) hidden states (e.g. ComfyUI's ``encoded_audio_all_layers``)."""
    stacked = [l[0] if l.ndim == 3 else l for l in layers]
    return torch.stack([s.float() for s in stacked], dim=1)  # (T, L, C)


def to_video_rate(features: torch.Tensor, num_frames: int, fps: float) -> torch.Tensor:
    """Linear interpolation of (T, L, C) 50 Hz features to the instants of the video frames, i/fps."""
    t = torch.arange(num_frames, dtype=torch.float64) / fps
    pos = ((t * SAMPLE_RATE - (W2V_FIELD / 2 - W2V_HOP / 2)) / W2V_HOP).clamp(0, features.shape[0] - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=features.shape[0] - 1)
    w = (pos - lo.double()).to(features.device, features.dtype)[:, None, None]  # the encoder may run on the GPU
    lo, hi = lo.to(features.device), hi.to(features.device)
    return features[lo] * (1 - w) + features[hi] * w


def window_per_latent_frame(video_rate: torch.Tensor, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """(F_lat, W, L, C): for latent frame j, the W video-rate frames centred on its time (pixel frame 0 for j=0,
    the middle of pixel frames 4j-3..4j after), edge frames repeated at the clip boundaries."""
    num_frames = video_rate.shape[0]
    latents = latent_frame_count(num_frames)
    centres = torch.tensor([0.0] + [VAE_TEMPORAL_STRIDE * j - 1.5 for j in range(1, latents)])
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    index = (centres[:, None] + offsets[None]).round().long().clamp(0, num_frames - 1)
    return video_rate[index.to(video_rate.device)]


@dataclass
class AudioEmbedding:
    """Audio conditioning for one clip."""

    features: torch.Tensor  # (1, F_lat, W, L, C)
    num_frames: int
    fps: float
    waveform: Waveform  # fitted to the clip
    source_duration: float

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def embed_features(features: torch.Tensor, wave: Waveform, *, fps: float, num_frames: int, source_duration: float,
                   window: int = DEFAULT_WINDOW) -> AudioEmbedding:
    video_rate = to_video_rate(features, num_frames, fps)
    return AudioEmbedding(window_per_latent_frame(video_rate, window)[None], num_frames, fps, wave, source_duration)


def encode_audio(model: Any, source: Any, *, fps: float, num_frames: int | None = None, do_normalize: bool = True,
                 window: int = DEFAULT_WINDOW, sample_rate: int | None = None) -> AudioEmbedding:
    """Decode, fit and encode speech for a clip at ``fps`` (see the module docstring for the length rule)."""
    wave = load_waveform(source, sample_rate)
    frames = clip_frames_for(wave, fps, num_frames)
    fitted = fit_waveform(wave, frames, fps)
    features = wav2vec2_hidden_states(model, fitted, do_normalize)
    return embed_features(features, fitted, fps=fps, num_frames=frames, source_duration=wave.duration, window=window)

