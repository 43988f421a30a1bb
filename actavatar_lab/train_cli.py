"""``actavatar train --config FILE``: run the configured stages, then export the model folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="actavatar train", description="Two-stage ActAvatar training (see docs/METHOD.md's Training section and actavatar_core/training/config.py; the mini model's config is actavatar_lab/configs/mini.json).")
    p.add_argument("--config", required=True, help="training config (JSON)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--export", default=None, help="write the trained model folder here (default: OUTPUT_DIR/model)")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=None,
                   help="override the run's mixed_precision (auto: bf16 where the GPU or CPU computes it natively); "
                        "a stage that pins its own, as the mini recipe's VAE stages do, keeps it")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv[1:])
    from actavatar_core.errors import ActAvatarError
    from actavatar_core.training.config import load_config
    from actavatar_core.training.runs import export_model

    from .recipe import run_training

    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("mixed_precision", args.mixed_precision)) if v}
    overrides = overrides or None
    try:
        cfg = load_config(args.config, overrides)
        result = run_training(cfg, progress=not args.no_progress)
    except (ActAvatarError, ValueError) as exc:
        print(f"actavatar train: {exc}", file=sys.stderr)
        return 2
    report = result["report"]
    info = {"name": cfg.name, "training": report, "defaults": _defaults(cfg)}
    folder = export_model(result["models"], args.export or Path(cfg.output_dir) / "model", info)
    print(json.dumps(report, indent=2))
    print(f"model folder: {folder}")
    return 0


def _defaults(cfg) -> dict:
    synth = cfg.synth or {}
    size = int(synth.get("size", 128))
    return {"width": size, "height": size, "fps": float(synth.get("fps", 25.0)), "steps": 20, "text_cfg": 3.0,
            "audio_cfg": 2.0, "shift": cfg.shift, "paca_mode": cfg.paca_mode, "negative": "", **cfg.generation}
