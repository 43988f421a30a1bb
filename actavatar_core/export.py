"""``actavatar export``: write an ActAvatar model folder as the five single files ComfyUI users put in their
``models/`` folders (the writing itself is :func:`actavatar_core.bundle.export_comfyui_files`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bundle import EXPORT_DTYPES, export_comfyui_files, load_model_folder
from .errors import ActAvatarError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actavatar export", description=(
        "Write an ActAvatar model folder as the single files ComfyUI users put in models/: diffusion_models/, vae/, "
        "text_encoders/, audio_encoders/ and actavatar/."))
    p.add_argument("--model-dir", required=True, help="ActAvatar model folder (e.g. a training run's export)")
    p.add_argument("--out", required=True, help="folder to write into (e.g. ComfyUI/models)")
    p.add_argument("--name", default="actavatar_mini", help="file name stem (default: actavatar_mini)")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="fp16", help="stored precision (default fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace files of the same name")
    p.add_argument("--index", action="store_true",
                   help="also write OUT/../actavatar_model.json so the folder above OUT loads as a model folder "
                        "(--model-dir), with the source model's generation defaults (how the bundled mini model is made)")
    return p


def main(argv: list[str]) -> int:
    """``actavatar export``: argv[0] is the command name."""
    args = _parser().parse_args(argv[1:])
    try:
        models = load_model_folder(args.model_dir)
        paths = export_comfyui_files(models, args.out, name=args.name, dtype=EXPORT_DTYPES[args.dtype],
                                     overwrite=args.overwrite)
    except ActAvatarError as exc:
        print(f"actavatar export: {exc}", file=sys.stderr)
        return 2
    for part, path in paths.items():
        print(f"{part:<14} {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.index:
        out = Path(args.out).resolve()
        info = {k: v for k, v in models.info.items() if k != "spiece_model"}
        index = {"format": "actavatar-model", "version": 1, "layout": "comfyui-files", "files": out.name,
                 "name": args.name, "audio_config": models.audio_config, "info": info}
        (out.parent / "actavatar_model.json").write_text(json.dumps(index, indent=2) + "\n")
        print(f"index          {out.parent / 'actavatar_model.json'}")
    return 0
