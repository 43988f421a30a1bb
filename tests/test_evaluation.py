"""`actavatar bench method` machinery: the test split, scoring a model on it, the ablation variants and the table;
and the research harness's place beside the engine (the nodes and the engine never import it; the CLI says when
it is missing)."""

import ast
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from actavatar_lab import evaluation

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_nodes_the_pack_root_and_the_engine_never_import_the_harness():
    files = [ROOT / "__init__.py", *sorted((ROOT / "nodes").rglob("*.py")), *sorted((ROOT / "actavatar_core").rglob("*.py"))]
    assert len(files) > 20
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in _imported_modules(f) if m.split(".")[0] == "actavatar_lab")
                 for f in files}
    assert not {f: m for f, m in offenders.items() if m}


@pytest.mark.parametrize("argv, command", [(["synth", "--out", "x"], "synth"), (["train", "--config", "c.json"], "train"),
                                           (["bench", "method"], "bench method")])
def test_harness_commands_exit_2_with_a_fix_without_the_harness(monkeypatch, capsys, argv, command):
    from actavatar_core.cli import main

    for name in [m for m in sys.modules if m == "actavatar_lab" or m.startswith("actavatar_lab.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "actavatar_lab", None)  # as if only the engine were installed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"actavatar {command}: ") and "research harness" in err and "Fix: install" in err


def test_ablation_variants_differ_only_where_the_paper_table_says(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "text_len": 64, "batch_size": 2, "shift": 3.0, "seed": 0, "models": {"init": "mini-scratch"},
        "stage": {"stage1": {"lr": 5e-4}, "stage2": {"lr": 3e-4, "schedule": "cosine", "motion_weight": 2.0,
                                                     "prompt": "phased"}}}))
    cfgs = evaluation.ablation_configs(base, tmp_path / "data", tmp_path / "out", 30, 60)
    assert set(cfgs) == {"global", "paca", "routed", "uniform", "onestage"}
    assert cfgs["routed"]["paca_mode"] == "routed" and "paca_mode" not in cfgs["paca"]
    assert {k: v for k, v in cfgs["routed"].items() if k not in ("paca_mode", "name", "output_dir")} == \
        {k: v for k, v in cfgs["paca"].items() if k not in ("name", "output_dir")}
    assert cfgs["global"]["stage2"]["prompt"] == "global" and cfgs["paca"]["stage2"]["prompt"] == "phased"
    assert cfgs["uniform"]["audio_schedule"] == "uniform" and "audio_schedule" not in cfgs["paca"]
    assert cfgs["onestage"]["stages"] == ["stage0", "stage2"] and cfgs["onestage"]["stage2"]["steps"] == 90
    assert all(c["data"]["cache"] == str(base / "cache") and c["shift"] == 3.0 for c in cfgs.values())
    assert cfgs["paca"]["stage2"]["lr"] == 3e-4 and cfgs["paca"]["stage1"]["steps"] == 30
    assert cfgs["paca"]["stage2"]["schedule"] == "cosine" and cfgs["paca"]["stage1"]["schedule"] == "constant"
    # the base run's stage settings carry over (the shipped recipe's motion weight shapes what the model learns)
    assert cfgs["paca"]["stage2"]["motion_weight"] == 2.0 and cfgs["global"]["stage2"]["motion_weight"] == 2.0
    assert "motion_weight" not in cfgs["paca"]["stage1"] and cfgs["onestage"]["stage2"]["prompt"] == "phased"


def test_table_shows_missing_figures_as_na():
    table = evaluation.format_table({"row A": {"hit_at_segment": 0.5, "tiou": math.nan}}, "title")
    lines = table.splitlines()
    assert lines[0] == "title" and lines[1].startswith("| configuration | H@S | tIoU")
    assert lines[3].startswith("| row A | 0.500 | n/a |")


@pytest.mark.slow
def test_scores_a_model_on_a_written_test_split(tmp_path):
    from actavatar_core.bundle import tiny_models

    test_set = evaluation.ensure_test_set(tmp_path / "test", clips=1, duration=1.0, size=64)
    ann = json.loads((test_set / "annotations.jsonl").read_text().splitlines()[0])
    assert ann["num_frames"] == 25 and ann["width"] == 64 and ann["phases"]
    rows = evaluation.evaluate_model(tiny_models(), test_set, modes=[("tiny routed", "routed", True)], steps=2,
                                     shift=3.0, save_dir=tmp_path / "samples", log=lambda m: None)
    row = rows["tiny routed"]
    assert row["clips"] == 1 and 0.0 <= row["hit_at_segment"] <= 1.0
    (clip,) = row["per_clip"]
    assert clip["id"] == ann["id"] and len(clip["hits"]) == len(ann["phases"])
    assert sum(clip["hits"]) / len(clip["hits"]) == row["hit_at_segment"]
    assert list((tmp_path / "samples").glob("tiny_routed_*.mp4"))


@pytest.mark.slow
def test_ground_truth_clips_score_as_the_ceiling(tmp_path):
    test_set = evaluation.ensure_test_set(tmp_path / "test", clips=2, duration=2.0, size=128)
    row = evaluation.score_ground_truth(test_set)
    assert row["clips"] == 2
    assert row["hit_at_segment"] == 1.0 and row["tiou"] > 0.7
    assert row["lipsync_corr"] > 0.5


@pytest.mark.slow
def test_vae_reconstruction_row_scores_the_clips_through_the_models_vae(tmp_path):
    from actavatar_core.bundle import tiny_models

    test_set = evaluation.ensure_test_set(tmp_path / "test", clips=1, duration=1.0, size=64)
    truth = evaluation.score_ground_truth(test_set)
    row = evaluation.score_reconstruction(tiny_models(), test_set)  # an untrained VAE destroys the frames
    assert row["clips"] == 1
    assert row["hit_at_segment"] < truth["hit_at_segment"] or row["identity_dist"] > truth["identity_dist"] + 10


def test_ablation_runs_folder_names_the_missing_variants(tmp_path):
    from actavatar_core.errors import ActAvatarError

    (tmp_path / "paca").mkdir()
    (tmp_path / "paca" / "config.json").write_text("{}")
    with pytest.raises(ActAvatarError, match=r"lacks the ablation variant run\(s\) \['global', 'onestage', 'routed', 'uniform'\]"):
        evaluation.load_ablation_runs(tmp_path)


def test_bench_refuses_training_and_loading_the_ablation_at_once(capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["bench", "--ablation", "runs/mini", "--ablation-runs", "runs/gpu"])
    assert "pass one of them" in capsys.readouterr().err


def test_ablation_scores_only_the_chosen_variants_each_with_its_own_guidance(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(models, test_set, *, modes, text_cfg, audio_cfg, **kw):
        calls.append((models, modes[0][1], text_cfg, audio_cfg))
        return {modes[0][0]: {"hit_at_segment": 0.5}}

    monkeypatch.setattr(evaluation, "evaluate_model", fake_evaluate)
    rows = evaluation.score_ablation({"global": "G", "paca": "P"}, tmp_path, clips=1, steps=2, text_cfg=3.0,
                                     audio_cfg=3.0, shift=3.0, guidance={"global": (5.0, 2.0)}, log=lambda m: None)
    assert set(rows) == {"Global prompt (no PACA)", "PACA learned (paper)",
                         "PACA routed at inference only (the learned variant)",
                         "PACA routed on the global variant (ours, untrained for phases)"}
    assert ("G", "global", 5.0, 2.0) in calls and ("G", "routed", 5.0, 2.0) in calls
    assert ("P", "learned", 3.0, 3.0) in calls and ("P", "routed", 3.0, 3.0) in calls and len(calls) == 4
    assert rows["Global prompt (no PACA)"]["text_cfg"] == 5.0 and rows["PACA learned (paper)"]["audio_cfg"] == 3.0


def test_ablation_variant_choice_is_checked(tmp_path):
    from actavatar_core.errors import ActAvatarError

    with pytest.raises(ActAvatarError, match=r"unknown ablation variant\(s\) \['gloabl'\]"):
        evaluation.load_ablation_runs(tmp_path, ["gloabl"])
    with pytest.raises(ActAvatarError, match=r"lacks the ablation variant run\(s\) \['global'\].*--ablation-variants"):
        evaluation.load_ablation_runs(tmp_path, ["global"])
    with pytest.raises(ActAvatarError, match="'paca' has no text_cfg/audio_cfg"):
        evaluation.run_guidance({"global": {"generation": {"text_cfg": 5, "audio_cfg": 2}}, "paca": {"generation": {}}})
    assert evaluation.run_guidance({"global": {"generation": {"text_cfg": 5, "audio_cfg": 2}}}) == {"global": (5.0, 2.0)}


def test_bench_ablation_choices_need_trained_runs(capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["bench", "--ablation-variants", "global,paca"])
    assert "apply to --ablation-runs" in capsys.readouterr().err


def test_bench_scores_trained_variants_with_their_own_guidance_into_the_json(tmp_path, monkeypatch, capsys):
    import actavatar_core.defaults as defaults

    class Models:
        info = {"name": "m", "defaults": {"steps": 4, "text_cfg": 7.0, "audio_cfg": 3.0, "shift": 3.0}}

    seen = {}

    def fake_runs(folder, variants):
        seen["folder"], seen["variants"] = folder, variants
        recipes = {v: {"batch_size": 4, "steps": {"vae": 10, "stage1": 15, "stage2": 70},
                       "generation": {"text_cfg": 10.0 if v == "global" else 3.0, "audio_cfg": 3.0}} for v in variants}
        return {v: v for v in variants}, recipes

    def fake_evaluate(models, test_set, *, modes, text_cfg, audio_cfg, **kw):
        return {name: {"hit_at_segment": 0.5, "cfg": (text_cfg, audio_cfg)} for name, _, _ in modes}

    monkeypatch.setattr(defaults, "load_default_models", lambda: (Models(), None))
    monkeypatch.setattr(evaluation, "ensure_test_set", lambda folder, clips, **kw: tmp_path)
    monkeypatch.setattr(evaluation, "score_ground_truth", lambda *a: {"hit_at_segment": 1.0})
    monkeypatch.setattr(evaluation, "score_reconstruction", lambda *a: {"hit_at_segment": 0.9})
    monkeypatch.setattr(evaluation, "load_ablation_runs", fake_runs)
    monkeypatch.setattr(evaluation, "evaluate_model", fake_evaluate)
    out = tmp_path / "bench.json"
    assert evaluation.main(["bench", "--modes", "", "--ablation-runs", "runs/x", "--ablation-variants", "global, paca",
                            "--ablation-guidance", "run", "--json", str(out)]) == 0
    assert seen == {"folder": Path("runs/x"), "variants": ["global", "paca"]}
    rows = json.loads(out.read_text())["ablation"]["rows"]
    assert rows["Global prompt (no PACA)"]["cfg"] == [10.0, 3.0] and rows["PACA learned (paper)"]["cfg"] == [3.0, 3.0]
    assert rows["Global prompt (no PACA)"]["text_cfg"] == 10.0
    caption = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Ablation")][0]
    assert "global stage1 15/stage2 70 steps at batch 4" in caption and "vae" not in caption
    assert "guidance each run's own" in caption


def test_bench_scores_the_flat_prompt_and_given_guidance(tmp_path, monkeypatch):
    import actavatar_core.defaults as defaults

    class Models:
        info = {"name": "m", "defaults": {"steps": 4, "text_cfg": 7.0, "audio_cfg": 3.0, "phase_cfg": 2.0}}

    seen = {}

    def fake_evaluate(models, test_set, *, modes, text_cfg, audio_cfg, phase_cfg, **kw):
        seen.update(modes=modes, cfg=(text_cfg, audio_cfg, phase_cfg))
        return {name: {"hit_at_segment": 0.5} for name, _, _ in modes}

    monkeypatch.setattr(defaults, "load_default_models", lambda: (Models(), None))
    monkeypatch.setattr(evaluation, "ensure_test_set", lambda folder, clips, **kw: tmp_path)
    monkeypatch.setattr(evaluation, "score_ground_truth", lambda *a: {"hit_at_segment": 1.0})
    monkeypatch.setattr(evaluation, "score_reconstruction", lambda *a: {"hit_at_segment": 0.9})
    monkeypatch.setattr(evaluation, "evaluate_model", fake_evaluate)
    out = tmp_path / "bench.json"
    assert evaluation.main(["bench", "--modes", "flat, relay=3", "--text-cfg", "10", "--phase-cfg", "0",
                            "--json", str(out)]) == 0
    assert seen["modes"] == [("m, global prompt (no PACA)", "global", False), ("m, PACA relay=3", "relay=3", True)]
    assert seen["cfg"] == (10.0, 3.0, 0.0)  # text given, audio the model's, phase given
    saved = json.loads(out.read_text())
    assert (saved["text_cfg"], saved["audio_cfg"], saved["phase_cfg"]) == (10.0, 3.0, 0.0)
    assert saved["vae_reconstruction"]["hit_at_segment"] == 0.9
    monkeypatch.setattr(evaluation, "score_reconstruction", lambda *a: pytest.fail("--no-ceilings ran the VAE"))
    assert evaluation.main(["bench", "--modes", "routed", "--no-ceilings", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert "vae_reconstruction" not in saved and "ground_truth" not in saved and saved["model_rows"]
    with pytest.raises(SystemExit):
        evaluation.main(["bench", "--modes", "flat,sideways"])


def test_named_test_splits_are_disjoint_and_an_existing_folder_must_hold_its_split(tmp_path, monkeypatch):
    from actavatar_core.errors import ActAvatarError

    splits = evaluation.TEST_SPLITS
    firsts = sorted(spec["seed"] for spec in splits.values())
    assert all(b - a >= 100 for a, b in zip(firsts, firsts[1:]))  # 100-clip splits never share a seed
    assert {spec["voice"] for spec in splits.values()} == {"synthetic", "espeak-ng", "mixed"}
    folder = evaluation.ensure_test_set(tmp_path / "t", clips=1, duration=1.0, size=64)  # the synthetic split
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["seeds"][0] == 900_000_000 and manifest["voice"] == "synthetic"
    assert evaluation.ensure_test_set(folder, clips=1, duration=1.0, size=64) == folder  # its own split: reused
    for split in ("espeak", "mixed"):
        with pytest.raises(ActAvatarError, match=f"not the {split} split.*Fix: Pass --test-set with a new folder"):
            evaluation.ensure_test_set(folder, clips=1, size=64, split=split)
    # the command says the same in one line, with rc 2, before any model loads
    monkeypatch.setattr(evaluation, "score_ground_truth", lambda *a: pytest.fail("scored a mismatched split"))
    assert evaluation.main(["bench", "--split", "mixed", "--test-set", str(folder), "--clips", "1"]) == 2


def test_scores_are_also_given_per_clip_length_when_a_split_mixes_lengths(tmp_path):
    from actavatar_lab.synth.writer import write_dataset

    folder = tmp_path / "mixed"
    write_dataset(folder, clips=6, seed=0, split="test", size=64, duration=(2.0, 6.0), voice="synthetic")
    row = evaluation.score_ground_truth(folder)
    groups = row["groups"]
    assert groups and all(name.startswith("length ") for name in groups)  # one voice: no voice groups
    assert sum(g["clips"] for g in groups.values()) == 6 and sum(g["phases"] for g in groups.values()) == row["phases"]
    pooled = sum(g["hit_at_segment"] * g["phases"] for g in groups.values()) / row["phases"]
    assert abs(pooled - row["hit_at_segment"]) < 1e-9
    single = tmp_path / "single"
    write_dataset(single, clips=2, seed=0, split="test", size=64, duration=2.0, voice="synthetic")
    assert evaluation.score_ground_truth(single)["groups"] == {}


def test_compare_scores_pairs_the_clips_both_runs_scored(tmp_path, capsys):
    from actavatar_lab.compare_scores import compare, main

    def run(clips):
        return {"model_rows": {"m, PACA routed": {"per_clip": [{"id": i, "hits": h, "lipsync_corr": r} for i, h, r in clips]}}}

    a = run([("c1", [True, False], 0.6), ("c2", [True], 0.7), ("c3", [False], 0.5)])
    b = run([("c1", [True, True], 0.62), ("c2", [True], 0.66)])  # c3 not scored in b
    r = compare(a, b)["m, PACA routed"]
    assert r["clips"] == 2 and r["phases"] == 3 and r["phases_that_differ"] == 1
    assert r["hit_at_segment"] == [2 / 3, 1.0]
    assert abs(r["lipsync_corr_abs_diff_max"] - 0.04) < 1e-9 and abs(r["lipsync_corr_abs_diff_mean"] - 0.03) < 1e-9
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["x", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "1 phases differ" in capsys.readouterr().out
    (tmp_path / "c.json").write_text(json.dumps({"model_rows": {}}))
    assert main(["x", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng); .ci/run installs it")
def test_audio_readout_reads_the_mouth_from_the_bundled_encoder_and_prints_each_voice(capsys):
    from actavatar_lab.audio_readout import main, readout_r

    assert main(["audio_readout", "--clips", "6", "--seed", "900005000"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["synthetic", "espeak-ng"]
    assert all(-1.0 <= float(line.split("r ")[1].split()[0]) <= 1.0 for line in out)
    import numpy as np

    fit = (np.arange(20.0)[:, None] * [1.0, 0.5], np.arange(20.0))  # an exactly linear relation reads out at r 1
    assert abs(readout_r(fit, fit) - 1.0) < 1e-6


def test_latent_stride_holds_the_mouth_per_latent_frame_and_bounds_fast_mouths(tmp_path, capsys):
    import numpy as np

    from actavatar_lab.latent_stride import (held_per_latent_frame, latent_frame_groups, main,
                                             share_above_latent_nyquist, stride_ceiling)
    from actavatar_lab.synth.writer import write_dataset

    groups = latent_frame_groups(77)
    assert len(groups) == (77 - 1) // 4 + 1 and list(groups[0]) == [0] and list(groups[1]) == [1, 2, 3, 4]
    assert np.array_equal(np.concatenate(groups), np.arange(77))  # every video frame once, in order
    t = np.arange(101) / 25.0
    slow, fast = np.sin(2 * np.pi * 1.0 * t), np.sin(2 * np.pi * 5.0 * t)  # latent Nyquist: 25 / 4 / 2 = 3.125 Hz
    held_slow, held_fast = held_per_latent_frame(slow), held_per_latent_frame(fast)
    assert np.corrcoef(held_slow, slow)[0, 1] > 0.9 > 0.5 > np.corrcoef(held_fast, fast)[0, 1]
    assert share_above_latent_nyquist(slow, 25.0) < 0.05 and share_above_latent_nyquist(fast, 25.0) > 0.95
    step = np.repeat([0.0, 1.0, 0.0, 1.0], 4)
    assert np.allclose(held_per_latent_frame(np.r_[0.5, step])[1:], step)  # already one value per latent frame

    write_dataset(tmp_path / "split", clips=3, seed=0, split="test", size=64, duration=2.0, voice="synthetic")
    s = stride_ceiling(tmp_path / "split")
    assert s["clips"] == 3 and s["drawn"] > 0.9 and s["held"] < s["drawn"] and 0.0 < s["fast_share"] < 1.0
    assert main(["latent_stride", "--splits", "nope"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err
