"""The embedded default model and demo inputs, and device/dtype resolution.

The default model is the trained mini model bundled under ``actavatar_core/weights/mini`` (see its model card).
When it is absent (a trimmed install), the tiny random models are used and the run is labelled a smoke run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent
MINI_MODEL_DIR = PACKAGE_DIR / "weights" / "mini"
DEMO_DIR = PACKAGE_DIR / "assets" / "demo"
#: Generation settings for the tiny smoke models (small and fast; the output is noise).
SMOKE_DEFAULTS = {"width": 64, "height": 64, "fps": 25.0, "steps": 4, "text_cfg": 5.0, "audio_cfg": 5.0, "shift": 5.0,
                  "paca_mode": "routed"}


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """'auto' picks CUDA when present, else the CPU; 'auto' precision is bf16 on GPUs that support it, else fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        chosen = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        chosen = table[dtype]
    return dev, chosen


def mini_model_available() -> bool:
    return (MINI_MODEL_DIR / "actavatar_model.json").is_file()


def load_default_models(device: Any = "cpu", dtype: Any = None, smoke: bool = False):
    """(models, generation defaults): the bundled mini model, or tiny random models for a smoke run. ``dtype`` None
    computes in float32: the mini model is stored in half precision to keep clones small, and at 34 MB of float32
    weights nothing is gained by computing in half precision on a CPU."""
    import torch

    from .bundle import load_model_folder, tiny_models

    if mini_model_available() and not smoke:
        models = load_model_folder(MINI_MODEL_DIR, device=device, dtype=dtype or torch.float32)
        return models, models.info.get("defaults", {})
    models = tiny_models(device=device)
    models.info.update(name="tiny random models (SMOKE RUN, no trained weights)", smoke=True)
    return models, dict(SMOKE_DEFAULTS)


def demo_inputs() -> tuple[Any, Any, str]:
    """(reference image, audio, phase script JSON) of the bundled example."""
    image, audio, script = DEMO_DIR / "reference.png", DEMO_DIR / "speech.wav", DEMO_DIR / "phases.json"
    if image.is_file() and audio.is_file() and script.is_file():
        return str(image), str(audio), script.read_text(encoding="utf-8")
    return _generated_demo_inputs()


def _generated_demo_inputs() -> tuple[np.ndarray, dict, str]:
    """A procedural stand-in when the bundled files are missing: a simple portrait and a syllable-like tone."""
    import torch

    size = 128
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = (40, 70, 140)
    image[((xx - 64) ** 2 + (yy - 46) ** 2) < 22 ** 2] = (230, 190, 160)
    image[(yy > 72) & (abs(xx - 64) < 34)] = (200, 40, 40)
    rate, seconds = 16000, 3.0
    t = np.arange(int(rate * seconds)) / rate
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2
    wave = (0.3 * envelope * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 540 * t))).astype(np.float32)
    script = {"version": 1, "base": "A person with a red shirt talks on a blue background", "negative": "",
              "phases": [{"start": 0.4, "end": 1.4, "text": "raises the left hand"},
                         {"start": 1.6, "end": 2.8, "text": "waves the right hand"}]}
    return image, {"waveform": torch.from_numpy(wave)[None, None], "sample_rate": rate}, json.dumps(script)
