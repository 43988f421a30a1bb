"""``actavatar generate`` and ``actavatar demo``.

Every input is checked before a model loads (:func:`check_inputs`), so a typo costs a second, not the 10-40 s of
loading or the minutes of sampling; each failure is one "problem. Fix: ..." line and exit code 2. SIGTERM (a job
scheduler, ``timeout``, ``docker stop``) stops a run like Ctrl+C: no partial file, no folder it made, exit code 143.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import ActAvatarError, AudioInputError, CliInputError, GenerationCancelled, PhaseScriptError
from .phases import DEFAULT_FPS, MAX_BASE_TEXT

#: Ranges of the numeric options (the Sampler node's widgets use the same ones).
STEPS_RANGE = (1, 1000)
CFG_RANGE = (0.0, 30.0)
SHIFT_RANGE = (0.01, 100.0)
FEATHER_RANGE = (0.0, 8.0)
RELAY_WIDTH_RANGE = (0.05, 64.0)
FPS_RANGE = (1.0, 120.0)
SEED_RANGE = (0, 2**64 - 1)
#: A phase script file larger than this is not a phase script.
MAX_PHASE_FILE_BYTES = 1 << 20


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is an rc-2 message in the project's "problem. Fix: ..." form, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliInputError(f"{message[:1].upper()}{message[1:]}.", f"Run '{self.prog} --help' for the options.")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def _parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"actavatar {command}", description=(
        "Generate a talking-avatar MP4 that speaks the audio and performs each phase's action in its window."
        if command == "generate" else
        "Generate the bundled example (reference image, speech and phase script) with the embedded default model."))
    if command == "generate":
        p.add_argument("--image", required=True, help="reference portrait (PNG/JPEG/WebP)")
        p.add_argument("--audio", required=True, help="speech recording (WAV/MP3/FLAC/OGG/M4A/MP4)")
        p.add_argument("--phases", required=True,
                       help="phase script: a JSON file, a JSON string, or compact text 'base | 0-2s: waves | 2-4s: "
                            "points down' (a value that looks like a path, *.json/*.txt or with a '/', must exist)")
    p.add_argument("--out", default=None if command == "generate" else "actavatar_demo.mp4", required=command == "generate",
                   help="output MP4 path (its folders are made when the video is written)")
    p.add_argument("--model-dir", default=None, help="ActAvatar model folder (default: the bundled mini model)")
    p.add_argument("--steps", type=_whole, default=None, help=f"sampling steps, {STEPS_RANGE[0]}..{STEPS_RANGE[1]} (paper: 40)")
    p.add_argument("--seed", type=_whole, default=0, help="0..2^64-1")
    p.add_argument("--fps", type=_number, default=None, help=f"frame rate (paper: {DEFAULT_FPS:g})")
    p.add_argument("--width", type=_whole, default=None, help="multiple of 32")
    p.add_argument("--height", type=_whole, default=None, help="multiple of 32")
    p.add_argument("--frames", type=_whole, default=None,
                   help="frame count 4k+1 (default: follow the audio); longer audio is trimmed to the clip")
    p.add_argument("--paca-mode", choices=["global", "learned", "routed", "relay"], default=None)
    p.add_argument("--relay-width", type=_number, default=None,
                   help="relay mode: width of the soft routing's penalty, in latent frames (default: the model's, else 2)")
    p.add_argument("--feather", type=_number, default=0.0, help="routed mode: latent frames of soft blend at phase boundaries")
    p.add_argument("--text-cfg", type=_number, default=None)
    p.add_argument("--audio-cfg", type=_number, default=None)
    p.add_argument("--phase-cfg", type=_number, default=None,
                   help="phase guidance: extra push towards the phases' actions (0 turns it off; one more pass per step)")
    p.add_argument("--shift", type=_number, default=None)
    p.add_argument("--sampler", choices=["unipc", "euler"], default="unipc")
    p.add_argument("--negative", default=None, help="negative prompt (default: the script's, else Wan's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--smoke", action="store_true", help="use tiny random models (pipeline check, output is noise)")
    p.add_argument("--memory-mode", choices=["auto", "full", "fp8", "offload", "fp8-offload"], default="auto",
                   help="how the models sit in device memory (actavatar_core.memory): auto picks from the free GPU "
                        "memory; fp8 stores weights in fp8; offload streams the transformer's blocks from the CPU")
    p.add_argument("--context-parallel", choices=["ulysses", "ring"], default="ulysses",
                   help="under torchrun with several processes: how diffusers splits the video tokens across GPUs")
    return p


# ------------------------------------------------------------------------------------------------ SIGTERM
class Terminated(BaseException):
    """SIGTERM arrived; raised in the main thread so every ``finally`` and writer abort runs, as for Ctrl+C."""


@contextlib.contextmanager
def _sigterm_stops_the_run() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str]) -> int:
    """Run ``generate`` or ``demo``: 0 on success, 2 for bad input (one message, no traceback), 130 for Ctrl+C or a
    cancel, 143 for SIGTERM."""
    command, rest = argv[0], argv[1:]
    with _sigterm_stops_the_run():
        try:
            try:
                args = _parser(command).parse_args(rest)
            except SystemExit as exc:  # --help
                return int(exc.code or 0)
            try:
                inputs = check_inputs(command, args)
            except OSError as exc:  # a path the system refuses outright (too long, a loop of links, no permission)
                where = f"The path '{exc.filename}'" if exc.filename else "A path given"
                raise CliInputError(f"{where} cannot be used ({exc.strerror or exc}).",
                                    "Check the path: its length, its permissions, that its disk is mounted.") from None
            return _run(command, args, inputs)
        except ActAvatarError as exc:
            print(f"actavatar {command}: {exc}", file=sys.stderr)
            return 2
        except GenerationCancelled as exc:
            print(f"actavatar {command}: {exc}", file=sys.stderr)
            return 130
        except Terminated:
            print(f"actavatar {command}: stopped by SIGTERM; no file was written.", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print(f"actavatar {command}: interrupted; no file was written.", file=sys.stderr)
            return 130


# ------------------------------------------------------------------------------------------------ checks
@dataclass
class CheckedInputs:
    """What :func:`check_inputs` read and checked; ``_run`` uses these instead of re-reading the files."""

    image: Any
    audio: Any
    phases: Any
    defaults: dict
    num_frames: int | None
    width: int
    height: int
    fps: float


def _show(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _in_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise CliInputError(f"{name} {_show(value)} is outside {_show(low)}..{_show(high)}.",
                            f"Give {name} a value from {_show(low)} to {_show(high)}.")


def _model_source(args: argparse.Namespace) -> tuple[Path | None, dict]:
    """(model folder or None for the tiny smoke models, generation defaults), read without loading a tensor."""
    from . import loading
    from .defaults import MINI_MODEL_DIR, SMOKE_DEFAULTS, mini_model_available

    if args.model_dir:
        folder = Path(args.model_dir).expanduser()
        index = loading.check_model_folder(folder)
    elif args.smoke or not mini_model_available():
        return None, dict(SMOKE_DEFAULTS)
    else:
        folder = MINI_MODEL_DIR
        index = loading.check_model_folder(folder)
    info = index.get("info") if isinstance(index.get("info"), dict) else {}
    defaults = info.get("defaults") if isinstance(info.get("defaults"), dict) else {}
    return folder, dict(defaults)


def _check_device(device: str) -> None:
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliInputError(f"--device '{device}' is not a device name.", "Use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliInputError(f"--device {device} asks for a CUDA GPU, but none is available here.",
                                "Use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).",
                                f"Use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CliInputError(f"--device {device} is not available here.", "Use --device cpu (or auto).")
    elif dev.type != "cpu":
        raise CliInputError(f"--device {device} is not supported.", "Use auto, cpu, cuda or cuda:N.")


def _looks_like_path(value: str) -> bool:
    """The ``--phases`` rule: a value that looks like a file name (ends in .json/.txt, or names a folder with a
    path separator) is a file, and must exist; JSON text, compact text with '|' or a time anchor are scripts."""
    text = value.strip()
    if not text or text[0] in "{[" or "|" in text or "\n" in text:
        return False
    if re.match(r"^\s*\[?\s*[0-9.]+\s*s?\s*(?:-|\u2013|to)", text):  # '0-2s: waves/points' is compact text
        return False
    if Path(text).suffix.lower() in (".json", ".txt"):
        return True
    return "/" in text or os.sep in text or (os.altsep or "/") in text or Path(text).is_file()


def read_phases(value: str) -> str:
    """The phase script text: the file's contents when ``value`` looks like a path (which must then exist and be
    UTF-8 text), else ``value`` itself."""
    if not _looks_like_path(value):
        return value
    path = Path(value.strip()).expanduser()
    text_fix = ("Check the path. To pass the script itself, write JSON ('{\"version\": 1, ...}') or the compact form "
                "'base | 0-2s: action'.")
    if path.is_dir():
        raise PhaseScriptError(f"The phase script '{value}' is a directory, not a file.", text_fix)
    if path.exists() and not path.is_file():
        raise PhaseScriptError(f"The phase script '{value}' is not a regular file (a device or a pipe).", text_fix)
    if not path.is_file():
        raise PhaseScriptError(f"The phase script file '{value}' does not exist.", text_fix)
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_PHASE_FILE_BYTES else None
    except OSError as exc:
        raise PhaseScriptError(f"The phase script file '{value}' cannot be read ({exc.strerror or exc}).",
                               "Check its permissions.") from None
    if data is None:
        raise PhaseScriptError(f"The phase script file '{value}' is larger than {MAX_PHASE_FILE_BYTES >> 20} MB; "
                               "it is not a phase script.", "Point --phases at the phase script's JSON or text file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PhaseScriptError(f"The phase script file '{value}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                               f"position {exc.start}).", "Save it as UTF-8 (any editor's 'Save as' offers it).") from None


def _read_audio(source: Any) -> Any:
    """A path is decoded once here (all channels, its own rate) and handed on as a ComfyUI-style AUDIO dict, so the
    MP4 keeps the original speech and the file is not decoded twice."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    import torch

    from .audio import decode_audio_file

    if Path(source).is_dir():
        raise AudioInputError(f"The audio file '{source}' is a directory, not an audio file.",
                              "Give the path of a WAV, MP3, FLAC, OGG, M4A or MP4 file inside it.")
    if Path(source).exists() and not Path(source).is_file():
        raise AudioInputError(f"The audio file '{source}' is not a regular file (a device or a pipe).",
                              "Give the path of a WAV, MP3, FLAC, OGG, M4A or MP4 file.")
    data, rate = decode_audio_file(source)
    return {"waveform": torch.from_numpy(data)[None], "sample_rate": rate}


def check_inputs(command: str, args: argparse.Namespace) -> CheckedInputs:
    """Check every option and input before any model loads; raise an :class:`ActAvatarError` on the first problem."""
    from .audio import load_waveform
    from .limits import DEFAULT_LIMITS, audio_seconds, check_clip, limits_for_folder
    from .phases import PhaseScript, frames_for_duration, latent_frame_count
    from .sampling import check_schedule
    from .vae import check_size
    from .video import atomic_target, load_image

    # options that need nothing else
    _in_range("--steps", args.steps, *STEPS_RANGE)
    _in_range("--seed", args.seed, *SEED_RANGE)
    for name in ("text_cfg", "audio_cfg", "phase_cfg"):
        _in_range(f"--{name.replace('_', '-')}", getattr(args, name), *CFG_RANGE)
    _in_range("--shift", args.shift, *SHIFT_RANGE)
    _in_range("--feather", args.feather, *FEATHER_RANGE)
    _in_range("--relay-width", args.relay_width, *RELAY_WIDTH_RANGE)
    _in_range("--fps", args.fps, *FPS_RANGE)
    for name in ("width", "height", "frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliInputError(f"--{name} {value} is not a positive number.",
                                "Leave --frames out to follow the audio." if name == "frames" else "Use e.g. 704x1280.")
    if args.frames is not None:
        latent_frame_count(args.frames)
    if args.negative is not None and len(args.negative) > MAX_BASE_TEXT:
        raise CliInputError(f"--negative has {len(args.negative)} characters, more than {MAX_BASE_TEXT}.", "Shorten it.")
    _check_device(args.device)

    # the model: its files are safe to load, its limits and defaults (no tensor is read)
    folder, defaults = _model_source(args)
    limits = limits_for_folder(folder) if folder is not None else DEFAULT_LIMITS
    pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)  # noqa: E731
    width, height = int(pick(args.width, "width", 704)), int(pick(args.height, "height", 1280))
    fps = float(pick(args.fps, "fps", DEFAULT_FPS))
    _in_range("The frame rate", fps, *FPS_RANGE)
    _in_range("The step count", pick(args.steps, "steps", 40), *STEPS_RANGE)
    check_schedule(args.sampler, float(pick(args.shift, "shift", 5.0)), int(pick(args.steps, "steps", 40)))
    check_size(width, height, limits.size_step)
    check_clip(fps=fps, num_frames=args.frames, width=width, height=height, limits=limits)

    # the output: a writable place, not an existing file (nothing is created yet)
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".mp4":
        raise CliInputError(f"--out '{args.out}' does not end in .mp4; ActAvatar writes H.264 + AAC MP4 files.",
                            f"Name it e.g. '{out.with_suffix('.mp4').name}'.")
    atomic_target(out, overwrite=args.overwrite or command == "demo")

    # the inputs: readable, the clip within the model's limits, the phase script valid for the clip
    if command == "demo":
        from .defaults import demo_inputs

        image, audio, phases = demo_inputs()
    else:
        image, audio, phases = args.image, args.audio, read_phases(args.phases)
    script = PhaseScript.parse(phases)
    script.validate(duration=None, fps=fps)
    image = load_image(image)
    check_clip(fps=fps, num_frames=args.frames, audio_seconds=audio_seconds(audio), limits=limits)
    audio = _read_audio(audio)
    check_clip(fps=fps, num_frames=args.frames, audio_seconds=audio_seconds(audio), limits=limits)  # no header
    wave = load_waveform(audio)
    check_clip(fps=fps, num_frames=args.frames, audio_seconds=wave.duration, limits=limits)
    clip_frames = args.frames if args.frames is not None else frames_for_duration(wave.duration, fps)
    script.validate(duration=clip_frames / fps, fps=fps)
    return CheckedInputs(image, audio, phases, defaults, args.frames, width, height, fps)


# ------------------------------------------------------------------------------------------------ the run
def _apply_memory_mode(models: Any, args: argparse.Namespace, inputs: CheckedInputs, device: Any, rank: int,
                       mode: str) -> None:
    """Put the models in ``mode`` (:func:`actavatar_core.memory.apply_memory_mode`), counting this clip's own
    activations when ``auto`` fits a mode to the free memory; rank 0 prints the mode and any fallback."""
    from .audio import load_waveform
    from .memory import activation_bytes, apply_memory_mode
    from .model import compute_dtype
    from .phases import frames_for_duration

    frames = inputs.num_frames or frames_for_duration(load_waveform(inputs.audio).duration, inputs.fps)
    acts = activation_bytes(models.transformer.config, models.vae.config, width=inputs.width, height=inputs.height,
                            frames=frames, itemsize=compute_dtype(models.transformer).itemsize)
    apply_memory_mode(models, mode, device, activations=acts,
                      log=(lambda line: print(line, flush=True)) if rank == 0 else None)


def _run(command: str, args: argparse.Namespace, inputs: CheckedInputs) -> int:
    from tqdm import tqdm

    from .bundle import load_model_folder
    from .defaults import load_default_models, resolve_device
    from .parallel import distributed_env, enable_context_parallel, init_distributed, shutdown_distributed
    from .pipeline import ActAvatarPipeline, GenerationRequest
    from .sampling import SamplingOptions

    rank, world = 0, distributed_env()[2]
    if world > 1:
        rank, _, world, cp_device = init_distributed()
        if args.device == "auto":
            args.device = str(cp_device)
    device, dtype = resolve_device(args.device, args.dtype)
    if world > 1 and args.memory_mode not in ("auto", "full"):
        raise CliInputError(f"--memory-mode {args.memory_mode} is not combined with context parallelism.",
                            "Leave --memory-mode at auto or full under torchrun.")
    started = time.time()
    # Only "full" loads straight onto a GPU: auto and the lean modes place each model after it is known to fit.
    load_device = device if args.memory_mode == "full" or str(device).split(":")[0] != "cuda" else "cpu"
    if args.model_dir:
        models = load_model_folder(args.model_dir, device=load_device, dtype=dtype)
        defaults = models.info.get("defaults", {})
    else:
        models, defaults = load_default_models(device=load_device, dtype=dtype, smoke=args.smoke)
    label = models.info.get("name", "model")
    _apply_memory_mode(models, args, inputs, device, rank, "full" if world > 1 else args.memory_mode)
    if world > 1:
        enable_context_parallel(models.transformer, world, args.context_parallel)
    if rank == 0:
        print(f"model: {label} ({'loaded' if args.model_dir else 'embedded default'}) on {device}"
              + (f", context parallel ({args.context_parallel}) over {world} processes" if world > 1 else ""),
              flush=True)
    pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)  # noqa: E731
    options = SamplingOptions(
        steps=pick(args.steps, "steps", 40), text_cfg=pick(args.text_cfg, "text_cfg", 5.0),
        audio_cfg=pick(args.audio_cfg, "audio_cfg", 5.0), shift=pick(args.shift, "shift", 5.0), sampler=args.sampler,
        seed=args.seed, paca_mode=pick(args.paca_mode, "paca_mode", "learned"), feather=args.feather,
        relay_width=float(pick(args.relay_width, "relay_width", 2.0)),
        phase_cfg=pick(args.phase_cfg, "phase_cfg", 0.0))
    request = GenerationRequest(image=inputs.image, audio=inputs.audio, phases=inputs.phases, width=inputs.width,
                                height=inputs.height, fps=inputs.fps, num_frames=inputs.num_frames,
                                negative=pick(args.negative, "negative", None), options=options)
    bar = tqdm(total=options.steps, desc="sampling", unit="step", disable=rank != 0)

    def on_step(info: Any) -> None:
        bar.update(1)

    try:
        pipeline = ActAvatarPipeline(models)
        if rank != 0:  # the other ranks only help the transformer; rank 0 decodes and writes
            pipeline.generate_latents(request, on_step=on_step)
            return 0
        result = pipeline.generate_to_file(request, args.out, overwrite=args.overwrite or command == "demo",
                                           on_step=on_step)
    finally:
        bar.close()
        if world > 1:
            shutdown_distributed()
    frames = result.audio.num_frames
    print(f"wrote {result.path} ({frames} frames, {request.width}x{request.height}, {request.fps:g} fps, "
          f"{frames / request.fps:.2f} s) in {time.time() - started:.1f} s")
    if models.info.get("smoke"):
        print("note: this was a SMOKE RUN with tiny random weights; the video is noise by design.")
    return 0
