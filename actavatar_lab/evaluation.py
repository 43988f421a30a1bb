"""``actavatar bench method``: does phase control work? Generate the held-out synthetic test set with a model and
score it with the analytic detectors (Hit@Segment, temporal IoU, lip sync, identity), per PACA mode; with
``--ablation`` also train the ablation variants (the rows of the paper's Table 4, at mini scale) and score them;
with ``--ablation-runs`` score variants trained elsewhere (all five, or those named by ``--ablation-variants``, each
with the shipped model's guidance or, with ``--ablation-guidance run``, its own).

The test set is the synthetic ``test`` split (seeds 900,000,000 and up, never used for training).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_TEST_SET = Path("runs") / "synth-test"

#: The held-out test splits, 100 clips each by default, on disjoint seeds of the ``test`` range (never used for
#: training or tuning): the built-in voice at 3 s (the shipped benchmark), espeak-ng's varied speakers at 3 s (the
#: voice alone changes), and 2-6 s clips with mixed voices (length and voice change together).
TEST_SPLITS: dict[str, dict[str, Any]] = {
    "synthetic": {"seed": 0, "duration": 3.0, "voice": "synthetic", "folder": DEFAULT_TEST_SET},
    "espeak": {"seed": 1000, "duration": 3.0, "voice": "espeak-ng", "folder": Path("runs") / "synth-test-espeak"},
    "mixed": {"seed": 2000, "duration": (2.0, 6.0), "voice": "mixed", "folder": Path("runs") / "synth-test-mixed"},
}


def ensure_test_set(folder: "str | Path", clips: int, duration: float | tuple[float, float] | None = None,
                    size: int = 128, fps: float = 25.0, split: str = "synthetic") -> Path:
    """The fixed held-out test split ``split`` (written once, deterministic from its seeds; ``duration`` None: the
    split's own). An existing folder must hold that split: scoring one split under another's name would publish
    wrong figures."""
    from actavatar_core.errors import ActAvatarError

    from .synth.writer import SPLITS, write_dataset

    spec = TEST_SPLITS[split]
    duration = spec["duration"] if duration is None else duration
    folder = Path(folder)
    if not (folder / "annotations.jsonl").is_file():
        write_dataset(folder, clips=clips, seed=spec["seed"], split="test", size=size, fps=fps, duration=duration,
                      voice=spec["voice"], workers=1)
        return folder
    manifest_path = folder / "dataset.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        first = SPLITS["test"][0] + spec["seed"]
        want_duration = list(duration) if isinstance(duration, tuple) else duration
        found = (manifest.get("seeds", [None])[0], manifest.get("duration"), manifest.get("voice", spec["voice"]))
        if manifest.get("split") == "test" and found != (first, want_duration, spec["voice"]):
            raise ActAvatarError(
                f"'{folder}' holds test clips from seed {found[0]}, {found[1]} s, voice {found[2]}, not the "
                f"{split} split (seed {first}, {want_duration} s, voice {spec['voice']}).",
                f"Pass --test-set with a new folder for --split {split}, or the split that folder holds.")
    return folder


def generate_clip(models: Any, annotation: dict[str, Any], dataset: Path, *, steps: int, text_cfg: float, audio_cfg: float,
                  paca_mode: str, phased_prompt: bool = True, seed: int = 0, negative: str = "",
                  shift: float = 5.0, phase_cfg: float = 0.0) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Generate one test clip from its first frame, its audio and its phase script."""
    from actavatar_core.pipeline import ActAvatarPipeline, GenerationRequest
    from actavatar_core.sampling import SamplingOptions, mode_options
    from actavatar_core.video import read_video

    frames, fps, audio, rate = read_video(dataset / annotation["video"])
    reference = frames[0]
    script = {"version": 1, "base": annotation["base"], "negative": "", "phases": annotation["phases"]}
    request = GenerationRequest(
        image=reference, audio={"waveform": audio[None], "sample_rate": rate}, phases=script,
        width=int(annotation["width"]), height=int(annotation["height"]), fps=float(annotation["fps"]),
        num_frames=int(annotation["num_frames"]), negative=negative, phased_prompt=phased_prompt,
        options=SamplingOptions(steps=steps, text_cfg=text_cfg, audio_cfg=audio_cfg, seed=seed, **mode_options(paca_mode),
                                shift=shift, phase_cfg=phase_cfg))
    result = ActAvatarPipeline(models).generate(request)
    return result.frames, audio, rate, reference


def evaluate_model(models: Any, test_set: Path, *, modes: list[tuple[str, str, bool]], clips: int | None = None,
                   steps: int = 20, text_cfg: float = 3.0, audio_cfg: float = 2.0, shift: float = 5.0,
                   phase_cfg: float = 0.0, save_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score ``models`` on the test set for each (row name, PACA mode, phased prompt) in ``modes``."""
    import torch

    from .synth.metrics import aggregate, evaluate_clip

    lines = read_test_annotations(test_set, clips)
    out: dict[str, Any] = {}
    for name, mode, phased in modes:
        started, results = time.time(), []
        for k, ann in enumerate(lines):
            with torch.no_grad():
                frames, audio, rate, ref = generate_clip(models, ann, test_set, steps=steps, text_cfg=text_cfg,
                                                         audio_cfg=audio_cfg, paca_mode=mode, phased_prompt=phased,
                                                         seed=k, shift=shift, phase_cfg=phase_cfg)
            results.append(evaluate_clip(frames, audio, rate, ann, reference=ref))
            if save_dir is not None and k < 4:
                from actavatar_core.video import write_mp4

                write_mp4(save_dir / f"{name.replace(' ', '_')}_{ann['id']}.mp4", frames, ann["fps"], audio, rate)
        summary = aggregate(results)
        summary["seconds"] = round(time.time() - started, 1)
        summary["clips"] = len(results)
        summary["groups"] = group_scores(test_set, lines, results)
        summary["per_clip"] = per_clip_scores(lines, results)
        out[name] = summary
        log(f"{name}: {_short(summary)}")
    return out


def read_test_annotations(test_set: Path, clips: int | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (test_set / "annotations.jsonl").read_text().splitlines() if x.strip()]
    return lines[:clips] if clips else lines


def _score_test_clips(test_set: Path, clips: int | None, transform: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """The detectors on ``transform`` of each test clip's frames, against its own first frame."""
    from actavatar_core.video import read_video

    from .synth.metrics import aggregate, evaluate_clip

    results, annotations = [], read_test_annotations(test_set, clips)
    for ann in annotations:
        frames, _, audio, rate = read_video(test_set / ann["video"])
        frames = frames[: int(ann["num_frames"])]
        results.append(evaluate_clip(transform(frames)[: len(frames)], audio, rate, ann, reference=frames[0]))
    summary = aggregate(results)
    summary["clips"] = len(results)
    summary["groups"] = group_scores(test_set, annotations, results)
    return summary


def per_clip_scores(annotations: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each clip's phase hits and lip sync, so that two runs on the same clips (e.g. the same model stored in two
    precisions) can be compared clip by clip, which is far more sensitive than comparing their means."""
    return [{"id": ann["id"], "hits": [bool(p["hit"]) for p in r.get("per_phase", [])],
             "lipsync_corr": r.get("lipsync_corr")} for ann, r in zip(annotations, results)]


#: Clip-length bins (seconds) that the per-group scores of a mixed-length split use.
LENGTH_BINS = ((0.0, 3.0), (3.0, 4.5), (4.5, float("inf")))


def group_scores(test_set: Path, annotations: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores per voice and per clip-length bin, when the split mixes them (empty otherwise): a pooled figure can
    hide that one voice or one length is what fails."""
    from .synth.metrics import aggregate

    voices, lengths = [], []
    for ann in annotations:
        truth = test_set / "groundtruth" / f"{ann['id']}.json"
        voices.append(json.loads(truth.read_text()).get("voice", "unknown") if truth.is_file() else "unknown")
        seconds = float(ann["num_frames"]) / float(ann["fps"])
        lengths.append(next(f"{lo:g}-{hi:g} s" if hi != float("inf") else f"{lo:g} s and longer"
                            for lo, hi in LENGTH_BINS if lo <= seconds < hi))
    groups: dict[str, Any] = {}
    for label, keys in (("voice", voices), ("length", lengths)):
        if len(set(keys)) > 1:
            for key in sorted(set(keys)):
                picked = [r for r, k in zip(results, keys) if k == key]
                groups[f"{label} {key}"] = {k: v for k, v in aggregate(picked).items() if k != "hit_at_segment_per_action"}
    return groups


def score_ground_truth(test_set: Path, clips: int | None = None) -> dict[str, Any]:
    """The detectors on the test clips themselves: the ceiling each figure can reach (a real mouth-audio correlation
    is well below 1 because the mouth follows a smoothed envelope)."""
    return _score_test_clips(test_set, clips, lambda frames: frames)


def score_reconstruction(models: Any, test_set: Path, clips: int | None = None) -> dict[str, Any]:
    """The detectors on the test clips after the model's VAE (encode, then decode): the ceiling a perfect
    transformer could reach, since everything it makes comes out through that decoder."""
    import torch

    from actavatar_core.vae import decode_latents, encode_video, frames_to_tensor

    def through_vae(frames: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return decode_latents(models.vae, encode_video(models.vae, frames_to_tensor(frames)))

    return _score_test_clips(test_set, clips, through_vae)


def _short(s: dict[str, Any]) -> str:
    keys = [k for k in ("hit_at_segment", "tiou", "lipsync_corr", "identity_dist") if k in s]
    return ", ".join(f"{k} {s[k]:.3f}" for k in keys if isinstance(s[k], (int, float)))


FLAT_PROMPT = "flat"  # bench method's name for the no-PACA row: one flat prompt, sampled in global mode


def bench_rows(label: str, specs: str) -> list[tuple[str, str, bool]]:
    """(row name, PACA mode spec, phased prompt) for each comma-separated spec of ``bench method --modes``."""
    rows = []
    for spec in (s.strip() for s in specs.split(",")):
        if spec == FLAT_PROMPT:
            rows.append((f"{label}, global prompt (no PACA)", "global", False))
        elif spec:
            rows.append((f"{label}, PACA {spec}", spec, True))
    return rows


# ---------------------------------------------------------------------------------------------- ablation
ABLATION_ROWS = [
    # (row, variant trained, inference PACA mode, phased prompt)
    ("Global prompt (no PACA)", "global", "global", False),
    ("PACA learned (paper)", "paca", "learned", True),
    ("PACA routed (ours, trained routed)", "routed", "routed", True),
    ("PACA routed at inference only (the learned variant)", "paca", "routed", True),
    ("PACA learned, uniform audio", "uniform", "learned", True),
    ("PACA learned, one-stage", "onestage", "learned", True),
    # our claim for routing: it steers weights never trained for phases (the global variant's)
    ("PACA routed on the global variant (ours, untrained for phases)", "global", "routed", True),
]
ABLATION_VARIANTS = tuple(dict.fromkeys(variant for _, variant, _, _ in ABLATION_ROWS))  # trained runs the rows need


def ablation_configs(base_run: Path, dataset: Path, out: Path, stage1_steps: int, stage2_steps: int) -> dict[str, dict]:
    """Training configs of the ablation variants. They share the base run's encoders, VAE and stage-0 backbone
    (copied from ``base_run``) and retrain stages 1 and 2 with the base run's own stage settings (learning rate,
    schedule, motion weight, frames...) for the given steps; each differs from the others only in what its row
    ablates. With the base run's own step counts they are that recipe's variants at full scale."""
    base = json.loads((base_run / "config.json").read_text())
    common = {k: base[k] for k in ("text_len", "batch_size", "grad_accum", "weight_decay", "max_grad_norm", "warmup_steps",
                                   "shift", "caption_dropout", "audio_dropout", "seed") if k in base}
    common["models"] = base.get("models", {"init": "mini-scratch"})
    b1, b2 = base["stage"].get("stage1", {}), base["stage"].get("stage2", {})
    s1 = {"lr": 5e-4, "schedule": "constant", **b1, "steps": stage1_steps, "prompt": "caption"}
    s2 = {"lr": 2e-4, "schedule": "constant", **b2, "steps": stage2_steps, "prompt": "phased"}
    variants = {
        "global": {"stages": ["stage0", "stage1", "stage2"], "stage1": s1, "stage2": {**s2, "prompt": "global"}},
        "paca": {"stages": ["stage0", "stage1", "stage2"], "stage1": s1, "stage2": s2},
        "routed": {"stages": ["stage0", "stage1", "stage2"], "stage1": s1, "stage2": s2, "paca_mode": "routed"},
        "uniform": {"stages": ["stage0", "stage1", "stage2"], "stage1": s1, "stage2": s2, "audio_schedule": "uniform"},
        "onestage": {"stages": ["stage0", "stage2"], "stage2": {**s2, "steps": stage1_steps + stage2_steps}},
    }
    configs = {}
    for name, v in variants.items():
        cfg = {**common, **v, "name": f"ablation-{name}", "output_dir": str(out / name),
               "data": {"dataset": str(dataset), "cache": str(base_run / "cache")}}  # same encoders: reuse the cache
        cfg["stage0"] = {"steps": 0, "prompt": "global"}
        configs[name] = cfg
    return configs


def seed_variant_from_base(base_run: Path, variant_dir: Path) -> None:
    """Start a variant from the shipped run's encoders, trained VAE and finished stage 0."""
    variant_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "stage0"):
        if not (variant_dir / sub).exists():
            shutil.copytree(base_run / sub, variant_dir / sub)


def run_ablation(base_run: Path, dataset: Path, test_set: Path, out: Path, *, stage1_steps: int, stage2_steps: int,
                 clips: int, steps: int, text_cfg: float, audio_cfg: float, shift: float = 5.0,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    from actavatar_core.training.config import config_from_dict
    from .recipe import run_training

    configs = ablation_configs(base_run, dataset, out, stage1_steps, stage2_steps)
    trained: dict[str, Any] = {}
    for name, raw in configs.items():
        seed_variant_from_base(base_run, Path(raw["output_dir"]))
        cfg = config_from_dict(raw)
        log(f"ablation variant '{name}': stages {cfg.stages}")
        trained[name] = run_training(cfg, log=log, progress=False)["models"]
    rows = score_ablation(trained, test_set, clips=clips, steps=steps, text_cfg=text_cfg, audio_cfg=audio_cfg,
                          shift=shift, log=log)
    return {"rows": rows, "stage1_steps": stage1_steps, "stage2_steps": stage2_steps}


def score_ablation(trained: dict[str, Any], test_set: Path, *, clips: int, steps: int, text_cfg: float,
                   audio_cfg: float, shift: float, guidance: dict[str, tuple[float, float]] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """The Table-4 rows of trained variants (``{"global": models, "paca": ..., "routed": ..., "uniform": ...,
    "onestage": ...}``); rows whose variant is not in ``trained`` are left out. ``guidance`` gives a variant its
    own (text, audio) guidance, e.g. the one picked for it on the validation split; the others use ``text_cfg`` and
    ``audio_cfg``. Each row records the guidance it was sampled with."""
    rows = {}
    for row, variant, mode, phased in ABLATION_ROWS:
        if variant not in trained:
            continue
        t_cfg, a_cfg = (guidance or {}).get(variant, (text_cfg, audio_cfg))
        scored = evaluate_model(trained[variant], test_set, modes=[(row, mode, phased)], clips=clips, steps=steps,
                                text_cfg=t_cfg, audio_cfg=a_cfg, shift=shift, log=log)
        for figures in scored.values():
            figures.update(text_cfg=t_cfg, audio_cfg=a_cfg)
        rows.update(scored)
    return rows


def load_ablation_runs(folder: Path, variants: "list[str] | None" = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Variants trained elsewhere (one finished run folder per variant, named as in :data:`ABLATION_ROWS`), with a
    summary of how each was trained (batch, steps per stage, its own generation defaults) for the table's caption.
    ``variants`` picks some of them (default: all five)."""
    from actavatar_core.errors import ActAvatarError
    from actavatar_core.training.runs import read_run_config

    from .recipe import load_trained_run

    names = sorted(variants or ABLATION_VARIANTS)
    unknown = [n for n in names if n not in ABLATION_VARIANTS]
    if unknown:
        raise ActAvatarError(f"unknown ablation variant(s) {unknown}.", f"Choose from {', '.join(ABLATION_VARIANTS)}.")
    missing = [n for n in names if not (folder / n / "config.json").is_file()]
    if missing:
        raise ActAvatarError(f"'{folder}' lacks the ablation variant run(s) {missing}.",
                             f"Train one run folder per variant ({', '.join(names)}) in it, or pick the trained ones "
                             f"with --ablation-variants.")
    trained, recipes = {}, {}
    for name in names:
        trained[name] = load_trained_run(folder / name)
        cfg = read_run_config(folder / name)
        recipes[name] = {"batch_size": cfg.batch_size,
                         "steps": {s: cfg.stage_config(s).steps for s in cfg.stages if s in cfg.stage},
                         "generation": dict(cfg.generation)}
    return trained, recipes


def run_guidance(recipes: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each variant's own (text, audio) guidance from its run's generation defaults, for ``--ablation-guidance run``."""
    from actavatar_core.errors import ActAvatarError

    out = {}
    for name, recipe in recipes.items():
        gen = recipe.get("generation", {})
        if "text_cfg" not in gen or "audio_cfg" not in gen:
            raise ActAvatarError(f"ablation variant '{name}' has no text_cfg/audio_cfg in its config's generation "
                                 "defaults.", "Add them (picked on the validation split) or use --ablation-guidance model.")
        out[name] = (float(gen["text_cfg"]), float(gen["audio_cfg"]))
    return out


# ---------------------------------------------------------------------------------------------- table
COLUMNS = [("hit_at_segment", "H@S"), ("tiou", "tIoU"), ("spurious_action_rate", "spurious"),
           ("lipsync_corr", "mouth-audio r"), ("lipsync_best_lag_median", "best lag"), ("identity_dist", "id drift")]


def recipe_summary(name: str, recipe: dict[str, Any]) -> str:
    """'global stage1 1500/stage2 7000 steps at batch 4': the transformer stages only (the VAE stages are shared)."""
    stages = "/".join(f"{k} {v}" for k, v in recipe["steps"].items() if k.startswith("stage"))
    return f"{name} {stages} steps at batch {recipe['batch_size']}"


def format_table(rows: dict[str, dict[str, Any]], title: str) -> str:
    lines = [title, "| configuration | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, r in rows.items():
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key)
            cells.append("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="actavatar bench method", description=__doc__)
    p.add_argument("--model", default=None, help="ActAvatar model folder (default: the bundled mini model)")
    p.add_argument("--split", choices=list(TEST_SPLITS), default="synthetic",
                   help="held-out test split: synthetic (built-in voice, 3 s; the shipped benchmark), espeak "
                        "(espeak-ng's varied speakers, 3 s) or mixed (2-6 s, mixed voices)")
    p.add_argument("--test-set", default=None, help="folder of the test split (written if missing; default "
                   "runs/synth-test, runs/synth-test-espeak or runs/synth-test-mixed)")
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--modes", default="learned,routed",
                   help="PACA modes to score the model with, comma-separated: a mode (global, learned, routed, relay), "
                        "relay=WIDTH or feather=FRAMES (routed with a feather; both in latent frames), or flat (the "
                        "paper's no-PACA baseline: base and actions in one prompt, no times)")
    p.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=True,
                   help="score the test clips themselves and through the model's VAE (--no-ceilings skips them, e.g. "
                        "for further rows of a split and VAE already scored)")
    p.add_argument("--text-cfg", type=float, default=None, help="text guidance (default: the model's)")
    p.add_argument("--audio-cfg", type=float, default=None, help="audio guidance (default: the model's)")
    p.add_argument("--phase-cfg", type=float, default=None,
                   help="phase guidance for the model rows (default: the model's; the ablation rows use none)")
    p.add_argument("--ablation", default=None, metavar="BASE_RUN",
                   help="also train and score the ablation variants, starting from this training run's stage 0")
    p.add_argument("--ablation-runs", default=None, metavar="FOLDER",
                   help="score ablation variants already trained (e.g. on a GPU machine): FOLDER/{global,paca,routed,"
                        "uniform,onestage} are finished run folders; nothing is trained")
    p.add_argument("--ablation-variants", default=None, metavar="LIST",
                   help="with --ablation-runs: score only these trained variants (comma-separated; default: all five)")
    p.add_argument("--ablation-guidance", choices=("model", "run"), default="model",
                   help="with --ablation-runs: 'model' samples every row with the scored model's guidance; 'run' "
                        "samples each variant with its own run's generation defaults (picked on the validation split)")
    p.add_argument("--ablation-dataset", default=None, help="training dataset of the variants (default: the base run's)")
    p.add_argument("--ablation-out", default="runs/ablation")
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage2-steps", type=int, default=600)
    p.add_argument("--ablation-sample-steps", type=int, default=None,
                   help="sampling steps for the ablation rows (default: --steps); fewer keeps a CPU run short")
    p.add_argument("--json", default=None, help="write the figures as JSON")
    p.add_argument("--save-samples", default=None, help="write a few generated clips per row here")
    args = p.parse_args(argv[1:])
    if args.ablation and args.ablation_runs:
        p.error("--ablation trains the variants and --ablation-runs scores trained ones; pass one of them")
    if (args.ablation_variants or args.ablation_guidance != "model") and not args.ablation_runs:
        p.error("--ablation-variants and --ablation-guidance apply to --ablation-runs (scoring trained variants)")
    from actavatar_core.sampling import mode_options

    for spec in filter(None, args.modes.split(",")):
        if spec.strip() == FLAT_PROMPT:
            continue
        try:
            mode_options(spec)
        except ValueError as err:
            p.error(str(err))

    import torch

    from actavatar_core.bundle import load_model_folder
    from actavatar_core.defaults import load_default_models

    try:
        test_set = ensure_test_set(args.test_set or TEST_SPLITS[args.split]["folder"], args.clips, split=args.split)
    except ValueError as err:
        print(f"actavatar bench method: {err}", file=sys.stderr)
        return 2
    if args.model:
        models = load_model_folder(args.model, dtype=torch.float32)  # scored as the CLI computes on a CPU
    else:
        models, _ = load_default_models()
    d = models.info.get("defaults", {})
    steps = args.steps or int(d.get("steps", 20))
    text_cfg = float(args.text_cfg if args.text_cfg is not None else d.get("text_cfg", 3.0))
    audio_cfg = float(args.audio_cfg if args.audio_cfg is not None else d.get("audio_cfg", 2.0))
    shift = float(d.get("shift", 5.0))
    phase_cfg = float(args.phase_cfg if args.phase_cfg is not None else d.get("phase_cfg", 0.0))
    save = Path(args.save_samples) if args.save_samples else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    label = models.info.get("name", "model")
    modes = bench_rows(label, args.modes)
    result: dict[str, Any] = {"model": label, "split": args.split, "test_set": str(test_set), "clips": args.clips, "steps": steps,
                              "text_cfg": text_cfg, "audio_cfg": audio_cfg, "phase_cfg": phase_cfg, "shift": shift}
    if args.ceilings:
        result["ground_truth"] = score_ground_truth(test_set, args.clips)
        result["vae_reconstruction"] = score_reconstruction(models, test_set, args.clips)
        print(format_table({"test clips themselves (detector ceiling)": result["ground_truth"],
                            "test clips through the model's VAE (the model's ceiling)": result["vae_reconstruction"]},
                           f"Detectors on the {args.clips} ground-truth test clips"))
    result["model_rows"] = evaluate_model(models, test_set, modes=modes, clips=args.clips, steps=steps,
                                          text_cfg=text_cfg, audio_cfg=audio_cfg, shift=shift, phase_cfg=phase_cfg,
                                          save_dir=save)
    print(format_table(result["model_rows"], f"Model on {args.clips} held-out clips of the {args.split} split ({steps} steps, guidance "
                                             f"text {text_cfg:g} / audio {audio_cfg:g} / phase {phase_cfg:g})"))
    ceiling = [("through the VAE", result["vae_reconstruction"])] if args.ceilings else []
    for name, row in ceiling + list(result["model_rows"].items()):
        if row.get("groups"):
            print()
            print(format_table(row["groups"], f"{name}, per voice and clip length"))
    if args.ablation:
        base_run = Path(args.ablation)
        base_cfg = json.loads((base_run / "config.json").read_text())
        dataset = Path(args.ablation_dataset or base_cfg["dataset"])
        abl_steps = args.ablation_sample_steps or steps
        abl = run_ablation(base_run, dataset, test_set, Path(args.ablation_out), stage1_steps=args.stage1_steps,
                           stage2_steps=args.stage2_steps, clips=args.clips, steps=abl_steps, text_cfg=text_cfg,
                           audio_cfg=audio_cfg, shift=shift)
        result["ablation"] = abl
        print()
        print(format_table(abl["rows"], f"Ablation (mini scale: shared stage-0 backbone, stage 1 {args.stage1_steps} "
                                        f"steps, stage 2 {args.stage2_steps} steps, fewer than the shipped model; "
                                        f"{abl_steps} sampling steps)"))
    if args.ablation_runs:
        abl_steps = args.ablation_sample_steps or steps
        variants = [v.strip() for v in args.ablation_variants.split(",") if v.strip()] if args.ablation_variants else None
        trained, recipes = load_ablation_runs(Path(args.ablation_runs), variants)
        guidance = run_guidance(recipes) if args.ablation_guidance == "run" else None
        rows = score_ablation(trained, test_set, clips=args.clips, steps=abl_steps, text_cfg=text_cfg,
                              audio_cfg=audio_cfg, shift=shift, guidance=guidance)
        result["ablation"] = {"rows": rows, "runs": args.ablation_runs, "recipes": recipes,
                              "guidance": args.ablation_guidance}
        print()
        trained_as = "; ".join(recipe_summary(name, r) for name, r in recipes.items())
        guided = "each run's own" if guidance else f"{text_cfg}/{audio_cfg}"
        print(format_table(rows, f"Ablation (variants trained in {args.ablation_runs}: {trained_as}; "
                                 f"{abl_steps} sampling steps; guidance {guided})"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=_json_default))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
