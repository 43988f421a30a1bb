"""``actavatar synth``: write a synthetic talking-character dataset (see writer.dataset_readme for the format)."""

from __future__ import annotations

import argparse
import os
import sys

from .audio import VOICES
from .writer import SPLITS


def _duration(text: str) -> float | tuple[float, float]:
    """'4' -> 4.0; '3:5' (or '3-5') -> a per-clip range."""
    for sep in (":", "-"):
        if sep in text.strip()[1:]:
            lo, hi = (float(v) for v in text.split(sep, 1))
            if not 0 < lo <= hi:
                raise argparse.ArgumentTypeError(f"duration range {text!r} must be 0 < MIN <= MAX")
            return (lo, hi)
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("duration must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actavatar synth", description="Write a synthetic talking-character dataset "
                                "(MP4 clips, annotations.jsonl, per-clip ground truth, README.md).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clips", type=int, default=100, help="number of clips (default 100)")
    p.add_argument("--seed", type=int, default=0, help="first clip seed, as an offset inside the split's seed range (default 0)")
    p.add_argument("--split", default="train", choices=list(SPLITS),
                   help="seed range: train 0.., val 800000000.., test 900000000.. (fixed held-out set)")
    p.add_argument("--size", type=int, default=128, help="frame width and height, a multiple of 16 (default 128)")
    p.add_argument("--fps", type=float, default=25.0, help="frames per second (default 25)")
    p.add_argument("--duration", type=_duration, default=4.0, help="seconds per clip, or MIN:MAX drawn per clip (default 4.0)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel processes (default: up to 2)")
    p.add_argument("--voice", default="auto", choices=list(VOICES),
                   help="speech: espeak-ng (a different accent, voice, rate and pitch per clip), the built-in "
                        "formant babble (synthetic), a quarter babble and the rest espeak-ng (mixed), or auto: "
                        "espeak-ng when installed, else synthetic")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better, default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:])
    from actavatar_core.errors import ActAvatarError

    from .writer import write_dataset

    if args.clips < 1:
        print("actavatar synth: --clips must be at least 1.", file=sys.stderr)
        return 2
    if args.size % 16 or args.size < 64:
        print("actavatar synth: --size must be a multiple of 16 and at least 64 (the VAE compresses 16x).", file=sys.stderr)
        return 2
    if args.fps <= 0:
        print("actavatar synth: --fps must be positive.", file=sys.stderr)
        return 2
    step = max(1, args.clips // 20)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            print(f"  {done}/{total} clips", flush=True)

    try:
        manifest = write_dataset(args.out, clips=args.clips, seed=args.seed, split=args.split, size=args.size,
                                 fps=args.fps, duration=args.duration, workers=args.workers, voice=args.voice,
                                 crf=args.crf, overwrite=args.overwrite, progress=progress)
    except (ActAvatarError, ValueError) as exc:
        print(f"actavatar synth: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {manifest['clips']} {manifest['split']} clips (seeds {manifest['seeds'][0]}..{manifest['seeds'][1]}, "
          f"voices {manifest['voices']}) to {args.out} in {manifest['seconds']} s.")
    return 0
