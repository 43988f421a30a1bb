"""Phase scripts: a base prompt plus time-anchored action phases, and their mapping onto latent frames.

The JSON form is the public contract shared by the engine, the ComfyUI Phase Prompt node, the timeline widget
and API users::

    {"version": 1,
     "base": "A woman in a red blazer talks to the camera",
     "negative": "",
     "phases": [{"start": 0.0, "end": 2.0, "text": "waves with the right hand"},
                {"start": 2.0, "end": 4.5, "text": "points down"}]}

Times are seconds from the first frame. Windows are half-open, ``[start, end)``, so two phases may touch
(one ends at 2.0 s, the next starts at 2.0 s) without overlapping.

The compact text form is one line (or several) of ``|``-separated segments; a segment without a time anchor is
the base prompt (first segment only), ``negative:`` starts the negative prompt::

    A woman in a red blazer talks | 0-2s: waves with the right hand | 2-4.5s: points down
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .errors import PhaseScriptError

SCRIPT_VERSION = 1
#: At most this many phases per script. Eight covers every example in the paper (which uses two) with room for
#: busy performances, and keeps the umT5 prompt well inside its 512 tokens.
MAX_PHASES = 8
#: Longest phase text, in characters (about 60 umT5 tokens for English).
MAX_PHASE_TEXT = 300
#: Longest base and negative prompt, in characters.
MAX_BASE_TEXT = 2000
#: Wan2.2 VAE temporal stride: latent frame 0 is pixel frame 0, latent frame j >= 1 covers pixel frames 4j-3..4j.
VAE_TEMPORAL_STRIDE = 4
#: Frame rate of the paper's training data. Wan2.2 TI2V-5B itself defaults to 24.
DEFAULT_FPS = 25.0

_EPS = 1e-6
_NOT_JSON = object()
#: Latent frames the "too short" rule looks at around a phase's start (it needs about 3).
_WALK_STEPS = 16


@dataclass(frozen=True)
class Phase:
    """One action, active for ``start <= t < end`` seconds."""

    start: float
    end: float
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"start": _clean_number(self.start), "end": _clean_number(self.end), "text": self.text}

    def describe(self) -> str:
        short = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f"{_fmt(self.start)}-{_fmt(self.end)}s '{short}'"


@dataclass(frozen=True)
class PhaseScript:
    """A validated-on-demand phase script. Phases are kept in time order (phase k is the k-th by start)."""

    base: str
    phases: tuple[Phase, ...] = field(default_factory=tuple)
    negative: str = ""

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> "PhaseScript":
        """Parse the JSON contract (a string or an already-decoded dict). Structural errors raise here."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as exc:  # also a 5000-digit number or 100000 nested brackets
                reason = (f"{exc.msg} at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError)
                          else "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc))
                raise PhaseScriptError(
                    f"The phase script is not valid JSON ({reason}).",
                    'Write it as {"version": 1, "base": "...", "phases": [{"start": 0, "end": 2, "text": "..."}]} '
                    "or use the compact form '0-2s: waves | 2-4s: points down'.",
                ) from None
        if not isinstance(data, dict):
            raise PhaseScriptError(
                f"The phase script must be a JSON object, got {type(data).__name__}.",
                'Wrap it as {"version": 1, "base": "...", "phases": [...]}.',
            )
        version = data.get("version", SCRIPT_VERSION)
        if isinstance(version, bool) or version != SCRIPT_VERSION:
            raise PhaseScriptError(
                f"Phase script version {version!r} is not supported (this ActAvatar reads version {SCRIPT_VERSION}).",
                f'Set "version": {SCRIPT_VERSION}, or update ActAvatar.',
            )
        unknown = sorted(set(data) - {"version", "base", "negative", "phases"})
        if unknown:
            raise PhaseScriptError(
                f"Unknown phase script field(s): {', '.join(unknown)}.",
                'Only "version", "base", "negative" and "phases" are allowed; check the spelling.',
            )
        base = data.get("base", "")
        negative = data.get("negative", "")
        negative = "" if negative is None else negative
        if not isinstance(base, str):
            raise PhaseScriptError('"base" must be a string.', 'Write the base prompt as text, e.g. "base": "A man talking".')
        if not isinstance(negative, str):
            raise PhaseScriptError('"negative" must be a string.', 'Write the negative prompt as text or leave it "".')
        raw_phases = data.get("phases", [])
        if not isinstance(raw_phases, list):
            raise PhaseScriptError('"phases" must be a list.', 'Write "phases": [{"start": 0, "end": 2, "text": "..."}].')
        phases = [_phase_from_json(i, p) for i, p in enumerate(raw_phases)]
        return cls(base=base, phases=_ordered(phases), negative=negative)

    @classmethod
    def from_compact(cls, text: str) -> "PhaseScript":
        """Parse ``base | 0-2s: action | 2-4.5s: action`` (``|`` or newlines separate segments)."""
        base_parts: list[str] = []
        negative = ""
        phases: list[Phase] = []
        segments = [s.strip() for s in re.split(r"[|\n]", text)]
        for index, segment in enumerate(s for s in segments if s):
            if segment.lower().startswith("negative:"):
                negative = segment.split(":", 1)[1].strip()
                continue
            match = _COMPACT_PHASE.match(segment)
            if match:
                start, end = float(match.group("start")), float(match.group("end"))
                for raw, value in ((match.group("start"), start), (match.group("end"), end)):
                    if not _finite(value):  # the JSON form's bound too, so the canonical JSON reads back
                        raise PhaseScriptError(
                            f"Segment {index + 1} ('{segment[:40]}') has a time of {raw} s, beyond {_MAX_SECONDS:g} s.",
                            "Write phase times in seconds from the start of the clip, e.g. '0-2s: waves'.",
                        )
                phases.append(Phase(start, end, match.group("text").strip()))
                continue
            if _LOOKS_TIMED.match(segment):
                raise PhaseScriptError(
                    f"Cannot read the time anchor of segment {index + 1} ('{segment[:40]}').",
                    "Write phases as 'START-ENDs: text', e.g. '0-2s: waves' or '2.5-4s: points down'.",
                )
            if phases:
                raise PhaseScriptError(
                    f"Segment {index + 1} ('{segment[:40]}') has no time anchor but comes after a phase.",
                    "Put the base prompt first, or give the segment a window like '2-4s: ...'.",
                )
            base_parts.append(segment)
        return cls(base=" ".join(base_parts), phases=_ordered(phases), negative=negative)

    @classmethod
    def parse(cls, value: "str | dict[str, Any] | PhaseScript") -> "PhaseScript":
        """Accept a PhaseScript, the JSON contract (string or dict) or the compact text form."""
        if isinstance(value, PhaseScript):
            return value
        if isinstance(value, dict):
            return cls.from_json(value)
        if not isinstance(value, str):
            raise PhaseScriptError(
                f"A phase script must be text or JSON, got {type(value).__name__}.",
                "Pass the JSON phase script or the compact form '0-2s: waves | 2-4s: points down'.",
            )
        stripped = value.lstrip("\ufeff").strip()  # a byte-order mark from a Windows editor is not text
        if stripped.startswith("{"):
            return cls.from_json(stripped)
        if stripped.startswith("["):  # a JSON list (wrong), or compact text opening with "[0-2s]: ..."
            try:
                data = json.loads(stripped)
            except (ValueError, RecursionError):
                data = _NOT_JSON
            if data is not _NOT_JSON:
                return cls.from_json(data)
        return cls.from_compact(stripped)

    # ----------------------------------------------------------------------------------------- serialisers
    def to_json(self) -> dict[str, Any]:
        return {
            "version": SCRIPT_VERSION,
            "base": self.base,
            "negative": self.negative,
            "phases": [p.to_json() for p in self.phases],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)

    def to_compact(self) -> str:
        parts = [self.base] if self.base else []
        parts += [f"{_fmt(p.start)}-{_fmt(p.end)}s: {p.text}" for p in self.phases]
        if self.negative:
            parts.append(f"negative: {self.negative}")
        return " | ".join(parts)

    # ----------------------------------------------------------------------------------------- validation
    def problems(self, duration: float | None = None, fps: float = DEFAULT_FPS) -> list[str]:
        """Every rule the script breaks, as complete sentences with their fix. Empty means valid.

        ``duration`` is the clip length in seconds (None: not known yet, skip the range checks). ``fps`` decides
        the latent-frame grid used for the "too short" rule.
        """
        out: list[str] = []
        if not self.base.strip():
            out.append("The base prompt is empty. Fix: describe who is talking and where, e.g. 'A man in a grey suit talks to the camera'.")
        if len(self.base) > MAX_BASE_TEXT:
            out.append(f"The base prompt has {len(self.base)} characters, more than {MAX_BASE_TEXT}. Fix: shorten it.")
        if len(self.negative) > MAX_BASE_TEXT:
            out.append(f"The negative prompt has {len(self.negative)} characters, more than {MAX_BASE_TEXT}. Fix: shorten it.")
        if len(self.phases) > MAX_PHASES:
            out.append(
                f"The script has {len(self.phases)} phases; at most {MAX_PHASES} are allowed. "
                "Fix: merge neighbouring phases or split the clip."
            )
        for k, phase in enumerate(self.phases, start=1):
            name = f"Phase {k} ({phase.describe()})"
            if not phase.text.strip():
                out.append(f"Phase {k} ({_fmt(phase.start)}-{_fmt(phase.end)}s) has no text. Fix: describe the action, e.g. 'raises the left hand'.")
            if len(phase.text) > MAX_PHASE_TEXT:
                out.append(f"{name} text has {len(phase.text)} characters, more than {MAX_PHASE_TEXT}. Fix: shorten it.")
            if phase.start < 0:
                out.append(f"{name} starts before 0 s. Fix: set its start to 0 or later.")
            if phase.end <= phase.start:
                out.append(f"{name} ends at or before its start. Fix: make the end later than the start.")
            if duration is not None and phase.end > duration + _EPS:
                out.append(
                    f"{name} ends after the clip, which is {_fmt(duration)} s long. "
                    f"Fix: end it at {_fmt(duration)} s or earlier, or use a longer audio/clip."
                )
            if duration is not None and phase.start >= duration - _EPS and phase.end > phase.start:
                out.append(f"{name} starts after the clip ends ({_fmt(duration)} s). Fix: move it inside the clip or remove it.")
        for k in range(1, len(self.phases)):
            prev, cur = self.phases[k - 1], self.phases[k]
            if cur.start < prev.end - _EPS:
                out.append(
                    f"Phase {k} ({prev.describe()}) and phase {k + 1} ({cur.describe()}) overlap. "
                    f"Fix: end phase {k} at {_fmt(cur.start)} s or start phase {k + 1} at {_fmt(prev.end)} s."
                )
        if fps <= 0 or not math.isfinite(fps):
            out.append(f"The frame rate {fps!r} is not a positive number. Fix: use e.g. 24 or 25 fps.")
        elif not out:
            count = _grid_count(duration, fps, self.phases)
            for k, phase in enumerate(self.phases, start=1):
                if not _holds_latent_frame(phase, count, fps):
                    step = VAE_TEMPORAL_STRIDE / fps
                    out.append(
                        f"Phase {k} ({phase.describe()}) is too short: no latent frame falls inside it at {_fmt(fps)} fps "
                        f"(one latent frame every {_fmt(step)} s). Fix: make it at least {_fmt(step)} s long."
                    )
        return out

    def validate(self, duration: float | None = None, fps: float = DEFAULT_FPS) -> "PhaseScript":
        """Raise one :class:`PhaseScriptError` listing every problem; return self when valid."""
        problems = self.problems(duration, fps)
        if problems:
            if len(problems) == 1:
                problem, _, fix = problems[0].partition(" Fix: ")
                raise PhaseScriptError(problem, fix or None)
            raise PhaseScriptError("The phase script has problems:\n- " + "\n- ".join(problems))
        return self

    # ----------------------------------------------------------------------------------------- timing
    def active_phases(self, num_latent_frames: int, fps: float) -> list[frozenset[int]]:
        """For every latent frame, the set of phase numbers (1-based, time order) whose window holds its time."""
        times = latent_frame_times(num_latent_frames, fps)
        return [frozenset(k for k, p in enumerate(self.phases, start=1) if p.start - _EPS <= t < p.end - _EPS) for t in times]


# ------------------------------------------------------------------------------------------------- frame grid
def latent_frame_count(num_frames: int) -> int:
    """Latent frames for ``num_frames`` pixel frames (which must be of the form 4k+1)."""
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_STRIDE:
        lower = max(1, num_frames - (num_frames - 1) % VAE_TEMPORAL_STRIDE)
        raise PhaseScriptError(
            f"{num_frames} frames is not of the form 4k+1 that the Wan2.2 VAE needs.",
            f"Use {lower} or {lower + VAE_TEMPORAL_STRIDE} frames.",
        )
    return (num_frames - 1) // VAE_TEMPORAL_STRIDE + 1


def pixel_frame_count(num_latent_frames: int) -> int:
    return (num_latent_frames - 1) * VAE_TEMPORAL_STRIDE + 1


def frames_for_duration(seconds: float, fps: float) -> int:
    """Smallest 4k+1 frame count whose clip (``frames / fps`` seconds) covers ``seconds``."""
    needed = max(1, math.ceil(seconds * fps - _EPS))
    return VAE_TEMPORAL_STRIDE * math.ceil((needed - 1) / VAE_TEMPORAL_STRIDE) + 1


def latent_frame_times(num_latent_frames: int, fps: float) -> list[float]:
    """The time each latent frame stands for: pixel frame i is the instant i/fps; latent frame 0 is pixel frame 0,
    latent frame j >= 1 is the centre of pixel frames 4j-3..4j, i.e. (4j - 1.5)/fps."""
    return [0.0] + [(VAE_TEMPORAL_STRIDE * j - 1.5) / fps for j in range(1, num_latent_frames)]


# ------------------------------------------------------------------------------------------------- helpers
_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_COMPACT_PHASE = re.compile(
    rf"^\s*\[?\s*(?P<start>{_NUMBER})\s*s?\s*(?:-|–|to)\s*(?P<end>{_NUMBER})\s*s?\s*\]?\s*:\s*(?P<text>.*)$",
    re.IGNORECASE,
)
#: A segment that starts like a time window ("0-", "1.5s to", "[2 -") but did not parse as one. A letter right after
#: the separator means ordinary text ("1990s-style anchor", "3 tomatoes"), not a broken anchor.
_LOOKS_TIMED = re.compile(r"^\s*\[?\s*-?[0-9.]+\s*s?\s*(?:-|–|to)(?![^\W\d_])", re.IGNORECASE)


def _phase_from_json(index: int, raw: Any) -> Phase:
    where = f"Phase entry {index + 1}"
    if not isinstance(raw, dict):
        raise PhaseScriptError(f"{where} is not an object.", 'Write each phase as {"start": 0, "end": 2, "text": "..."}.')
    missing = [k for k in ("start", "end", "text") if k not in raw]
    if missing:
        raise PhaseScriptError(f"{where} lacks {', '.join(missing)}.", 'Each phase needs "start", "end" (seconds) and "text".')
    extra = sorted(set(raw) - {"start", "end", "text"})
    if extra:
        raise PhaseScriptError(f"{where} has unknown field(s) {', '.join(extra)}.", 'Use only "start", "end" and "text".')
    values = []
    for key in ("start", "end"):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise PhaseScriptError(f"{where} has {key} = {_shown(value)}, which is not a finite number of seconds.", f"Write {key} as a number such as 2 or 2.5.")
        values.append(float(value) + 0.0)  # -0.0 is 0: JSON's "-0" and "-0.0" mean the same start
    if not isinstance(raw["text"], str):
        raise PhaseScriptError(f"{where} text is not a string.", "Describe the action as text.")
    return Phase(values[0], values[1], raw["text"])


#: Phase times at or beyond this many seconds (about 32 years) are refused: no clip is that long, and the grid
#: arithmetic stays exact below it.
_MAX_SECONDS = 1e9


def _shown(value: Any) -> str:
    """A JSON value in a message: numbers as ``format(x, "g")`` (the JS mirror cannot tell 1e9 from 1000000000.0,
    so the message must not either), anything else as its repr."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return repr(value)
    try:
        return f"{float(value):g}"
    except OverflowError:  # an integer beyond a double, which a JS reader sees as Infinity
        return "inf" if value > 0 else "-inf"


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value)) and abs(float(value)) < _MAX_SECONDS
    except OverflowError:  # a 400-digit integer
        return False


def _ordered(phases: Iterable[Phase]) -> tuple[Phase, ...]:
    return tuple(sorted(phases, key=lambda p: (p.start, p.end)))


def _grid_count(duration: float | None, fps: float, phases: Sequence[Phase]) -> float:
    """Latent frames of the clip (or of the longest phase when the clip length is not known yet); inf for an
    endless clip. A number, not a list: a phase may end a billion seconds in."""
    horizon = duration if duration is not None else max((p.end for p in phases), default=0.0)
    horizon = max(horizon, 1.0 / fps)
    if not math.isfinite(horizon * fps):  # an endless clip, or frames beyond a double (the JS counts Infinity)
        return math.inf if horizon > 0 else math.nan
    return latent_frame_count(frames_for_duration(horizon, fps))


def _holds_latent_frame(phase: Phase, count: float, fps: float) -> bool:
    """Whether a latent frame time ``t`` of the grid (``latent_frame_times``) has ``start - eps <= t < end - eps``.
    Walks only the few frames around the phase's start (the JS timeline does the same, step for step)."""
    lo, hi = phase.start - _EPS, phase.end - _EPS
    if count > 0 and lo <= 0 < hi:
        return True
    # two frames before the first time >= lo; the first of them at or after lo decides. A few steps suffice; the
    # bound keeps an absurd frame rate (1e300 fps, where j + 1 no longer changes t) from walking forever.
    first = (lo * fps + 1.5) / VAE_TEMPORAL_STRIDE
    if not math.isfinite(first):  # beyond any frame count (the JS reaches the same verdict with j = Infinity)
        return False
    j = max(1, math.ceil(first) - 2)
    for _ in range(_WALK_STEPS):
        if not j < count:
            return False
        t = (VAE_TEMPORAL_STRIDE * j - 1.5) / fps
        if t >= hi:
            return False
        if lo <= t:
            return True
        j += 1
    return False


def _clean_number(value: float) -> float | int:
    value = round(value, 6)
    return int(value) if value == int(value) else value


def _fmt(value: float) -> str:
    return f"{round(value, 3):g}"
