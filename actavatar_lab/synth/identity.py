"""Character identities: colours, hair style and head shape drawn from a seed, plus the base-prompt text.

Why named palettes: the base prompt must describe the character truthfully ("a red shirt"), so every colour is a
named swatch with a little jitter, and swatches that would be hard to tell apart (background vs shirt, skin vs
hands' surroundings) are rejected so that both the model and the analytic detectors can see every part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RGB = tuple[int, int, int]

#: Named colours for shirts, hats and backgrounds (RGB, before jitter).
COLOURS: dict[str, RGB] = {
    "red": (200, 40, 45), "orange": (235, 130, 30), "yellow": (235, 205, 50), "green": (50, 160, 70),
    "teal": (30, 150, 150), "blue": (45, 85, 200), "purple": (130, 60, 170), "pink": (235, 120, 170),
    "white": (235, 235, 235), "grey": (128, 128, 128), "black": (32, 32, 36), "brown": (120, 75, 40),
    "navy": (30, 40, 110), "lime": (160, 220, 60), "maroon": (110, 25, 40), "cyan": (80, 200, 230),
}
HAIR_COLOURS: dict[str, RGB] = {
    "black": (25, 22, 20), "brown": (95, 60, 30), "blonde": (225, 190, 110), "red": (170, 60, 25),
    "grey": (160, 160, 160), "white": (228, 228, 228),
}
SKIN_TONES: dict[str, RGB] = {
    "light": (245, 212, 182), "tan": (214, 166, 122), "brown": (165, 110, 72), "dark": (118, 78, 52),
}
HAIR_STYLES = ("short", "long", "bald", "hat", "bun")
#: Colour of the open mouth's inside and of the eyes (fixed drawing rules the detectors rely on).
MOUTH_RGB: RGB = (38, 8, 18)
EYE_RGB: RGB = (25, 25, 35)

#: Geometry in 128-pixel units (the renderer scales to the clip size). The chin is fixed so that the mouth, neck
#: and shoulders sit at the same place for every character; the head's width/height and the hair vary.
CHIN_Y = 74.0
HEAD_RX = (16.0, 20.0)
HEAD_RY = (19.0, 23.0)

_MIN_DIST = {  # minimum RGB distances between parts that must stay distinguishable
    ("background", "shirt"): 110, ("background", "skin"): 100, ("background", "hair"): 90,
    ("background", "sleeve"): 70, ("shirt", "skin"): 90, ("sleeve", "skin"): 80, ("hair", "skin"): 70,
    ("background", "hat"): 90, ("hat", "skin"): 80,
}


@dataclass(frozen=True)
class Identity:
    """Everything that makes one character look like itself; drawn once per clip, visible in frame 0."""

    seed: int
    background: RGB
    background_name: str
    shirt: RGB
    shirt_name: str
    sleeve: RGB
    skin: RGB
    skin_name: str
    hair: RGB
    hair_name: str
    hair_style: str
    hat: RGB | None
    hat_name: str | None
    head_rx: float
    head_ry: float
    lips: RGB

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def describe(self) -> str:
        """The base-prompt block: who is talking and where (time-invariant, as in the paper's P_base)."""
        if self.hair_style == "hat":
            head = f"a {self.hat_name} hat"
        elif self.hair_style == "bald":
            head = "a bald head"
        elif self.hair_style == "bun":
            head = f"{self.hair_name} hair in a bun"
        else:
            head = f"{self.hair_style} {self.hair_name} hair"
        return (f"A person with {self.skin_name} skin, a {self.shirt_name} shirt and {head} "
                f"on a {self.background_name} background talks")


def _dist(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _jitter(rng: np.random.Generator, colour: RGB, amount: int = 12) -> RGB:
    return tuple(int(v) for v in np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, 3), 0, 255))  # type: ignore[return-value]


def sleeve_colour(shirt: RGB) -> RGB:
    """Sleeves are a darker (or, for dark shirts, lighter) shade so arms stay visible in front of the torso."""
    s = np.asarray(shirt, dtype=np.float64)
    lum = 0.299 * s[0] + 0.587 * s[1] + 0.114 * s[2]
    out = s * 0.62 if lum > 90 else s + (255 - s) * 0.38
    return tuple(int(round(v)) for v in out)  # type: ignore[return-value]


def sample_identity(seed: int) -> Identity:
    """Draw a character from its seed (rejection-sampling colour combinations that stay distinguishable)."""
    rng = np.random.default_rng([int(seed), 101])
    names = list(COLOURS)
    for _ in range(500):
        bg_name, shirt_name, hat_name = (names[i] for i in rng.choice(len(names), 3, replace=False))
        skin_name = list(SKIN_TONES)[rng.integers(len(SKIN_TONES))]
        hair_name = list(HAIR_COLOURS)[rng.integers(len(HAIR_COLOURS))]
        style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
        bg, shirt = _jitter(rng, COLOURS[bg_name]), _jitter(rng, COLOURS[shirt_name])
        skin, hair = _jitter(rng, SKIN_TONES[skin_name], 8), _jitter(rng, HAIR_COLOURS[hair_name], 10)
        hat = _jitter(rng, COLOURS[hat_name]) if style == "hat" else None
        if style == "bald":
            hair = skin
        parts = {"background": bg, "shirt": shirt, "sleeve": sleeve_colour(shirt), "skin": skin, "hair": hair}
        if hat is not None:
            parts["hat"] = hat
        ok = all(
            _dist(parts[a], parts[b]) >= d
            for (a, b), d in _MIN_DIST.items()
            if a in parts and b in parts and not (style == "bald" and "hair" in (a, b) and "skin" in (a, b))
        )
        if not ok:
            continue
        rx = float(rng.uniform(*HEAD_RX))
        ry = float(rng.uniform(*HEAD_RY))
        lips = tuple(int(round(0.55 * s + 0.45 * m)) for s, m in zip(skin, (150, 40, 50)))
        return Identity(
            seed=int(seed), background=bg, background_name=bg_name, shirt=shirt, shirt_name=shirt_name,
            sleeve=sleeve_colour(shirt), skin=skin, skin_name=skin_name, hair=hair,
            hair_name="none" if style == "bald" else hair_name, hair_style=style, hat=hat,
            hat_name=hat_name if hat is not None else None, head_rx=round(rx, 3), head_ry=round(ry, 3),
            lips=lips,  # type: ignore[arg-type]
        )
    raise RuntimeError(f"could not draw a distinguishable identity for seed {seed}")  # pragma: no cover
