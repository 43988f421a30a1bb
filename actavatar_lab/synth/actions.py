"""The action vocabulary, the body pose of each action over time, and the per-frame action timeline.

Left and right are the CHARACTER'S OWN sides (as a person describing themselves would say): the character faces
the viewer, so its right hand appears on the LEFT half of the image (x < 64 in 128-pixel units) and its left hand
on the right half. Every text, pose and detector in this package follows that rule.

Poses are joint positions in 128-pixel units (the renderer scales them). Each action has a characteristic pose
that is distinguishable in a single frame (so a per-frame detector can read it) plus a rhythmic motion where the
words say so (waving, clapping, nodding), fast enough to be visible yet slow enough for the VAE's 4-frame stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IDLE = "idle"


@dataclass(frozen=True)
class Action:
    key: str
    text: str
    #: word stems that identify the action in a free-form phase text (every stem must start some word)
    keywords: tuple[str, ...]


#: The six actions, with the exact phase texts the dataset uses.
ACTIONS: dict[str, Action] = {a.key: a for a in (
    Action("raise_left", "raises the left hand", ("rais", "left")),
    Action("raise_right", "raises the right hand", ("rais", "right")),
    Action("wave_right", "waves the right hand", ("wav", "right")),
    Action("clap", "claps both hands", ("clap",)),
    Action("point_down", "points down with the right hand", ("point", "down")),
    Action("nod", "nods the head", ("nod",)),
)}
ACTION_KEYS: tuple[str, ...] = tuple(ACTIONS)
LABELS: tuple[str, ...] = (IDLE, *ACTION_KEYS)


def action_for_text(text: str) -> str | None:
    """Map a phase text to an action key: exact text first, then keywords (so 'Raise your LEFT hand' works)."""
    low = text.strip().lower()
    for action in ACTIONS.values():
        if low == action.text:
            return action.key
    for action in ACTIONS.values():
        words = low.replace(",", " ").split()
        if all(any(w.startswith(k) for w in words) for k in action.keywords):
            return action.key
    return None


# ----------------------------------------------------------------------------------------------- poses
@dataclass
class Pose:
    """Joint positions (x, y) in 128-px units; R = character's right (image left)."""

    r_elbow: np.ndarray
    r_hand: np.ndarray
    l_elbow: np.ndarray
    l_hand: np.ndarray
    head_dy: float = 0.0
    finger: float = 0.0  # 0..1 length of the pointing finger of the right hand


R_SHOULDER = np.array([42.0, 92.0])
L_SHOULDER = np.array([86.0, 92.0])
HAND_RADIUS = 8.0
ARM_WIDTH = 9.0
REST_R_ELBOW, REST_R_HAND = np.array([34.0, 108.0]), np.array([50.0, 114.0])


def _mirror(p: np.ndarray) -> np.ndarray:
    return np.array([128.0 - p[0], p[1]])


def rest_pose(t: float, phase: np.ndarray) -> Pose:
    """Hands resting on the belly, with slow idle drift of the hands and a small head bob."""
    drift_r = 1.2 * np.array([math.sin(2 * math.pi * 0.37 * t + phase[0]), math.sin(2 * math.pi * 0.29 * t + phase[1])])
    drift_l = 1.2 * np.array([math.sin(2 * math.pi * 0.33 * t + phase[2]), math.sin(2 * math.pi * 0.41 * t + phase[3])])
    return Pose(REST_R_ELBOW.copy(), REST_R_HAND + drift_r, _mirror(REST_R_ELBOW), _mirror(REST_R_HAND) + drift_l,
                head_dy=0.5 * math.sin(2 * math.pi * 0.3 * t + phase[4]))


def action_pose(key: str, tau: float, rest: Pose) -> Pose:
    """The pose of action ``key`` at ``tau`` seconds after its window started (rest pose for the other parts)."""
    p = Pose(rest.r_elbow.copy(), rest.r_hand.copy(), rest.l_elbow.copy(), rest.l_hand.copy(), rest.head_dy, 0.0)
    if key == "raise_right":
        p.r_elbow, p.r_hand = np.array([29.0, 62.0]), np.array([24.0, 26.0]) + 0.8 * np.array([0, math.sin(3 * tau)])
    elif key == "raise_left":
        p.l_elbow, p.l_hand = _mirror(np.array([29.0, 62.0])), _mirror(np.array([24.0, 26.0])) + 0.8 * np.array([0, math.sin(3 * tau)])
    elif key == "wave_right":
        theta = 0.55 * math.sin(2 * math.pi * 1.6 * tau)
        p.r_elbow = np.array([20.0, 76.0])
        p.r_hand = p.r_elbow + 26.0 * np.array([math.sin(theta), -math.cos(theta)])
    elif key == "clap":
        gap = 8.0 + 8.0 * (1 + math.cos(2 * math.pi * 1.8 * tau)) / 2
        p.r_elbow, p.l_elbow = np.array([33.0, 106.0]), np.array([95.0, 106.0])
        p.r_hand, p.l_hand = np.array([64.0 - gap, 97.0]), np.array([64.0 + gap, 97.0])
    elif key == "point_down":
        p.r_elbow, p.r_hand = np.array([26.0, 104.0]), np.array([16.0, 117.0])
        p.finger = 1.0
    elif key == "nod":
        p.head_dy = 5.0 + 6.0 * (1 - math.cos(2 * math.pi * 1.5 * tau)) / 2
    elif key != IDLE:
        raise KeyError(key)
    return p


# ----------------------------------------------------------------------------------------------- timeline
#: Transition length in seconds: the blend into an action is centred on the window start (half before, half
#: after) and the blend out on the window end, so the per-frame label flips exactly at the annotated times and
#: the action is fully held from start + RAMP/2 to end - RAMP/2.
RAMP_SECONDS = 0.24


def _smooth(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3 - 2 * x)


@dataclass(frozen=True)
class TimedAction:
    start: float
    end: float
    key: str


def action_weights(t: float, phases: list[TimedAction], duration: float) -> list[float]:
    """Blend weight of every phase at time ``t``. Frame 0 is always the rest pose (the reference image), so a
    window that starts at 0 blends in over its first RAMP seconds; a window that ends at the clip end is held."""
    half = RAMP_SECONDS / 2
    out = []
    for ph in phases:
        a = max(ph.start - half, 0.0)
        w_in = _smooth((t - a) / RAMP_SECONDS)
        w_out = 1.0 if ph.end >= duration - 1e-6 else 1.0 - _smooth((t - (ph.end - half)) / RAMP_SECONDS)
        out.append(min(w_in, w_out))
    return out


def frame_time(i: int, fps: float) -> float:
    """The time a video frame stands for (its start, as in phases.latent_frame_times)."""
    return i / fps


def pose_at(t: float, phases: list[TimedAction], duration: float, idle_phase: np.ndarray) -> tuple[Pose, str, bool]:
    """Pose, ground-truth label (the action whose blend weight is >= 0.5, else idle) and whether the frame is in
    a transition (some weight strictly between 0 and 1), at time ``t``."""
    rest = rest_pose(t, idle_phase)
    weights = action_weights(t, phases, duration)
    total = max(sum(weights), 1.0)  # touching phases cross-fade: their weights sum to about 1
    pose = rest
    label, best = IDLE, 0.0
    for ph, w in zip(phases, weights):
        if w <= 0:
            continue
        target = action_pose(ph.key, max(0.0, t - ph.start), rest)
        pose = _add(pose, rest, target, w / total)
        if w > best:
            best, label = w, (ph.key if w >= 0.5 else IDLE)
    transition = any(1e-6 < w < 1 - 1e-6 for w in weights)
    return pose, label, transition


def _add(pose: Pose, rest: Pose, target: Pose, w: float) -> Pose:
    """pose + w * (target - rest): each phase adds its offset from the rest pose."""
    return Pose(pose.r_elbow + w * (target.r_elbow - rest.r_elbow), pose.r_hand + w * (target.r_hand - rest.r_hand),
                pose.l_elbow + w * (target.l_elbow - rest.l_elbow), pose.l_hand + w * (target.l_hand - rest.l_hand),
                pose.head_dy + w * (target.head_dy - rest.head_dy), pose.finger + w * (target.finger - rest.finger))
