"""Writing a synthetic dataset to disk: MP4 clips, annotations.jsonl, per-clip ground truth, README and manifest.

Why a fixed seed layout: the held-out test split must never share a character, phase layout or voice with the
training data, so each split owns a disjoint seed range and a clip's seed (not its position in a run) decides
everything about it. Re-running the same command reproduces the same dataset byte for byte in annotations and
ground truth (the MP4 encoder is deterministic for the same PyAV/FFmpeg build too).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable


from .actions import ACTIONS, RAMP_SECONDS
from .audio import require_espeak
from .clip import CAPTION, MAX_PHASE, MIN_PHASE, make_clip

#: Seed ranges [first, end) of each split. The test split is FIXED: --split test always starts at 900,000,000
#: (plus --seed as an offset), so 'actavatar synth --split test --clips 100' is the same 100 clips everywhere,
#: provided the voice is the same: --voice auto uses espeak-ng only where it is installed (dataset.json records
#: the voices); pass --voice synthetic for a machine-independent set.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 800_000_000),
    "val": (800_000_000, 900_000_000),
    "test": (900_000_000, 1_000_000_000),
}
FORMAT_VERSION = 1


def split_seeds(split: str, clips: int, seed: int = 0) -> list[int]:
    """Clip seeds of a split: range start + seed + 0..clips-1, refusing to leave the split's range."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    lo, hi = SPLITS[split]
    first = lo + int(seed)
    if seed < 0 or first + clips > hi:
        raise ValueError(f"seeds {first}..{first + clips - 1} leave the {split} range [{lo}, {hi})")
    return list(range(first, first + clips))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_one(job: dict[str, Any]) -> dict[str, Any]:
    """Render one clip and write its MP4 and ground truth; returns the annotation line (runs in a worker)."""
    from actavatar_core.video import write_mp4

    clip = make_clip(job["seed"], size=job["size"], fps=job["fps"], duration=job["duration"], split=job["split"],
                     voice=job["voice"])
    out = Path(job["out"])
    write_mp4(out / clip.annotation["video"], clip.frames, clip.fps, clip.audio[None, :], clip.sample_rate,
              metadata={"comment": "ActAvatar synthetic clip", "actavatar_synth": json.dumps(clip.annotation)},
              crf=job["crf"])
    _atomic_write_text(out / "groundtruth" / f"{clip.id}.json", json.dumps(clip.groundtruth, separators=(",", ":")))
    return {"annotation": clip.annotation, "voice": clip.groundtruth["voice"]}


def write_dataset(out: "str | os.PathLike", *, clips: int, seed: int = 0, split: str = "train", size: int = 128,
                  fps: float = 25.0, duration: float | tuple[float, float] = 4.0, workers: int = 1,
                  voice: str = "auto", crf: int = 18, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write ``clips`` clips of ``split`` into ``out``; returns the manifest (also saved as dataset.json)."""
    out = Path(out)
    if (out / "annotations.jsonl").exists() and not overwrite:
        from actavatar_core.errors import OutputPathError

        raise OutputPathError(f"'{out}' already holds a dataset (annotations.jsonl).", "Choose another --out or pass --overwrite.")
    seeds = split_seeds(split, clips, seed)
    require_espeak(voice)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    (out / "groundtruth").mkdir(parents=True, exist_ok=True)
    jobs = [dict(seed=s, size=size, fps=fps, duration=duration, split=split, voice=voice, out=str(out), crf=crf) for s in seeds]
    t0 = time.time()
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for k, job in enumerate(jobs, 1):
            results.append(_write_one(job))
            if progress:
                progress(k, len(jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for k, res in enumerate(pool.map(_write_one, jobs, chunksize=4), 1):
                results.append(res)
                if progress:
                    progress(k, len(jobs))
    lines = [json.dumps(r["annotation"], ensure_ascii=False) for r in results]
    _atomic_write_text(out / "annotations.jsonl", "\n".join(lines) + "\n")
    voices: dict[str, int] = {}
    for r in results:
        voices[r["voice"]] = voices.get(r["voice"], 0) + 1
    manifest = {
        "format_version": FORMAT_VERSION, "generator": "actavatar_lab.synth", "split": split,
        "seeds": [seeds[0], seeds[-1]] if seeds else [], "clips": len(seeds), "size": size, "fps": fps,
        "duration": list(duration) if isinstance(duration, (tuple, list)) else duration,
        "voice": voice, "voices": voices, "sample_rate": 16000, "caption": CAPTION,
        "actions": {k: a.text for k, a in ACTIONS.items()}, "left_right": "the character's own sides",
        "transition_seconds": RAMP_SECONDS, "seconds": round(time.time() - t0, 2),
    }
    _atomic_write_text(out / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    _atomic_write_text(out / "README.md", dataset_readme(manifest))
    return manifest


def dataset_readme(manifest: dict[str, Any]) -> str:
    """The dataset's own documentation (the format is the contract with training and evaluation)."""
    actions = "\n".join(f"| `{k}` | \"{t}\" |" for k, t in manifest["actions"].items())
    ranges = "\n".join(f"| {name} | {lo:,} .. {hi - 1:,} |" for name, (lo, hi) in SPLITS.items())
    return f"""# ActAvatar synthetic talking-character dataset

Written by `actavatar synth` (format version {FORMAT_VERSION}). Split **{manifest['split']}**, {manifest['clips']} clips,
seeds {manifest['seeds'][0] if manifest['seeds'] else '-'} .. {manifest['seeds'][-1] if manifest['seeds'] else '-'},
{manifest['size']}x{manifest['size']} px, {manifest['fps']:g} fps, voices: {manifest['voices']}.

Every clip is a procedurally drawn upper-body character that talks (speech-like audio, mouth following the audio
loudness) and performs 1-3 timed actions. Everything about a clip follows from its seed.

## Files

- `clips/<id>.mp4`: H.264 video (yuv420p) + AAC mono 16 kHz audio. Frame count is 4k+1; the clip lasts
  `num_frames / fps` seconds and the audio exactly as long.
- `annotations.jsonl`: one JSON object per line, one line per clip:

  | field | meaning |
  |---|---|
  | `id` | clip id, `<split>_<seed, 9 digits>` |
  | `video` | path of the MP4 relative to this folder |
  | `fps`, `num_frames`, `width`, `height` | video geometry |
  | `duration` | `num_frames / fps`, seconds |
  | `caption` | stage-1 brief caption, always "{manifest['caption']}" |
  | `base` | PACA base block describing the character, e.g. "A person with light skin, a red shirt and short black hair on a blue background talks" |
  | `phases` | list of `{{"start", "end", "text"}}`, seconds, half-open `[start, end)`, time order, never overlapping; parses with `actavatar_core.phases.PhaseScript.from_json({{"base": ..., "phases": ...}})` and validates for (`duration`, `fps`) |
  | `seed` | the clip seed |

- `groundtruth/<id>.json`: per-frame truth for evaluation: `labels` (action key or `idle` per frame),
  `transition` (true where the pose is blending into/out of an action), `mouth` (opening 0..1 the renderer drew),
  `envelope` (audio loudness per frame, see below), `head_dy`, `phases` with action keys, `identity` (all colours
  as RGB, hair style, head size), `voice` (`synthetic` or `espeak-ng`), `speaker` (`synthetic`, or espeak-ng's
  voice, words per minute, pitch and word gap, e.g. `en-gb+f3 s150 p40 g1`), `sample_rate`.
- `dataset.json`: the generation settings (manifest).

## Actions

Left/right are the **character's own** sides: it faces the viewer, so its right hand is on the image's left.

| key | phase text |
|---|---|
{actions}

Between phases the character rests (hands on the belly) with subtle idle motion (hand drift, a small head bob,
body sway). Frame 0 is always the rest pose: it is the reference image. Blends into and out of an action last
{manifest['transition_seconds']} s and are centred on the window edges, so the label flips at the annotated times
and the action is fully held from `start + {manifest['transition_seconds'] / 2:g}` to `end - {manifest['transition_seconds'] / 2:g}` s
(a window that starts at 0 blends in over its first {manifest['transition_seconds']} s; one that ends at the clip end
is held to the last frame). Phases last {MIN_PHASE}-{MAX_PHASE} s on a 0.1-s grid, with gaps of any length (0 included).

## Mouth and audio

`envelope[i]` is the Hann-weighted RMS of the audio over two frame periods centred on `(i + 0.5) / fps`, divided
by the clip's 95th percentile (`actavatar_lab.synth.audio.audio_envelope`). The drawn mouth opening is
`mouth_from_envelope(envelope)`: gate below 0.08, power 0.7, 3-tap smoothing.

## Seed ranges

| split | clip seeds |
|---|---|
{ranges}

`--seed` is an offset inside the split's range; the test split is meant to be used with offset 0
(`actavatar synth --split test --clips 100`), i.e. seeds 900,000,000 .. 900,000,099. Pictures, phases and
annotations depend only on the seed; the audio also depends on the voice (`--voice auto` picks espeak-ng where it
is installed, else the built-in babble; `voices` above says which was used), so compare models on one copy.

## Evaluation

`actavatar_lab.synth.detect` reads the action label and mouth opening from frames (calibrated on the reference
frame), `actavatar_lab.synth.metrics.evaluate_clip` / `aggregate` compute Hit@Segment, temporal IoU, spurious
action rate, lip-sync correlation and lag, and identity colour drift; `metrics.evaluate_folder(dataset, generated)`
scores a folder of generated `<id>.mp4` files against this dataset (reference = each clip's frame 0, audio = the
clip's audio). The dataset's own clips score H@S 1.0, tIoU about 0.93 (the detector's transition frames),
lip-sync correlation about 0.96 at lag 0: the ceiling a model can reach.
"""
