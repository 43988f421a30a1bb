"""Training configuration: one JSON file describes data, models, and the stages to run.

Keys (all optional except ``output_dir`` and ``data.dataset``)::

    {
      "name": "actavatar-mini",
      "output_dir": "runs/mini",
      "seed": 0,
      "data": {"dataset": "data/synth-train",            # annotations.jsonl + clips/ (see actavatar_lab/synth)
               "synth": {"clips": 400, "seed": 0, "size": 128, "fps": 25, "duration": 3.0},  # generate if missing
               "cache": "runs/mini/cache", "shard_size": 64},
      "models": {"init": "mini-scratch" | "files" | "folder",  # mini-scratch: actavatar_lab.recipe builds them
                 "folder": "...",                          # init=folder: an ActAvatar model folder
                 "files": {"transformer": "...", "vae": "...", "text_encoder": "...", "audio_encoder": "...",
                           "actavatar": null},             # init=files: users' checkpoints (actavatar_core.loading)
                 "transformer": {...}, "vae": {...}, "text_encoder": {...}, "audio_encoder": {...},  # mini-scratch configs
                 "encoders_from": "..."},                  # mini-scratch: an ActAvatar model folder's encoders and VAE
      "text_len": 512,
      "stages": ["vae", "vae_decoder", "stage0", "stage1", "stage2"],  # any subset, in this order
      "vae":    {"steps": 1500, "lr": 1e-3, "batch_size": 4, "frames": 9,
                 "mixed_precision": "no"},                 # any stage: its own precision (default: the run's)
      "vae_decoder": {"steps": 1000, "lr": 3e-4, "frames": 21, "motion_weight": 4.0},  # decoder only, encoder frozen
      "stage0": {"steps": 2000, "lr": 5e-4, "prompt": "global"},   # backbone pretraining (mini only; Wan is pretrained)
      "stage1": {"steps": 1000, "lr": 5e-4, "prompt": "caption"},  # paper stage 1: audio adapter only, brief captions
      "stage2": {"steps": 2000, "lr": 2e-4, "prompt": "phased", "train": "full" | "lora", "lora_rank": 16,
                 "schedule": "constant" | "cosine",                # lr after warmup (cosine: down to 10 %)
                 "motion_weight": 0.0,                             # > 0: weight the loss towards what moves
                 "data": {"dataset": "...", "synth": {...}, "cache": "..."}},  # this stage's own clips (optional)
      "batch_size": 4, "grad_accum": 1, "weight_decay": 0.01, "max_grad_norm": 1.0, "warmup_steps": 50,
      "shift": 5.0, "caption_dropout": 0.1, "audio_dropout": 0.1,
      "gradient_checkpointing": false,
      "mixed_precision": "auto",                          # auto: bf16 autocast on CUDA and on CPUs with AVX512-BF16/AMX
                                                          # (weights stay fp32), else fp32; or no, bf16, fp16
      "checkpoint_every": 200, "validate_every": 0, "validate_steps": 10,
      "audio_schedule": "progressive", "audio_gamma": 1.5,
      "paca_mode": "learned",
      "generation": {"steps": 20, "text_cfg": 3.0, "audio_cfg": 2.0, "phase_cfg": 0.0}  # defaults stored in the exported model
    }

Paper values for a full-size run: stage1 20K steps and stage2 14K steps, batch 40, lr 5e-6, AdamW.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..attention import PACA_MODES

STAGES = ("vae", "vae_decoder", "stage0", "stage1", "stage2")
PROMPTS = ("caption", "global", "phased")
SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
GENERATION_KEYS = {"width", "height", "fps", "steps", "text_cfg", "audio_cfg", "phase_cfg", "shift", "paca_mode", "negative",
                   "sampler", "relay_width"}


@dataclass
class StageConfig:
    steps: int = 1000
    lr: float = 5e-4
    prompt: str = "phased"
    train: str = "full"  # stage 2: full or lora
    lora_rank: int = 16
    batch_size: int | None = None  # None: the top-level batch size
    frames: int = 9  # vae stage: frames per training clip
    crop: int | None = None  # vae stage: square crop size in pixels (None: whole frames)
    schedule: str = "constant"  # learning rate after warmup: constant, or cosine decay to 10 % at the last step
    motion_weight: float = 0.0  # extra loss weight on what moves in the clip (0: plain mean; see flow.motion_weights)
    mixed_precision: str | None = None  # this stage's own setting (None: the run's ``mixed_precision``)
    #: transformer stages: this stage's own clips, {"dataset", "synth", "cache"} as in the top-level "data" (the
    #: paper's stage 2 fine-tunes on other clips than stage 1); None: the run's dataset
    data: dict[str, Any] | None = None


@dataclass
class TrainConfig:
    output_dir: str
    dataset: str
    name: str = "actavatar"
    seed: int = 0
    synth: dict[str, Any] | None = None
    cache: str | None = None
    shard_size: int = 64
    models: dict[str, Any] = field(default_factory=lambda: {"init": "mini-scratch"})
    text_len: int = 512
    stages: list[str] = field(default_factory=lambda: ["stage1", "stage2"])
    stage: dict[str, StageConfig] = field(default_factory=dict)
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 50
    shift: float = 5.0
    caption_dropout: float = 0.1
    audio_dropout: float = 0.1
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    checkpoint_every: int = 200
    validate_every: int = 0
    validate_steps: int = 10
    audio_schedule: str = "progressive"
    audio_gamma: float = 1.5
    paca_mode: str = "learned"
    generation: dict[str, Any] = field(default_factory=dict)  # sampling defaults written into the exported model

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.output_dir) / "cache"

    def stage_config(self, name: str) -> StageConfig:
        return self.stage.get(name, StageConfig())

    def stage_mixed_precision(self, name: str) -> str:
        """A stage's precision setting: its own pin if it has one (the recipe keeps the VAE stages in fp32, as the
        shipped VAE was made), else the run's."""
        return self.stage_config(name).mixed_precision or self.mixed_precision

    def stage_cache_dir(self, name: str) -> Path:
        """Where a stage with its own ``data`` keeps its cache (the run's cache for the others)."""
        data = self.stage_config(name).data
        if not data:
            return self.cache_dir
        return Path(data["cache"]) if data.get("cache") else Path(self.output_dir) / f"cache-{name}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["stage"] = {k: asdict(v) for k, v in self.stage.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        """The inverse of :meth:`to_json` (a run folder's ``config.json``)."""
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["stage"] = {k: StageConfig(**v) for k, v in data.get("stage", {}).items()}
        return cls(**values)


def load_config(path: "str | os.PathLike", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a JSON config; relative paths in it are taken relative to the current folder (run from the repo root)."""
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw.update(overrides or {})
    return config_from_dict(raw)


def stage_data(stage: str, data: dict[str, Any], rel: Any) -> dict[str, Any]:
    """Check a stage's own ``data`` block and resolve its paths."""
    if stage in ("vae", "vae_decoder"):
        raise ValueError(f"{stage}.data: the VAE stages train on the run's dataset; give 'data' to stage0, stage1 or "
                         "stage2 instead")
    if not isinstance(data, dict) or "dataset" not in data:
        raise ValueError(f"{stage}.data needs a 'dataset' folder (and optionally 'synth' and 'cache'), like the "
                         "top-level 'data' block")
    unknown = sorted(set(data) - {"dataset", "synth", "cache"})
    if unknown:
        raise ValueError(f"{stage}.data: unknown key(s) {unknown}; allowed: dataset, synth, cache")
    return {**data, "dataset": rel(data["dataset"]), "cache": rel(data.get("cache"))}


def config_from_dict(raw: dict[str, Any], base_dir: "str | os.PathLike" = ".") -> TrainConfig:
    raw = dict(raw)
    base = Path(base_dir)
    data = raw.pop("data", {})
    if "output_dir" not in raw or "dataset" not in data:
        raise ValueError("a training config needs 'output_dir' and 'data.dataset'")

    def rel(p: str | None) -> str | None:
        return None if p is None else str(p if os.path.isabs(p) else base / p)

    stages = raw.pop("stages", ["stage1", "stage2"])
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    stage_cfgs = {}
    for name in STAGES:
        if name in raw:
            values = raw.pop(name)
            cfg = StageConfig(**values)
            if cfg.data is not None:
                cfg.data = stage_data(name, cfg.data, rel)
            if cfg.prompt not in PROMPTS:
                raise ValueError(f"{name}.prompt must be one of {PROMPTS}")
            if cfg.motion_weight < 0:
                raise ValueError(f"{name}.motion_weight must be >= 0 (0 turns it off), not {cfg.motion_weight}")
            if cfg.mixed_precision is not None and cfg.mixed_precision not in MIXED_PRECISIONS:
                raise ValueError(f"{name}.mixed_precision must be one of {MIXED_PRECISIONS} (or left out for the run's "
                                 f"setting), not {cfg.mixed_precision!r}")
            if cfg.schedule not in SCHEDULES:
                raise ValueError(f"{name}.schedule must be one of {SCHEDULES} (cosine decays to 10 %), not {cfg.schedule!r}")
            stage_cfgs[name] = cfg
    models = raw.pop("models", {"init": "mini-scratch"})
    for key in ("folder", "encoders_from"):
        if key in models:
            models[key] = rel(models[key])
    if "files" in models:
        models["files"] = {k: rel(v) for k, v in models["files"].items()}
    known = set(TrainConfig.__dataclass_fields__)
    extra = sorted(set(raw) - known)
    if extra:
        raise ValueError(f"unknown config key(s): {', '.join(extra)}")
    if raw.get("paca_mode", "learned") not in PACA_MODES:
        raise ValueError(f"paca_mode must be one of {PACA_MODES} ('routed' trains each frame on its own phases), "
                         f"not {raw['paca_mode']!r}")
    if raw.get("paca_mode") == "relay":
        raise ValueError("paca_mode 'relay' is a training-free sampling mode with no per-sample routing for training "
                         "batches; train with 'routed' or 'learned' and set \"generation\": {\"paca_mode\": \"relay\"}")
    if raw.get("mixed_precision", "auto") not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS} ('auto': bf16 where the GPU or CPU computes "
                         f"it natively, else fp32), not {raw['mixed_precision']!r}")
    raw["output_dir"] = rel(raw["output_dir"])
    bad = sorted(set(raw.get("generation", {})) - GENERATION_KEYS)
    if bad:
        raise ValueError(f"unknown generation default(s) {bad}; allowed: {sorted(GENERATION_KEYS)}")
    return TrainConfig(dataset=rel(data["dataset"]), synth=data.get("synth"), cache=rel(data.get("cache")),
                       shard_size=int(data.get("shard_size", 64)), models=models, stages=stages, stage=stage_cfgs,
                       **raw)
