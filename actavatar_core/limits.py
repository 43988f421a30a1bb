"""The longest and largest clip a model can make, read from its config, and the check that refuses more.

Why: diffusers' ``WanRotaryPosEmbed`` holds a table of ``rope_max_seq_len`` positions (1024 for every Wan2.2
release) per axis: latent frames, token rows and token columns. A clip with more latent frames than that does not
fail cleanly: it dies deep inside the rotary embedding after the audio and text have been encoded. So the limit is
computed from the model's own config and checked before anything loads or runs:

* frames: ``rope_max_seq_len * patch_t`` latent frames, i.e. ``4 * (1024 - 1) + 1 = 4093`` pixel frames
  (163.7 s at 25 fps);
* width and height: ``rope_max_seq_len * patch`` tokens of ``VAE stride x patch`` pixels (32768 px for Wan2.2).

The other candidates were checked and set no hard limit: wav2vec2's positions are a convolution, umT5's are
relative buckets (the 512-token prompt bound is the phase script's), the VAE streams frames causally, and an
audio rate AAC lacks is resampled by the MP4 writer.

``check_clip`` raises :class:`ClipTooLongError` / :class:`~actavatar_core.errors.SizeError` with the longest clip at
the chosen fps and what to do. ``MAX_FRAMES`` and ``MAX_SIZE_PX`` are the limits of the Wan2.2 config every
shipped model uses (the node widgets' maxima).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ClipTooLongError, SizeError
from .phases import VAE_TEMPORAL_STRIDE, frames_for_duration, pixel_frame_count


#: ``rope_max_seq_len`` of every Wan2.2 config, and diffusers' default for it (a test keeps the two equal); a
#: constant so that importing this module (the node widgets do) needs neither torch nor diffusers.
WAN_ROPE_POSITIONS = 1024


@dataclass(frozen=True)
class ClipLimits:
    """Hard limits of one model: rotary positions per axis, the transformer patch and the VAE strides."""

    rope_positions: int = WAN_ROPE_POSITIONS
    patch: tuple[int, int, int] = (1, 2, 2)
    vae_spatial: int = 16
    vae_temporal: int = VAE_TEMPORAL_STRIDE

    @property
    def max_latent_frames(self) -> int:
        return self.rope_positions * self.patch[0]

    @property
    def max_frames(self) -> int:
        """Longest clip in pixel frames (4k+1)."""
        return pixel_frame_count(self.max_latent_frames)

    @property
    def size_step(self) -> int:
        """Pixels per token side: width and height must be multiples of this."""
        return self.vae_spatial * self.patch[1]

    @property
    def max_height(self) -> int:
        return self.rope_positions * self.patch[1] * self.vae_spatial

    @property
    def max_width(self) -> int:
        return self.rope_positions * self.patch[2] * self.vae_spatial

    def max_seconds(self, fps: float) -> float:
        return self.max_frames / fps

    @classmethod
    def from_configs(cls, transformer: dict[str, Any] | None, vae: dict[str, Any] | None = None) -> "ClipLimits":
        """From a transformer config (``rope_max_seq_len``, ``patch_size``) and a VAE config
        (``scale_factor_spatial``); missing entries take diffusers' / Wan2.2's values."""
        transformer, vae = transformer or {}, vae or {}
        patch = transformer.get("patch_size") or (1, 2, 2)
        patch = tuple(int(p) for p in patch) if isinstance(patch, (list, tuple)) and len(patch) == 3 else (1, 2, 2)
        rope = transformer.get("rope_max_seq_len") or WAN_ROPE_POSITIONS
        return cls(int(rope), patch, int(vae.get("scale_factor_spatial") or 16),
                   int(vae.get("scale_factor_temporal") or VAE_TEMPORAL_STRIDE))


#: Limits of the Wan2.2 TI2V-5B config (and of the mini and tiny models, which keep its rope table and strides).
DEFAULT_LIMITS = ClipLimits()
#: The node widgets' maximum frame count (4093 = 4 * 1023 + 1).
MAX_FRAMES = DEFAULT_LIMITS.max_frames
#: The node widgets' maximum width/height in pixels.
MAX_SIZE_PX = min(DEFAULT_LIMITS.max_width, DEFAULT_LIMITS.max_height)


def limits_of(models: Any) -> ClipLimits:
    """The limits of loaded models (an ``ActAvatarModels`` or anything with ``.transformer`` and ``.vae``)."""
    transformer = getattr(models, "transformer", None)
    vae = getattr(models, "vae", None)
    return ClipLimits.from_configs(dict(getattr(transformer, "config", {}) or {}),
                                   dict(getattr(vae, "config", {}) or {}))


def limits_for_folder(folder: "str | os.PathLike[str]") -> ClipLimits:
    """The limits of an ActAvatar model folder, read from its configs without loading a tensor: the diffusers
    ``transformer/config.json`` + ``vae/config.json``, or the ``model_config`` metadata of the exported single
    files (``layout: comfyui-files``). Whatever cannot be read takes the Wan2.2 values."""
    folder = Path(folder)
    transformer: dict[str, Any] = {}
    vae: dict[str, Any] = {}
    try:
        index = json.loads((folder / "actavatar_model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and index.get("layout") == "comfyui-files":
        files = folder / str(index.get("files", "comfyui"))
        transformer = _metadata_config(files / "diffusion_models")
        vae = _metadata_config(files / "vae")
    else:
        transformer = _json_config(folder / "transformer" / "config.json")
        vae = _json_config(folder / "vae" / "config.json")
    return ClipLimits.from_configs(transformer, vae)


def _json_config(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _metadata_config(folder: Path) -> dict[str, Any]:
    """``model_config`` from the safetensors header of the first file in ``folder`` (no tensor is read)."""
    try:
        from safetensors import safe_open

        first = sorted(folder.glob("*.safetensors"))[0]
        with safe_open(str(first), framework="pt") as handle:
            value = json.loads((handle.metadata() or {}).get("model_config", "{}"))
    except Exception:  # noqa: BLE001 - unreadable files are refused by the loaders with their own message
        return {}
    return value if isinstance(value, dict) else {}


def audio_seconds(source: Any) -> float | None:
    """The speech's length in seconds without decoding it (container metadata of a file; the shape of a ComfyUI
    AUDIO dict), or None when it cannot be told cheaply (the clip is then checked once the audio is decoded)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            import av

            with av.open(str(source)) as container:
                if not container.streams.audio:
                    return None
                stream = container.streams.audio[0]
                if stream.duration is not None and stream.time_base is not None:
                    return float(stream.duration * stream.time_base)
                return float(container.duration) / 1_000_000 if container.duration else None
        if isinstance(source, dict) and "waveform" in source and source.get("sample_rate"):
            rate = float(source["sample_rate"])
            return float(source["waveform"].shape[-1]) / rate if rate > 0 else None
    except Exception:  # noqa: BLE001 - unreadable audio is refused with its own message by the audio decoder
        return None
    return None


def clip_frames(num_frames: int | None, audio_seconds: float | None, fps: float) -> int | None:
    """The clip's pixel frames: fixed by the caller, else the smallest 4k+1 covering the audio (None: unknown)."""
    if num_frames is not None:
        return int(num_frames)
    if audio_seconds is None or not math.isfinite(audio_seconds) or not math.isfinite(fps) or fps <= 0:
        return None
    return frames_for_duration(audio_seconds, fps)


def check_clip(*, fps: float, num_frames: int | None = None, audio_seconds: float | None = None,
               width: int | None = None, height: int | None = None, limits: ClipLimits = DEFAULT_LIMITS) -> None:
    """Refuse a clip longer or larger than the model's rotary table holds, before any model runs.

    ``num_frames`` is the fixed frame count (None: follow ``audio_seconds``)."""
    frames = clip_frames(num_frames, audio_seconds, fps)
    if frames is not None and frames > limits.max_frames:
        longest = limits.max_seconds(fps)
        if num_frames is not None:
            problem = f"{frames} frames is longer than this model can make: at most {limits.max_frames} frames"
        else:
            problem = (f"The audio is {audio_seconds:.1f} s long ({frames} frames at {fps:g} fps), longer than this "
                       f"model can make: at most {limits.max_frames} frames")
        raise ClipTooLongError(
            f"{problem} ({longest:.1f} s at {fps:g} fps; its rotary position table holds "
            f"{limits.max_latent_frames} latent frames).",
            f"Use at most {limits.max_frames} frames (--frames, or the frames input of the Sampler node)."
            if num_frames is not None else
            f"Use audio of at most {math.floor(longest * 10) / 10:g} s (cut it into parts), or fix the clip length "
            f"with --frames {limits.max_frames} or fewer (the frames input of the Sampler node); the audio is then "
            "trimmed to the clip.")
    for name, value, most in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if value is not None and value > most:
            raise SizeError(f"A {name} of {value} px is larger than this model can make (at most {most} px: its "
                            f"rotary table holds {limits.rope_positions} positions per axis).",
                            f"Use a {name} of at most {most} px, e.g. 704x1280.")
