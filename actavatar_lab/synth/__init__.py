"""Procedural talking-character dataset and its analytic evaluation (the mini-model experiment's data and judge).

No ActAvatar weights exist, so the project trains a small model on clips drawn here and checks with analytic
detectors whether phase-timed actions and audio-driven mouths come out. Modules:

- ``identity``: a character's colours, hair style and head shape from its seed, and the base-prompt text;
- ``actions``: the six actions (exact texts), poses over time and the per-frame timeline; left/right are the
  character's own sides;
- ``render``: anti-aliased frames (PIL, 4x supersampling);
- ``audio``: speech-like audio (espeak-ng when installed, else a formant babble) and the audio envelope;
- ``clip``: phase sampling and one complete clip (frames, audio, annotation, ground truth) per seed;
- ``writer`` / ``cli``: ``actavatar synth`` (MP4 + annotations.jsonl + ground truth + README);
- ``detect``: per-frame action label and mouth opening, calibrated on the reference frame;
- ``metrics``: Hit@Segment, temporal IoU, lip sync, identity drift; ``evaluate_clip`` and ``aggregate``.

Only numpy and Pillow are needed (PyAV for writing MP4s); nothing here imports torch.
"""

from __future__ import annotations

from .actions import ACTION_KEYS, ACTIONS, IDLE, LABELS, action_for_text
from .clip import CAPTION, Clip, make_clip, sample_phases
from .detect import Calibration, detect_frame, detect_video
from .identity import Identity, sample_identity
from .metrics import aggregate, evaluate_clip
from .writer import SPLITS, split_seeds, write_dataset

__all__ = [
    "ACTIONS", "ACTION_KEYS", "IDLE", "LABELS", "CAPTION", "SPLITS", "Calibration", "Clip", "Identity",
    "action_for_text", "aggregate", "detect_frame", "detect_video", "evaluate_clip", "make_clip", "sample_identity",
    "sample_phases", "split_seeds", "write_dataset",
]
