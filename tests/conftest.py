"""Shared fixtures: tiny models of the real classes, built in-process (no download, no GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models():
    from actavatar_core.bundle import tiny_models as build

    return build(seed=0)


@pytest.fixture(scope="session")
def portrait() -> np.ndarray:
    """A simple 96x80 RGB portrait-like image."""
    yy, xx = np.mgrid[0:80, 0:96]
    img = np.zeros((80, 96, 3), np.uint8)
    img[:] = (30, 60, 120)
    img[((xx - 48) ** 2 + (yy - 30) ** 2) < 15 ** 2] = (230, 190, 160)
    img[yy > 50] = (180, 30, 30)
    return img


def speech_like(seconds: float = 1.0, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of a harmonic tone: (channels, samples) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    env = np.clip(np.sin(2 * np.pi * 3.3 * t + rng.uniform(0, 6)), 0, None) ** 2
    wave = 0.3 * env * (np.sin(2 * np.pi * 170 * t) + 0.4 * np.sin(2 * np.pi * 510 * t))
    return np.repeat(wave[None].astype(np.float32), channels, axis=0)


@pytest.fixture
def speech():
    return speech_like
