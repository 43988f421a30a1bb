"""One synthetic clip: phase sampling, annotation, ground truth, frames and audio, all from one seed.

Every random choice uses its own stream derived from the clip seed (identity, phases, audio, idle motion), so
changing e.g. the phase sampler does not change the characters or the voices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actavatar_core.phases import Phase, PhaseScript, frames_for_duration
from .actions import ACTION_KEYS, ACTIONS, TimedAction, frame_time, pose_at
from .audio import SAMPLE_RATE, audio_envelope, mouth_from_envelope, speech
from .identity import sample_identity
from .render import render_frame

CAPTION = "a person is talking"
#: Phase sampling rules (seconds). Times are multiples of 0.1 s, like a human annotator's.
MIN_PHASE = 0.8
MAX_PHASE = 2.5
TIME_STEP = 0.1
PHASE_COUNT_WEIGHTS = {1: 0.3, 2: 0.45, 3: 0.25}


@dataclass
class Clip:
    """A rendered clip plus its annotation line and ground truth (the dataset writer serialises these)."""

    id: str
    seed: int
    fps: float
    frames: np.ndarray  # uint8 (T, H, W, 3)
    audio: np.ndarray  # float32 (samples,)
    sample_rate: int
    annotation: dict[str, Any]
    groundtruth: dict[str, Any] = field(repr=False)


def sample_phases(seed: int, duration: float) -> list[TimedAction]:
    """1-3 non-overlapping phases of 0.8-2.5 s at random times inside [0, duration], distinct actions, gaps of
    random length (possibly zero, so phases may touch)."""
    rng = np.random.default_rng([int(seed), 202])
    units = int(np.floor(duration / TIME_STEP + 1e-6))
    lo, hi = int(round(MIN_PHASE / TIME_STEP)), int(round(MAX_PHASE / TIME_STEP))
    counts = list(PHASE_COUNT_WEIGHTS)
    probs = np.array([PHASE_COUNT_WEIGHTS[c] for c in counts])
    k = int(rng.choice(counts, p=probs / probs.sum()))
    k = max(1, min(k, units // lo))
    lengths = [int(rng.integers(lo, min(hi, units) + 1)) for _ in range(k)]
    while sum(lengths) > units:  # shrink the longest until they fit
        j = int(np.argmax(lengths))
        lengths[j] = max(lo, lengths[j] - 1)
        if all(length == lo for length in lengths) and sum(lengths) > units:
            lengths.pop()
    slack = units - sum(lengths)
    cuts = np.sort(rng.integers(0, slack + 1, len(lengths)))
    gaps = np.diff(np.concatenate([[0], cuts]))  # gap before each phase
    keys = [ACTION_KEYS[i] for i in rng.choice(len(ACTION_KEYS), len(lengths), replace=False)]
    out, pos = [], 0
    for gap, length, key in zip(gaps, lengths, keys):
        pos += int(gap)
        out.append(TimedAction(round(pos * TIME_STEP, 6), round((pos + length) * TIME_STEP, 6), key))
        pos += length
    return out


def clip_id(seed: int, split: str = "train") -> str:
    return f"{split}_{int(seed):09d}"


def make_clip(seed: int, *, size: int = 128, fps: float = 25.0, duration: float | tuple[float, float] = 4.0,
              split: str = "train", voice: str = "auto", phases: list[TimedAction] | None = None) -> Clip:
    """Render the clip of ``seed``. ``duration`` is seconds or a (min, max) range drawn per clip; the frame count
    is the smallest 4k+1 covering it, and the clip lasts num_frames / fps seconds."""
    if size % 16 or size < 64:
        raise ValueError(f"size must be a multiple of 16 and at least 64, got {size}")
    if isinstance(duration, (tuple, list)):
        lo, hi = float(duration[0]), float(duration[1])
        duration = float(np.random.default_rng([int(seed), 404]).uniform(lo, hi)) if hi > lo else lo
    num_frames = frames_for_duration(float(duration), fps)
    length = num_frames / fps
    identity = sample_identity(seed)
    timed = sample_phases(seed, length) if phases is None else list(phases)
    audio, voice_used, speaker = speech(seed, length, SAMPLE_RATE, voice)
    envelope = audio_envelope(audio, SAMPLE_RATE, fps, num_frames)
    mouth = mouth_from_envelope(envelope)
    motion = np.random.default_rng([int(seed), 505]).uniform(0, 2 * np.pi, 6)

    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    labels, transition, head_dy = [], [], []
    for i in range(num_frames):
        t = frame_time(i, fps)
        pose, label, trans = pose_at(t, timed, length, motion[:5])
        body_dx = 0.6 * np.sin(2 * np.pi * 0.17 * t + motion[5])
        frames[i] = render_frame(identity, pose, float(mouth[i]), size, body_dx)
        labels.append(label)
        transition.append(trans)
        head_dy.append(round(float(pose.head_dy), 3))

    script = PhaseScript(base=identity.describe(), phases=tuple(Phase(p.start, p.end, ACTIONS[p.key].text) for p in timed))
    script.validate(length, fps)
    cid = clip_id(seed, split)
    annotation = {
        "id": cid, "video": f"clips/{cid}.mp4", "fps": fps, "num_frames": num_frames, "width": size, "height": size,
        "duration": round(length, 6), "caption": CAPTION, "base": script.base,
        "phases": [p.to_json() for p in script.phases], "seed": int(seed),
    }
    groundtruth = {
        "id": cid, "seed": int(seed), "fps": fps, "num_frames": num_frames, "sample_rate": SAMPLE_RATE,
        "voice": voice_used, "speaker": speaker, "identity": identity.to_json(),
        "phases": [{"start": p.start, "end": p.end, "action": p.key, "text": ACTIONS[p.key].text} for p in timed],
        "labels": labels, "transition": transition,
        "mouth": [round(float(m), 4) for m in mouth], "envelope": [round(float(e), 4) for e in envelope],
        "head_dy": head_dy,
    }
    return Clip(cid, int(seed), fps, frames, audio, SAMPLE_RATE, annotation, groundtruth)
