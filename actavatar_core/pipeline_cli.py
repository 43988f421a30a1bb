"""``actavatar generate`` and ``actavatar demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ActAvatarError, GenerationCancelled
from .phases import DEFAULT_FPS


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"actavatar {command}", description=(
        "Generate a talking-avatar MP4 that speaks the audio and performs each phase's action in its window."
        if command == "generate" else
        "Generate the bundled example (reference image, speech and phase script) with the embedded default model."))
    if command == "generate":
        p.add_argument("--image", required=True, help="reference portrait (PNG/JPEG/WebP)")
        p.add_argument("--audio", required=True, help="speech recording (WAV/MP3/FLAC/OGG/M4A/MP4)")
        p.add_argument("--phases", required=True,
                       help="phase script: a JSON file, a JSON string, or compact text 'base | 0-2s: waves | 2-4s: points down'")
    p.add_argument("--out", default=None if command == "generate" else "actavatar_demo.mp4", required=command == "generate",
                   help="output MP4 path")
    p.add_argument("--model-dir", default=None, help="ActAvatar model folder (default: the bundled mini model)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (paper: 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=None, help=f"frame rate (paper: {DEFAULT_FPS:g})")
    p.add_argument("--width", type=int, default=None, help="multiple of 32")
    p.add_argument("--height", type=int, default=None, help="multiple of 32")
    p.add_argument("--frames", type=int, default=None, help="frame count 4k+1 (default: follow the audio)")
    p.add_argument("--paca-mode", choices=["global", "learned", "routed"], default=None)
    p.add_argument("--feather", type=float, default=0.0, help="routed mode: latent frames of soft blend at phase boundaries")
    p.add_argument("--text-cfg", type=float, default=None)
    p.add_argument("--audio-cfg", type=float, default=None)
    p.add_argument("--phase-cfg", type=float, default=None,
                   help="phase guidance: extra push towards the phases' actions (0 turns it off; one more pass per step)")
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--sampler", choices=["unipc", "euler"], default="unipc")
    p.add_argument("--negative", default=None, help="negative prompt (default: the script's, else Wan's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--smoke", action="store_true", help="use tiny random models (pipeline check, output is noise)")
    p.add_argument("--context-parallel", choices=["ulysses", "ring"], default="ulysses",
                   help="under torchrun with several processes: how diffusers splits the video tokens across GPUs")
    return p


def _read_phases(value: str) -> str:
    path = Path(value)
    if len(value) < 4096 and path.suffix.lower() in (".json", ".txt") and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    args = _parser(command).parse_args(rest)
    try:
        return _run(command, args)
    except ActAvatarError as exc:
        print(f"actavatar {command}: {exc}", file=sys.stderr)
        return 2
    except GenerationCancelled as exc:
        print(f"actavatar {command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"actavatar {command}: interrupted; no file was written.", file=sys.stderr)
        return 130


def _run(command: str, args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .defaults import demo_inputs, load_default_models, resolve_device
    from .bundle import load_model_folder
    from .pipeline import ActAvatarPipeline, GenerationRequest
    from .sampling import SamplingOptions

    from .parallel import distributed_env, enable_context_parallel, init_distributed, shutdown_distributed

    rank, world = 0, distributed_env()[2]
    if world > 1:
        rank, _, world, cp_device = init_distributed()
        if args.device == "auto":
            args.device = str(cp_device)
    device, dtype = resolve_device(args.device, args.dtype)
    started = time.time()
    if args.model_dir:
        models, defaults = load_model_folder(args.model_dir, device=device, dtype=dtype), {}
        defaults = models.info.get("defaults", {})
    else:
        models, defaults = load_default_models(device=device, dtype=dtype, smoke=args.smoke)
    label = models.info.get("name", "model")
    if world > 1:
        enable_context_parallel(models.transformer, world, args.context_parallel)
    if rank == 0:
        print(f"model: {label} ({'loaded' if args.model_dir else 'embedded default'}) on {device}"
              + (f", context parallel ({args.context_parallel}) over {world} processes" if world > 1 else ""))
    if command == "demo":
        image, audio, phases = demo_inputs()
    else:
        image, audio, phases = args.image, args.audio, _read_phases(args.phases)
    pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)  # noqa: E731
    options = SamplingOptions(
        steps=pick(args.steps, "steps", 40), text_cfg=pick(args.text_cfg, "text_cfg", 5.0),
        audio_cfg=pick(args.audio_cfg, "audio_cfg", 5.0), shift=pick(args.shift, "shift", 5.0), sampler=args.sampler,
        seed=args.seed, paca_mode=pick(args.paca_mode, "paca_mode", "learned"), feather=args.feather,
        phase_cfg=pick(args.phase_cfg, "phase_cfg", 0.0))
    request = GenerationRequest(image=image, audio=audio, phases=phases, width=pick(args.width, "width", 704),
                                height=pick(args.height, "height", 1280), fps=pick(args.fps, "fps", DEFAULT_FPS),
                                num_frames=args.frames, negative=pick(args.negative, "negative", None), options=options)
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
    del torch
    return 0
