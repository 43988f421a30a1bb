"""Anti-aliased rendering of the synthetic character with PIL (4x supersampling, box-filtered down).

Why this look: the mini model's Wan2.2-style VAE compresses 16x spatially, so at 128 px every part that carries
meaning is big and high-contrast: 9-px sleeves, 7-px-radius hands in skin colour against the background, a
16-px-wide mouth that opens up to 10 px, and a head that drops by 5-11 px when nodding. All coordinates below are
in 128-pixel units and scaled to the requested size; the detectors (detect.py) read the same constants.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .actions import ARM_WIDTH, HAND_RADIUS, L_SHOULDER, R_SHOULDER, Pose
from .identity import CHIN_Y, EYE_RGB, MOUTH_RGB, Identity

SUPERSAMPLE = 4
HEAD_CX = 64.0
#: Mouth: centre height below the chin, outer width, inner height = MOUTH_MIN + MOUTH_RANGE * opening.
MOUTH_BELOW_CHIN = 11.0
MOUTH_WIDTH = 13.0
MOUTH_MIN = 1.2
MOUTH_RANGE = 8.0
NECK_HALF_WIDTH = 9.0
TORSO_TOP = 84.0


def render_frame(identity: Identity, pose: Pose, mouth_open: float, size: int = 128, body_dx: float = 0.0) -> np.ndarray:
    """One uint8 RGB frame (size, size, 3)."""
    k = size / 128.0 * SUPERSAMPLE
    img = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), identity.background)
    d = ImageDraw.Draw(img)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [(x0 + body_dx) * k, y0 * k, (x1 + body_dx) * k, y1 * k]

    def pt(p: np.ndarray) -> tuple[float, float]:
        return ((p[0] + body_dx) * k, p[1] * k)

    rx, ry = identity.head_rx, identity.head_ry
    cx, cy = HEAD_CX, CHIN_Y - ry + pose.head_dy
    style = identity.hair_style

    # hair behind the head (long hair falls to the shoulders)
    if style == "long":
        d.rounded_rectangle(box(cx - rx - 4, cy - ry - 4, cx + rx + 4, cy + ry + 10), radius=10 * k, fill=identity.hair)
    # neck, then torso over its lower end
    d.rectangle(box(cx - NECK_HALF_WIDTH, cy + ry - 6, cx + NECK_HALF_WIDTH, TORSO_TOP + 6), fill=identity.skin)
    d.rounded_rectangle(box(28, TORSO_TOP, 100, 150), radius=16 * k, fill=identity.shirt)
    d.polygon([pt(np.array(p)) for p in ((57, TORSO_TOP), (71, TORSO_TOP), (64, TORSO_TOP + 9))], fill=identity.skin)
    # head
    if style in ("short", "bun"):
        d.ellipse(box(cx - rx - 2, cy - ry - 5, cx + rx + 2, cy + 0.4 * ry), fill=identity.hair)
    if style == "bun":
        d.ellipse(box(cx - 8, cy - ry - 15, cx + 8, cy - ry + 1), fill=identity.hair)
    if style == "long":
        d.ellipse(box(cx - rx - 3, cy - ry - 5, cx + rx + 3, cy + 0.3 * ry), fill=identity.hair)
    d.ellipse(box(cx - rx, cy - ry, cx + rx, cy + ry), fill=identity.skin)
    if style in ("short", "long", "bun"):  # fringe over the forehead
        d.chord(box(cx - rx - 1, cy - ry - 5, cx + rx + 1, cy - 0.1 * ry), 180, 360, fill=identity.hair)
    if style == "hat" and identity.hat is not None:
        d.rounded_rectangle(box(cx - rx + 2, cy - ry - 13, cx + rx - 2, cy - ry + 3), radius=3 * k, fill=identity.hat)
        d.rounded_rectangle(box(cx - rx - 6, cy - ry + 1, cx + rx + 6, cy - ry + 6), radius=2 * k, fill=identity.hat)
    ey = cy - 0.3 * ry
    for ex in (cx - 0.4 * rx, cx + 0.4 * rx):
        d.ellipse(box(ex - 2.4, ey - 2.6, ex + 2.4, ey + 2.6), fill=EYE_RGB)
    my = cy + ry - MOUTH_BELOW_CHIN
    h = MOUTH_MIN + MOUTH_RANGE * float(np.clip(mouth_open, 0.0, 1.0))
    w = MOUTH_WIDTH
    d.ellipse(box(cx - w / 2 - 1.5, my - h / 2 - 1.5, cx + w / 2 + 1.5, my + h / 2 + 1.5), fill=identity.lips)
    d.ellipse(box(cx - w / 2, my - h / 2, cx + w / 2, my + h / 2), fill=MOUTH_RGB)

    # arms (sleeves) and hands, in front of everything
    r_aw = ARM_WIDTH * k
    for shoulder, elbow, hand in ((R_SHOULDER, pose.r_elbow, pose.r_hand), (L_SHOULDER, pose.l_elbow, pose.l_hand)):
        d.line([pt(shoulder), pt(elbow), pt(hand)], fill=identity.sleeve, width=int(round(r_aw)), joint="curve")
        for p in (shoulder, elbow):
            d.ellipse(box(p[0] - ARM_WIDTH / 2, p[1] - ARM_WIDTH / 2, p[0] + ARM_WIDTH / 2, p[1] + ARM_WIDTH / 2), fill=identity.sleeve)
    if pose.finger > 0.05:
        direction = pose.r_hand - pose.r_elbow
        direction = direction / (np.linalg.norm(direction) + 1e-9)
        tip = pose.r_hand + direction * (HAND_RADIUS + 6.0 * pose.finger)
        d.line([pt(pose.r_hand), pt(tip)], fill=identity.skin, width=int(round(3.5 * k)))
        d.ellipse(box(tip[0] - 1.75, tip[1] - 1.75, tip[0] + 1.75, tip[1] + 1.75), fill=identity.skin)
    for hand in (pose.r_hand, pose.l_hand):
        d.ellipse(box(hand[0] - HAND_RADIUS, hand[1] - HAND_RADIUS, hand[0] + HAND_RADIUS, hand[1] + HAND_RADIUS), fill=identity.skin)
    return np.asarray(img.reduce(SUPERSAMPLE))
