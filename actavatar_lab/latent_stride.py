"""``python -m actavatar_lab.latent_stride``: how much lip sync survives a mouth that changes once per latent frame.

Wan's VAEs keep the first video frame alone and then one latent frame per 4 video frames (0.16 s at 25 fps). A VAE too
small to carry the 4 frames' mouths separately in its channels keeps about one mouth state per latent frame. This
scores the test split's ground-truth mouth opening against the speech envelope (the lip-sync metric's Pearson r at lag
0) three ways: as drawn, held at its mean over each latent frame's video frames, and interpolated between those means.
The held and interpolated figures bound what such a VAE can keep, before any model is involved: a split whose speech
opens and closes the mouth faster than the latent frame rate loses more (the share of the mouth's variance above half
that rate says how much faster)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .synth.metrics import lip_sync

TEMPORAL_STRIDE = 4


def latent_frame_groups(num_frames: int, stride: int = TEMPORAL_STRIDE) -> list[np.ndarray]:
    """The video frames behind each latent frame of a causal Wan VAE: frame 0 alone, then runs of ``stride``."""
    starts = [0, *range(1, num_frames, stride)]
    ends = [1, *[min(s + stride, num_frames) for s in starts[1:]]]
    return [np.arange(s, e) for s, e in zip(starts, ends) if s < num_frames]


def held_per_latent_frame(signal: np.ndarray, stride: int = TEMPORAL_STRIDE) -> np.ndarray:
    """``signal`` replaced, over each latent frame's video frames, by its mean there."""
    x = np.asarray(signal, np.float64)
    out = x.copy()
    for group in latent_frame_groups(len(x), stride):
        out[group] = x[group].mean()
    return out


def interpolated_per_latent_frame(signal: np.ndarray, stride: int = TEMPORAL_STRIDE) -> np.ndarray:
    """``signal``'s mean per latent frame, linearly interpolated between the latent frames' centres."""
    x = np.asarray(signal, np.float64)
    groups = latent_frame_groups(len(x), stride)
    centres = np.array([g.mean() for g in groups])
    means = np.array([x[g].mean() for g in groups])
    return np.interp(np.arange(len(x)), centres, means)


def share_above_latent_nyquist(signal: np.ndarray, fps: float, stride: int = TEMPORAL_STRIDE) -> float:
    """The share of ``signal``'s variance at frequencies above half the latent frame rate (fps / stride / 2), which
    one value per latent frame cannot represent."""
    x = np.asarray(signal, np.float64) - np.mean(signal)
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / fps)
    total = power[1:].sum()
    return float(power[freqs > fps / stride / 2].sum() / total) if total > 0 else 0.0


def _r(mouth: np.ndarray, envelope: np.ndarray) -> float:
    return lip_sync(mouth, envelope, max_lag=0)["lipsync_corr"]


def stride_ceiling(test_set: "str | Path", clips: int | None = None, stride: int = TEMPORAL_STRIDE) -> dict[str, Any]:
    """Mean mouth-audio r over the split's clips (the drawn mouth, held and interpolated per latent frame) and the mean
    share of the mouth's variance faster than the latent frame rate."""
    from .evaluation import read_test_annotations

    folder = Path(test_set)
    scores: dict[str, list[float]] = {"drawn": [], "held": [], "interpolated": [], "fast_share": []}
    for ann in read_test_annotations(folder, clips):
        truth = json.loads((folder / "groundtruth" / f"{ann['id']}.json").read_text())
        mouth, envelope = np.asarray(truth["mouth"], np.float64), np.asarray(truth["envelope"], np.float64)
        scores["drawn"].append(_r(mouth, envelope))
        scores["held"].append(_r(held_per_latent_frame(mouth, stride), envelope))
        scores["interpolated"].append(_r(interpolated_per_latent_frame(mouth, stride), envelope))
        scores["fast_share"].append(share_above_latent_nyquist(mouth, float(truth["fps"]), stride))
    return {"clips": len(scores["drawn"]), **{k: float(np.mean(v)) for k, v in scores.items()}}


def main(argv: list[str]) -> int:
    from .evaluation import TEST_SPLITS, ensure_test_set

    p = argparse.ArgumentParser(prog="python -m actavatar_lab.latent_stride", description=__doc__)
    p.add_argument("--splits", default=",".join(TEST_SPLITS), help="comma-separated test splits (written if missing)")
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--stride", type=int, default=TEMPORAL_STRIDE, help="video frames per latent frame (Wan: 4)")
    args = p.parse_args(argv[1:])
    unknown = [s for s in args.splits.split(",") if s not in TEST_SPLITS]
    if unknown:
        print(f"error: unknown split {unknown[0]!r}; use some of {', '.join(TEST_SPLITS)}", file=sys.stderr)
        return 2
    print(f"| split | clips | mouth-audio r: drawn | held per latent frame ({args.stride} video frames) | interpolated "
          "| mouth variance faster than half the latent frame rate |")
    print("|---|---|---|---|---|---|")
    for split in args.splits.split(","):
        folder = ensure_test_set(TEST_SPLITS[split]["folder"], args.clips, split=split)
        s = stride_ceiling(folder, args.clips, args.stride)
        print(f"| {split} | {s['clips']} | {s['drawn']:.3f} | {s['held']:.3f} | {s['interpolated']:.3f} | {s['fast_share']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
