"""ComfyUI's data conventions, as plain computations between ComfyUI values and the engine.

They live in the node package (the engine ``actavatar_core`` knows nothing of ComfyUI) and import no ComfyUI module,
so they are tested directly. ComfyUI's conventions, as plain data:

* AUDIO: ``{"waveform": Tensor (B, C, S) float, "sample_rate": int}``;
* IMAGE: ``Tensor (B, H, W, C)`` float in [0, 1];
* LATENT: ``{"samples": Tensor (B, C, F, h, w)}`` holding **raw** VAE latents (ComfyUI's Wan22 latent format
  normalises on the way into a model, ``(z - mean) / std``, and its VAEDecode takes raw latents), whereas the engine
  keeps latents normalised; :func:`raw_latents` / :func:`normalised_latents` convert with the VAE's own statistics;
* AUDIO_ENCODER_OUTPUT (core's AudioEncoderEncode): a dict with ``encoded_audio_all_layers`` (list of (B, T, C)
  hidden states at ~50 Hz, embedding output first) and ``audio_samples`` (count at 16 kHz).

Frame rate: it is set once, on the Phase Prompt node, and travels in :class:`PhasePrompt` to the sampler, which
decides the clip length (:func:`clip_frames`) and has the engine window the audio features for that frame rate and
length.
"""

from __future__ import annotations

import math
import time
import wave as wave_module
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

if TYPE_CHECKING:  # the engine's pipeline imports diffusers: only the nodes that need it import it at run time
    from actavatar_core.pipeline import SpeechFeatures

from actavatar_core.audio import SAMPLE_RATE, features_from_layers, load_waveform
from actavatar_core.errors import (
    AudioInputError, ClipTooLongError, ImageInputError, PhaseScriptError, SizeError,
)
from actavatar_core.phases import DEFAULT_FPS, PhaseScript, frames_for_duration, latent_frame_count
from actavatar_core.video import fit_audio_to_video, safe_output_path

#: Ranges of the Phase Prompt node's number inputs (the node declares them; validation repeats them because
#: ComfyUI skips its own min/max check for inputs that a VALIDATE_INPUTS function takes).
DURATION_RANGE = (0.0, 600.0)
FPS_RANGE = (1.0, 120.0)

#: A two-phase example: the default of the Phase Prompt node.
EXAMPLE_SCRIPT = PhaseScript.from_json({
    "version": 1,
    "base": "A woman in a red blazer talks to the camera in a bright studio",
    "negative": "",
    "phases": [{"start": 0.5, "end": 2.0, "text": "waves with the right hand"},
               {"start": 2.5, "end": 4.0, "text": "points down with the left hand"}],
})


# ================================================================================================ phase prompt
@dataclass(frozen=True)
class PhasePrompt:
    """What the Phase Prompt node outputs: the parsed script plus the clip's frame rate (its single source of truth)
    and, when fixed on the node, the clip duration."""

    script: PhaseScript
    fps: float = DEFAULT_FPS
    duration: float | None = None  # seconds set on the node; None: follow the audio
    audio_duration: float | None = None  # of the AUDIO connected to the node, if any (used for validation)

    @property
    def known_duration(self) -> float | None:
        return self.duration if self.duration is not None else self.audio_duration


def left_unconverted(*values: Any) -> bool:
    """True when a number widget's value is still text: ComfyUI could not convert it and already reports that on
    the input itself, so a node's own check must not report it again under its other inputs."""
    return any(isinstance(value, (str, bytes)) for value in values)


def _check_range(name: str, value: Any, low: float, high: float, fix: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a number, got {value!r}. Fix: {fix}"
    if not low <= value <= high:
        return f"{name} {value:g} is outside {low:g}..{high:g}. Fix: {fix}"
    return None


def phase_prompt_problem(phase_script: Any, duration: Any = 0.0, fps: Any = DEFAULT_FPS) -> str | None:
    """The queue-time check of the Phase Prompt node: None when valid, else the engine's message (problem + fix).

    ``duration`` 0 means "follow the audio", so the checks against the clip length wait until the audio is known.
    """
    for problem in (_check_range("duration", duration, *DURATION_RANGE, "use 0 to follow the audio, or the clip length in seconds."),
                    _check_range("fps", fps, *FPS_RANGE, "use the frame rate of the video, e.g. 24 or 25.")):
        if problem:
            return problem
    try:
        if duration:
            clip_length_check(float(fps), duration=float(duration))
        script = PhaseScript.parse(phase_script)
        script.validate(float(duration) if duration else None, float(fps))
    except (PhaseScriptError, SizeError) as exc:
        return str(exc)
    return None


def clip_length_check(fps: float, *, duration: float | None = None, audio_duration: float | None = None) -> None:
    """Refuse a clip longer than the model's rotary table holds (Wan2.2's, which every ActAvatar model keeps), from
    the duration set on the node or the connected audio's length, before any model runs."""
    from actavatar_core.limits import DEFAULT_LIMITS, check_clip

    if duration:
        frames = frames_for_duration(duration, fps)
        if frames > DEFAULT_LIMITS.max_frames:
            longest = DEFAULT_LIMITS.max_seconds(fps)
            raise ClipTooLongError(
                f"A duration of {duration:g} s ({frames} frames at {fps:g} fps) is longer than this model can make: "
                f"at most {DEFAULT_LIMITS.max_frames} frames ({longest:.1f} s at {fps:g} fps).",
                f"Set duration to at most {math.floor(longest * 10) / 10:g} s (or 0 to follow a shorter audio), or "
                "split the clip.")
    elif audio_duration is not None:
        check_clip(fps=fps, audio_seconds=audio_duration)


def frames_problem(frames: Any) -> str | None:
    """The queue-time check of the Sampler's ``frames``: 0 (follow the audio) or 4k+1 frames the model can make."""
    from actavatar_core.limits import DEFAULT_LIMITS, check_clip

    if isinstance(frames, bool) or not isinstance(frames, (int, float)) or frames != int(frames):
        return f"frames must be a whole number, got {frames!r}. Fix: use 0 to follow the audio, or 4k+1 frames."
    frames = int(frames)
    if frames == 0:
        return None
    if frames < 0:
        return (f"frames {frames} is negative. Fix: use 0 to follow the audio, or 4k+1 frames up to "
                f"{DEFAULT_LIMITS.max_frames}.")
    try:
        check_clip(fps=DEFAULT_FPS, num_frames=frames)
        latent_frame_count(frames)
    except (SizeError, PhaseScriptError) as exc:
        return str(exc)
    return None


def audio_seconds(audio: dict | None) -> float | None:
    """Length of a ComfyUI AUDIO in seconds (None without audio)."""
    if audio is None:
        return None
    try:
        samples = int(torch.as_tensor(audio["waveform"]).shape[-1])
        rate = float(audio["sample_rate"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise AudioInputError(f"The AUDIO input is not a ComfyUI audio dict ({exc.__class__.__name__}: {exc}).",
                              "Connect a LoadAudio (or another node with an AUDIO output).") from None
    if rate <= 0:
        raise AudioInputError(f"The AUDIO input has sample rate {rate!r}.", "Connect a valid audio (LoadAudio).")
    return samples / rate


def make_phase_prompt(phase_script: Any, duration: float = 0.0, fps: float = DEFAULT_FPS,
                      audio: dict | None = None) -> PhasePrompt:
    """Parse and validate a phase script (JSON or compact text) for a clip of ``duration`` seconds (0: the connected
    audio's length; without audio only the structure is checked here, the clip length at sampling)."""
    problem = _check_range("fps", fps, *FPS_RANGE, "use the frame rate of the video, e.g. 24 or 25.")
    problem = problem or _check_range("duration", duration, *DURATION_RANGE, "use 0 to follow the audio.")
    if problem:
        text, _, fix = problem.partition(" Fix: ")
        raise PhaseScriptError(text, fix or None)
    script = PhaseScript.parse(phase_script)
    seconds = audio_seconds(audio)
    fixed = float(duration) if duration and duration > 0 else None
    clip_length_check(float(fps), duration=fixed, audio_duration=seconds)
    if fixed is not None:
        clip = fixed
    elif seconds is not None:  # the clip that follows this audio: the smallest 4k+1 frames covering it
        clip = frames_for_duration(seconds, float(fps)) / float(fps)
    else:
        clip = None
    script.validate(clip, float(fps))
    return PhasePrompt(script, float(fps), fixed, seconds)


# ================================================================================================ clip length
def clip_frames(frames: int, phase_prompt: PhasePrompt, speech: SpeechFeatures | None) -> int:
    """The clip's pixel frame count (4k+1): the sampler's ``frames`` when set, else the Phase Prompt's duration when
    set, else the speech's length (the smallest 4k+1 covering it, as the command line does)."""
    fps = phase_prompt.fps
    if frames and frames > 0:
        latent_frame_count(int(frames))  # raises with "Use 45 or 49 frames"
        return int(frames)
    if phase_prompt.duration is not None:
        return frames_for_duration(phase_prompt.duration, fps)
    if speech is None:
        raise AudioInputError("The clip length is unknown: frames is 0, the Phase Prompt's duration is 0 and there "
                              "is no speech.", "Connect the speech audio, or set frames or duration.")
    from actavatar_core.pipeline import speech_clip_frames

    return speech_clip_frames(speech, fps, None)


def validate_for_clip(phase_prompt: PhasePrompt, num_frames: int, max_phases: int | None = None) -> PhaseScript:
    """The run-time check: every phase inside the clip, enough latent frames per phase, not more phases than the
    model was trained with."""
    script = phase_prompt.script.validate(num_frames / phase_prompt.fps, phase_prompt.fps)
    if max_phases is not None and len(script.phases) > max_phases:
        raise PhaseScriptError(f"The script has {len(script.phases)} phases; this model was trained with at most "
                               f"{max_phases}.", "Merge neighbouring phases or split the clip.")
    return script


def check_sizes(width: int, height: int, frames: int) -> str | None:
    """Queue-time check of the sampler's size inputs (None when valid)."""
    from actavatar_core.errors import SizeError
    from actavatar_core.vae import check_size

    try:
        check_size(int(width), int(height))
        if frames:
            latent_frame_count(int(frames))
    except (SizeError, PhaseScriptError) as exc:
        return str(exc)
    return None


# ================================================================================================ speech
#: Keys Audio Encode adds to its AUDIO_ENCODER_OUTPUT-shaped output (core's consumers ignore them).
SPEECH_KEY, AUDIO_KEY = "actavatar_speech", "audio"


def encoder_output(speech: SpeechFeatures, audio: dict | None) -> dict:
    """Audio Encode's output: encoded speech shaped like core's AUDIO_ENCODER_OUTPUT (all hidden states as a list
    of (1, T, C), the last one as ``encoded_audio``, the sample count at 16 kHz), plus the engine's
    :class:`SpeechFeatures` and the AUDIO as the user gave it (rate, channels) for the saved video."""
    layers = speech.features
    samples = speech.waveform.samples.numel() if speech.waveform is not None else round(speech.duration * SAMPLE_RATE)
    return {"encoded_audio": layers[None, :, -1], "encoded_audio_all_layers": [layers[None, :, i]
                                                                              for i in range(layers.shape[1])],
            "audio_samples": int(samples), SPEECH_KEY: speech, AUDIO_KEY: audio}


def layers_from_encoder_output(output: Any) -> tuple[torch.Tensor, float]:
    """(T, L, C) hidden states and the speech duration from core's AUDIO_ENCODER_OUTPUT."""
    if not isinstance(output, dict) or "encoded_audio_all_layers" not in output:
        raise AudioInputError("The audio input is not an AUDIO_ENCODER_OUTPUT with all layers.",
                              "Connect ActAvatar Audio Encode, or core's AudioEncoderEncode with a wav2vec2 audio "
                              "encoder.")
    layers = output["encoded_audio_all_layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise AudioInputError("The AUDIO_ENCODER_OUTPUT has no hidden states.", "Re-run AudioEncoderEncode.")
    features = features_from_layers(list(layers))
    samples = output.get("audio_samples")
    duration = float(samples) / SAMPLE_RATE if samples else features.shape[0] * 320 / SAMPLE_RATE
    return features, duration


def speech_from_encoder_output(output: Any, audio: dict | None = None) -> tuple[SpeechFeatures, dict | None]:
    """The engine's speech features and the original AUDIO from Audio Encode's output or from core's
    AUDIO_ENCODER_OUTPUT (features computed by core from the user's own wav2vec2 file; ``audio``: the same speech
    as AUDIO, checked, so the clip and the saved video carry it)."""
    from actavatar_core.pipeline import SpeechFeatures

    if isinstance(output, dict) and isinstance(output.get(SPEECH_KEY), SpeechFeatures):
        return output[SPEECH_KEY], output.get(AUDIO_KEY)
    features, duration = layers_from_encoder_output(output)
    wave = load_waveform(first_item(audio)) if audio is not None else None
    return SpeechFeatures(features, wave, wave.duration if wave is not None else duration), audio


def first_item(audio: dict) -> dict:
    """The first item of an AUDIO batch (ActAvatar makes one clip per run)."""
    if not isinstance(audio, dict) or "waveform" not in audio:
        raise AudioInputError("The audio input is not a ComfyUI AUDIO.", "Connect a LoadAudio.")
    waveform = torch.as_tensor(audio["waveform"])
    if waveform.ndim == 3:
        waveform = waveform[0]
    return {"waveform": waveform, "sample_rate": audio.get("sample_rate")}


def fit_audio(audio: dict | None, num_frames: int, fps: float, channels: int = 1) -> dict:
    """The AUDIO trimmed or zero-padded to the clip (``num_frames / fps`` s): what the video should play. Without
    audio, silence of that length (16 kHz)."""
    if audio is None:
        samples = int(math.ceil(num_frames / fps * SAMPLE_RATE - 1e-6))
        return {"waveform": torch.zeros(1, channels, samples), "sample_rate": SAMPLE_RATE}
    item = first_item(audio)
    rate = int(item["sample_rate"])
    data = fit_audio_to_video(item["waveform"].float().cpu().numpy(), rate, num_frames, fps)
    return {"waveform": torch.from_numpy(np.ascontiguousarray(data))[None], "sample_rate": rate}


# ================================================================================================ latents
def raw_latents(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """Engine (normalised) latents -> raw VAE latents, ComfyUI's LATENT convention: ``z * std + mean``."""
    from actavatar_core.vae import latent_stats

    mean, std = latent_stats(vae, latents.device)
    return latents.float() * std + mean


def normalised_latents(samples: torch.Tensor, vae: Any) -> torch.Tensor:
    """Raw VAE latents (a ComfyUI LATENT's samples) -> the engine's normalised latents."""
    from actavatar_core.vae import latent_stats

    z_dim = int(vae.config.z_dim)
    if samples.ndim != 5 or samples.shape[1] != z_dim:
        raise ImageInputError(
            f"The LATENT has shape {tuple(samples.shape)}; the Wan2.2 VAE needs (batch, {z_dim}, frames, h, w).",
            "Decode latents made by the ActAvatar Sampler or a Wan2.2 TI2V-5B sampler (48 channels).")
    mean, std = latent_stats(vae, samples.device)
    return (samples.float() - mean) / std


def preview_latent(denoised: torch.Tensor) -> torch.Tensor:
    """The latent frame a progress preview shows: the middle of the clip (frame 0 is the reference image)."""
    frames = denoised.shape[2]
    index = frames // 2 if frames > 1 else 0
    return denoised[:, :, index : index + 1]


# ================================================================================================ memory
def sampling_memory_bytes(num_latent_frames: int, latent_h: int, latent_w: int, config: Any, dtype_bytes: int) -> int:
    """Rough peak activation memory of one transformer pass (guidance passes run one after another), so ComfyUI's
    model management frees that much beside the weights: the hidden states, the FFN expansion and the attention
    projections of one block, with 50 % headroom."""
    p_t, p_h, p_w = config.patch_size
    tokens = (num_latent_frames // p_t) * (latent_h // p_h) * (latent_w // p_w)
    inner = config.num_attention_heads * config.attention_head_dim
    return int(tokens * (config.ffn_dim + 6 * inner) * dtype_bytes * 1.5)


def vae_decode_memory_bytes(latent_h: int, latent_w: int, dtype_bytes: int) -> int:
    """ComfyUI's own estimate for decoding Wan2.2 VAE latents (comfy/sd.py), which also decodes frame by frame."""
    return int(8000 * latent_h * latent_w * 16 * 16 * dtype_bytes)


def vae_encode_memory_bytes(height: int, width: int, dtype_bytes: int) -> int:
    """ComfyUI's own estimate for encoding with the Wan2.2 VAE (comfy/sd.py)."""
    return int(3300 * height * width * dtype_bytes)


# ================================================================================================ images
def reference_from_images(images: Any) -> np.ndarray:
    """The first image of a ComfyUI IMAGE batch as uint8 RGB (H, W, 3)."""
    tensor = torch.as_tensor(images)
    if tensor.ndim == 4:
        if tensor.shape[0] < 1:
            raise ImageInputError("The IMAGE input is an empty batch.", "Connect a LoadImage with the avatar picture.")
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[-1] not in (1, 3, 4):
        raise ImageInputError(f"The IMAGE input has shape {tuple(tensor.shape)}, not (batch, height, width, 3).",
                              "Connect a LoadImage (or another node with an IMAGE output).")
    if tensor.shape[-1] == 1:
        tensor = tensor.expand(*tensor.shape[:-1], 3)
    array = (tensor[..., :3].float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    return array.cpu().numpy()


def frames_to_images(frames: np.ndarray, device: Any = "cpu") -> torch.Tensor:
    """uint8 (T, H, W, 3) -> ComfyUI IMAGE float (T, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).float().div_(255.0)


def images_to_frame_chunks(images: Any, chunk: int = 16) -> Iterator[np.ndarray]:
    """A ComfyUI IMAGE batch as uint8 (t, H, W, 3) chunks (so saving a long clip never holds two full copies)."""
    tensor = torch.as_tensor(images)
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[0] == 0 or tensor.shape[-1] not in (3, 4):
        raise ImageInputError(f"The images have shape {tuple(tensor.shape)}, not (frames, height, width, 3).",
                              "Connect the frames from ActAvatar Decode or VAE Decode.")
    for start in range(0, tensor.shape[0], chunk):
        part = tensor[start : start + chunk, ..., :3]
        yield (part.float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def even_size_problem(images: Any) -> str | None:
    """H.264 (4:2:0) needs even sizes; None when the frames can be written."""
    shape = tuple(torch.as_tensor(images).shape)
    h, w = shape[-3], shape[-2]
    if h % 2 or w % 2:
        return f"The frames are {w}x{h}; H.264 needs an even width and height. Fix: crop or resize to {w - w % 2}x{h - h % 2}."
    return None


# ================================================================================================ output files
def expand_prefix(prefix: str, width: int = 0, height: int = 0, now: time.struct_time | None = None) -> str:
    """ComfyUI's filename-prefix variables (%width%, %height%, %year%, %month%, %day%, %hour%, %minute%, %second%)."""
    if "%" not in prefix:
        return prefix
    now = now or time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02d}",
              "day": f"{now.tm_mday:02d}", "hour": f"{now.tm_hour:02d}", "minute": f"{now.tm_min:02d}",
              "second": f"{now.tm_sec:02d}"}
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


def output_file(output_dir: str | Path, filename_prefix: str, width: int, height: int) -> tuple[Path, str, str]:
    """(path, file name, subfolder) of the next free ``<prefix>_NNNNN_.mp4`` inside ``output_dir``; a prefix that
    points outside the folder is refused (OutputPathError), whatever it contains."""
    root = Path(output_dir).resolve()
    path = safe_output_path(root, expand_prefix(filename_prefix, width, height), "mp4")
    subfolder = path.parent.relative_to(root).as_posix()
    return path, path.name, "" if subfolder == "." else subfolder


def prefix_problem(output_dir: str | Path, filename_prefix: Any) -> str | None:
    """The queue-time check of a saving node's ``filename_prefix``: None when a file can be written with it inside
    ``output_dir``, else the message (a prefix leaving the folder, characters no file name may hold, a folder that
    cannot be written)."""
    from actavatar_core.errors import ActAvatarError

    if not isinstance(filename_prefix, str):
        return f"filename_prefix must be text, got {filename_prefix!r}. Fix: use e.g. 'ActAvatar/ActAvatar'."
    try:
        output_file(output_dir, filename_prefix, 0, 0)
    except ActAvatarError as exc:
        return str(exc)
    return None


def make_readable(path: str | Path) -> None:
    """Give a finished output file the permissions of any new file (the atomic writer's temporary file is private,
    0600, so without this ComfyUI's other users and tools could not read the video)."""
    mask = 0o022
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    try:
        Path(path).chmod(0o666 & ~mask)
    except OSError:
        pass


def video_metadata(prompt: Any = None, extra_pnginfo: Any = None, extra: dict | None = None) -> dict:
    """MP4 metadata like core's SaveVideo: the API prompt under ``prompt`` and every extra_pnginfo entry (the UI
    workflow under ``workflow``), each JSON-encoded by the writer."""
    metadata: dict = {}
    if isinstance(extra_pnginfo, dict):
        metadata.update(extra_pnginfo)
    if prompt is not None:
        metadata["prompt"] = prompt
    metadata.update(extra or {})
    return metadata


# ================================================================================================ demo inputs
def write_demo_inputs(folder: str | Path, image_name: str, audio_name: str, overwrite: bool = False) -> list[Path]:
    """Put the example reference image (PNG) and speech (16-bit WAV) into ``folder`` (ComfyUI's input folder) under
    the names the shipped workflows use. Existing files are kept. Returns the files written."""
    from PIL import Image

    from actavatar_core.defaults import DEMO_DIR, _generated_demo_inputs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    image_path, audio_path = folder / image_name, folder / audio_name
    bundled_image, bundled_audio = DEMO_DIR / "reference.png", DEMO_DIR / "speech.wav"
    generated = None
    if overwrite or not image_path.exists():
        if bundled_image.is_file():
            data = bundled_image.read_bytes()
        else:
            generated = generated or _generated_demo_inputs()
            import io

            buffer = io.BytesIO()
            Image.fromarray(generated[0]).save(buffer, format="PNG")
            data = buffer.getvalue()
        _atomic_write(image_path, data)
        written.append(image_path)
    if overwrite or not audio_path.exists():
        if bundled_audio.is_file():
            _atomic_write(audio_path, bundled_audio.read_bytes())
        else:
            generated = generated or _generated_demo_inputs()
            audio = generated[1]
            samples = audio["waveform"].reshape(-1).float().clamp(-1, 1).numpy()
            _write_wav(audio_path, samples, int(audio["sample_rate"]))
        written.append(audio_path)
    return written


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave_module.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    tmp.replace(path)
