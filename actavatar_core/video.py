"""Reading reference images and writing (or reading back) H.264 + AAC MP4 files with PyAV.

Every file is written under a temporary name beside its target and renamed only when complete, so a failed or
cancelled run never leaves a partial video behind and never clobbers an earlier good one halfway.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import ImageInputError, OutputPathError

#: Even sizes only: H.264 with 4:2:0 chroma needs them.
_YUV_ALIGN = 2


# ------------------------------------------------------------------------------------------------ images
def load_image(source: "str | os.PathLike | np.ndarray | Any") -> np.ndarray:
    """Read a reference image as uint8 RGB (H, W, 3). Accepts a path, a PIL image or an array (HWC, uint8 or
    float in [0, 1])."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ImageInputError(f"The reference image '{path}' is a directory, not an image file.",
                                  "Give the path of a PNG, JPEG or WebP file inside it.")
        if path.exists() and not path.is_file():
            raise ImageInputError(f"The reference image '{path}' is not a regular file (a device or a pipe).",
                                  "Give the path of a PNG, JPEG or WebP file.")
        if not path.is_file():
            raise ImageInputError(f"The reference image '{path}' does not exist.", "Check the path; use a PNG, JPEG or WebP file.")
        try:
            with Image.open(path) as img:
                img.load()
                return np.asarray(img.convert("RGB"))
        except Image.DecompressionBombError as exc:
            raise ImageInputError(f"'{path.name}' is too large to be a reference image ({exc}).",
                                  "Use a picture of a few megapixels at most.") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageInputError(
                f"'{path.name}' is not an image that can be read ({exc.__class__.__name__}).",
                "Use a PNG, JPEG or WebP picture of the avatar.",
            ) from None
    if hasattr(source, "convert") and hasattr(source, "size"):
        return np.asarray(source.convert("RGB"))
    array = np.asarray(source)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ImageInputError(f"The reference image has shape {tuple(array.shape)}, not (height, width, 3).", "Pass one RGB image.")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(np.nan_to_num(array.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize and centre-crop to exactly (height, width), keeping the aspect ratio (no stretching)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.LANCZOS))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


# ------------------------------------------------------------------------------------------------ paths
def atomic_target(path: "str | os.PathLike", overwrite: bool = False) -> Path:
    """Check, without creating anything, that ``path`` can be written: it is not a folder, it does not exist unless
    ``overwrite``, and its folder exists or can be made (no part of it is a file, the nearest existing folder is
    writable). The folders are made by :class:`Mp4Writer`, and removed again when the write fails."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputPathError(f"The output path '{target}' is a folder.", "Give a file name ending in .mp4.")
    if target.exists() and not overwrite:
        raise OutputPathError(f"'{target}' already exists and would be overwritten.", "Choose another name or pass --overwrite.")
    check_writable_folder(target.parent)
    return target


def check_writable_folder(folder: "str | os.PathLike") -> None:
    """Refuse a folder that cannot be made or written: a part of it that is a file, or a nearest existing folder
    where no file can be created (tried with a temporary file, which is removed at once)."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        if existing.is_symlink():  # a dangling link cannot become a folder
            raise OutputPathError(f"The output folder '{folder}' cannot be made: '{existing}' is a broken link.",
                                  "Choose another output folder.")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"The output folder '{folder}' cannot be made: '{existing}' is a file, not a folder.",
                              "Choose another output folder, or move that file away.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".actavatar-write-check.", dir=existing)
    except OSError as exc:
        raise OutputPathError(f"The output folder '{existing}' cannot be written ({exc.strerror or exc}).",
                              "Choose a folder you can write to, or fix its permissions.") from None
    os.close(fd)
    os.unlink(probe)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first (to remove on failure)."""
    made: list[Path] = []
    current = folder
    while not current.exists():
        made.append(current)
        current = current.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_folders(made)
        raise OutputPathError(f"The output folder '{folder}' cannot be made ({exc.strerror or exc}).",
                              "Choose another output folder.") from None
    return made


def _remove_folders(made: list[Path]) -> None:
    for folder in made:  # deepest first; a folder something else wrote into meanwhile is kept
        try:
            folder.rmdir()
        except OSError:
            break


def safe_output_path(output_dir: "str | os.PathLike", filename_prefix: str, extension: str = "mp4") -> Path:
    """Next free ``<prefix>_00001.<ext>`` inside ``output_dir``; a prefix may name sub-folders but can never
    leave ``output_dir`` (absolute paths, ``..`` and drive letters are refused). Nothing is created: the writer
    makes the sub-folders, so a queue-time check can call this too."""
    root = Path(output_dir).resolve()
    prefix = (filename_prefix or "ActAvatar").replace("\\", "/").strip()
    if prefix.startswith("/") or re.match(r"^[A-Za-z]:", prefix) or any(part == ".." for part in prefix.split("/")):
        raise OutputPathError(
            f"The filename prefix '{filename_prefix}' points outside the output folder.",
            "Use a relative prefix such as 'ActAvatar' or 'video/ActAvatar' (no '..', no absolute path).",
        )
    folder = (root / prefix).parent.resolve()
    if folder != root and root not in folder.parents:
        raise OutputPathError(f"The filename prefix '{filename_prefix}' points outside the output folder.", "Use a relative prefix such as 'video/ActAvatar'.")
    stem = Path(prefix).name or "ActAvatar"
    if not re.fullmatch(r"[^\x00-\x1f<>:\"|?*]+", stem):
        raise OutputPathError(f"The filename prefix '{filename_prefix}' contains characters a file name cannot have.", "Use letters, digits, '-', '_' and spaces.")
    check_writable_folder(folder)
    pattern = re.compile(rf"^{re.escape(stem)}_(\d{{5}})_?\.{re.escape(extension)}$")
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    used = [int(m.group(1)) for m in (pattern.match(name) for name in names) if m]
    return folder / f"{stem}_{(max(used) + 1) if used else 1:05d}_.{extension}"


# ------------------------------------------------------------------------------------------------ writing
class Mp4Writer:
    """Streaming H.264 (+ AAC) writer: add frames as they are decoded, then ``close()``; an exception inside the
    ``with`` block deletes the temporary file and leaves any existing target untouched."""

    def __init__(self, path: "str | os.PathLike", fps: float, width: int, height: int, *, crf: int = 18,
                 audio: np.ndarray | None = None, sample_rate: int | None = None,
                 metadata: dict[str, Any] | None = None, overwrite: bool = True):
        import av

        if width % _YUV_ALIGN or height % _YUV_ALIGN:
            raise OutputPathError(f"H.264 needs even frame sizes, got {width}x{height}.", "Use even width and height.")
        self.path = atomic_target(path, overwrite=overwrite)
        self.fps = float(fps)
        self.width, self.height = int(width), int(height)
        self._closed = False
        self._made = _make_folders(self.path.parent)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".partial.mp4", dir=self.path.parent)
        except OSError as exc:
            _remove_folders(self._made)
            raise OutputPathError(f"The output folder '{self.path.parent}' cannot be written ({exc.strerror or exc}).",
                                  "Choose a folder you can write to.") from None
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._open(av, crf, audio, sample_rate, metadata)
        except BaseException:
            self.abort()
            raise

    def _open(self, av: Any, crf: int, audio: np.ndarray | None, sample_rate: int | None,
              metadata: dict[str, Any] | None) -> None:
        self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "use_metadata_tags"})
        for key, value in (metadata or {}).items():
            self._container.metadata[key] = value if isinstance(value, str) else json.dumps(value)
        self._rate = Fraction(round(self.fps * 1000), 1000)
        self._video = self._container.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=self._rate)
        self._video.width, self._video.height, self._video.pix_fmt = self.width, self.height, "yuv420p"
        self._video.options = {"crf": str(crf), "preset": "medium"}
        self._audio_stream = None
        self._audio = None
        if audio is not None:
            if not sample_rate:
                raise ValueError("sample_rate is required with audio")
            self._audio = np.asarray(audio, dtype=np.float32)
            self._audio = (self._audio[None] if self._audio.ndim == 1 else self._audio)[:2]
            self._sample_rate = int(sample_rate)
            self._audio_stream = self._container.add_stream("aac", rate=aac_rate(self._sample_rate))
            self._audio_stream.layout = "mono" if self._audio.shape[0] == 1 else "stereo"
        self.frames_written = 0

    def add(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames, (H, W, 3) or (T, H, W, 3)."""
        import av

        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frame shape {frames.shape[1:]} does not match the stream ({self.height}, {self.width}, 3)")
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            vf.pts = self.frames_written
            vf.time_base = 1 / self._rate
            for packet in self._video.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        """Finish the video, add the audio fitted to the video's length, and move the file into place."""
        import av

        if self.frames_written == 0:
            self.abort()
            raise ValueError("no frames were written")
        for packet in self._video.encode(None):
            self._container.mux(packet)
        if self._audio_stream is not None:
            audio = fit_audio_to_video(self._audio, self._sample_rate, self.frames_written, self.fps)
            layout = "mono" if audio.shape[0] == 1 else "stereo"
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T.reshape(1, -1)), format="flt", layout=layout)
            af.sample_rate = self._sample_rate
            af.pts = 0
            frames = [af]
            if aac_rate(self._sample_rate) != self._sample_rate:  # e.g. 192 kHz studio audio: AAC stops at 96 kHz
                resampler = av.AudioResampler(format="fltp", layout=layout, rate=aac_rate(self._sample_rate))
                frames = resampler.resample(af) + resampler.resample(None)
            for frame in frames:
                for packet in self._audio_stream.encode(frame):
                    self._container.mux(packet)
            for packet in self._audio_stream.encode(None):
                self._container.mux(packet)
        self._container.close()
        self._closed = True
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp made it private; the finished video gets normal permissions
        os.replace(self._tmp, self.path)
        self._made = []  # the folders hold the finished video now
        return self.path

    def abort(self) -> None:
        """Throw the partial file away, and the folders this writer made for it."""
        if not self._closed:
            container = getattr(self, "_container", None)
            try:
                if container is not None:
                    container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away anyway
                pass
            self._closed = True
        self._tmp.unlink(missing_ok=True)
        _remove_folders(self._made)
        self._made = []

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


#: The sample rates an AAC stream can have (MPEG-4 sampling frequency table).
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def aac_rate(rate: int) -> int:
    """The AAC rate the audio track is written at: the speech's own rate when AAC has it, else the next higher one
    (96 kHz at most), so nothing audible is lost."""
    return next((r for r in AAC_RATES if r >= rate), AAC_RATES[-1])


def fit_audio_to_video(audio: np.ndarray, sample_rate: int, num_frames: int, fps: float) -> np.ndarray:
    """Trim or zero-pad (channels, samples) audio to exactly the video's length, ``num_frames / fps`` seconds."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    target = int(math.ceil(num_frames / fps * sample_rate - 1e-6))
    if audio.shape[1] >= target:
        return audio[:, :target]
    return np.pad(audio, ((0, 0), (0, target - audio.shape[1])))


def speech_track(source: Any, fallback: Any = None) -> tuple[np.ndarray | None, int | None]:
    """The speech as it was given, for the MP4's audio track: float32 (channels, samples) at its own sample rate.

    ``source`` is what the user passed as audio: a file path (decoded again, all channels at the file's rate) or a
    ComfyUI AUDIO dict. Anything else (a bare array) gives ``fallback``, the pipeline's fitted 16 kHz mono
    waveform (an object with ``samples`` and ``sample_rate``). The writer fits the track to the clip's length."""
    if isinstance(source, (str, os.PathLike)):
        from .audio import decode_audio_file

        return decode_audio_file(source)
    if isinstance(source, dict) and "waveform" in source and source.get("sample_rate"):
        wave = source["waveform"]
        wave = wave.detach().float().cpu().numpy() if hasattr(wave, "detach") else np.asarray(wave, np.float32)
        wave = wave[0] if wave.ndim == 3 else wave
        return np.ascontiguousarray(wave, dtype=np.float32), int(source["sample_rate"])
    if fallback is None:
        return None, None
    return fallback.samples.detach().float().cpu().numpy()[None], int(fallback.sample_rate)


def write_mp4(path: "str | os.PathLike", frames: "np.ndarray | Iterable[np.ndarray]", fps: float,
              audio: np.ndarray | None = None, sample_rate: int | None = None, *,
              metadata: dict[str, Any] | None = None, overwrite: bool = True, crf: int = 18) -> Path:
    """Write uint8 RGB frames ((T, H, W, 3) array, or an iterable of (H, W, 3) / (t, H, W, 3) chunks) and optional
    float audio (channels, samples) to an H.264 + AAC MP4, atomically."""
    iterator: Iterator[np.ndarray] = iter([frames]) if isinstance(frames, np.ndarray) else iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no frames to write")
    first = np.asarray(first)
    h, w = first.shape[-3], first.shape[-2]
    with Mp4Writer(path, fps, w, h, audio=audio, sample_rate=sample_rate, metadata=metadata, overwrite=overwrite,
                   crf=crf) as writer:
        writer.add(first)
        for chunk in iterator:
            writer.add(chunk)
        return writer.close()


# ------------------------------------------------------------------------------------------------ reading
def read_video(path: "str | os.PathLike") -> tuple[np.ndarray, float, np.ndarray | None, int | None]:
    """Decode an MP4: (frames uint8 (T, H, W, 3), fps, audio float32 (channels, samples) or None, sample rate)."""
    import av

    with av.open(str(path)) as container:
        vstream = container.streams.video[0]
        fps = float(vstream.average_rate or vstream.guessed_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(vstream)]
    audio, rate = None, None
    with av.open(str(path)) as container:
        if container.streams.audio:
            astream = container.streams.audio[0]
            rate = astream.rate
            chunks = []
            for f in container.decode(astream):
                arr = f.to_ndarray()
                if f.format.is_planar:
                    chunks.append(arr.astype(np.float32))
                else:
                    chunks.append(arr.reshape(-1, len(f.layout.channels)).T.astype(np.float32))
            audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    return np.stack(frames), fps, audio, rate


def probe_video(path: "str | os.PathLike") -> dict[str, Any]:
    """Stream facts without decoding every frame: frame count, fps, size, durations, codecs, metadata."""
    import av

    with av.open(str(path)) as container:
        v = container.streams.video[0]
        info: dict[str, Any] = {
            "video_codec": v.codec_context.name, "width": v.width, "height": v.height,
            "fps": float(v.average_rate or v.guessed_rate), "frames": v.frames or sum(1 for _ in container.decode(v)),
            "metadata": dict(container.metadata),
        }
        info["video_duration"] = info["frames"] / info["fps"]
    with av.open(str(path)) as container:
        if container.streams.audio:
            a = container.streams.audio[0]
            samples = sum(f.samples for f in container.decode(a))
            info.update(audio_codec=a.codec_context.name, sample_rate=a.rate, audio_duration=samples / a.rate,
                        audio_channels=a.codec_context.channels)
    return info
