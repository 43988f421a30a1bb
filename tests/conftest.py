"""Shared fixtures (tiny models of the real classes, built in-process: no download, no GPU), the `slow` marks of
the README test command's split, and the CI rule that no test skips there."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------ slow tests
#: The tests that took longest on the busy shared 2-core machine (`pytest --durations=80`: 20 s or more in a whole
#: run, 14 s or more in a run of the rest): marked `slow` here, so the README's test command (addopts:
#: -m "not slow and not integration and not browser") stays well under 5 minutes;
#: CI runs them (`pytest -m "slow or integration or browser"`). Keyed by file and function (all parameters).
#: Tests can also carry @pytest.mark.slow themselves. CI fails when an entry names no test (a rename).
SLOW_TESTS = {
    "tests/test_training.py": [
        "test_stages_train_what_the_paper_says",
        "test_checkpoint_resumes_to_the_same_state",
        "test_loss_goes_down",
        "test_bf16_stages_compute_in_bf16_and_keep_fp32_weights",
        "test_vae_decoder_stage_keeps_the_encoder_and_the_cache",
        "test_a_stage_pins_its_own_precision",
        "test_vae_stage_trains_the_whole_vae_and_records_latent_statistics",
        "test_vae_is_batched_over_clips_of_the_same_shape_and_matches_one_clip_at_a_time",
        "test_a_stage_cache_copies_the_clips_the_run_cache_already_holds",
        "test_interrupted_cache_build_resumes_at_the_first_missing_shard",
        "test_a_stage_can_train_on_its_own_clips",
        "test_mini_audio_encoder_keeps_the_loudness_a_mouth_follows",
        "test_stage2_lora_trains_adapters_and_reloads",
    ],
    "tests/test_pipeline.py": [
        "test_model_folder_round_trip",
        "test_in_memory_frames_match_the_file",
    ],
    "tests/test_nodes.py": [
        "test_audio_schedule_override_is_restored",
        "test_node_chain_equals_the_pipeline_bit_for_bit",
        "test_latent_preview_is_passed_to_the_progress_bar",
        "test_loaders_read_community_files_and_the_chain_runs",
        "test_fixed_frames_and_bad_frames",
        "test_fps_comes_from_the_phase_prompt",
        "test_latent_holds_raw_vae_latents",
    ],
    "tests/test_mini_model.py": [
        "test_generates_in_bf16_the_precision_gpus_get_by_default",
    ],
    "tests/test_cli.py": [
        "test_generate_writes_an_mp4_with_the_original_speech",
        "test_sigterm_stops_like_ctrl_c",
    ],
    "tests/test_export.py": [
        "test_generation_is_identical",
    ],
    "tests/test_sampling.py": [
        "test_seed_repeats_bit_for_bit_and_first_frame_is_the_reference",
    ],
}


def _test_key(item: pytest.Item) -> tuple[str, str]:
    path, _, name = item.nodeid.partition("::")
    return path.replace("\\", "/"), name.split("[")[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the SLOW_TESTS (before -m selects); when the whole suite was collected, check every entry matched."""
    wanted = {(path, name) for path, names in SLOW_TESTS.items() for name in names}
    seen = set()
    files = set()
    for item in items:
        key = _test_key(item)
        files.add(key[0])
        if key in wanted:
            item.add_marker(pytest.mark.slow)
            seen.add(key)
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    stale = sorted(f"{path}::{name}" for path, name in wanted - seen if path in files or path not in _existing())
    if whole_suite and stale:
        message = ("SLOW_TESTS in tests/conftest.py names tests that do not exist (renamed? update the list): "
                   + ", ".join(stale))
        if _in_ci():
            raise pytest.UsageError(message)
        warnings.warn(pytest.PytestWarning(message), stacklevel=1)


def _existing() -> set[str]:
    root = Path(__file__).resolve().parents[1]
    return {path for path in SLOW_TESTS if (root / path).is_file()}


# ------------------------------------------------------------------------------------------------ CI
# Tests skip with the reason where something they need is missing (COMFYUI_DIR, Chromium, node, torchrun), which is
# fine on a developer's machine. CI (.ci/run, CI=true) provides all of it, so there a skip means the setup lost
# something, and it fails the run: every integration and browser test, and every other test, runs in CI.


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_skip(report, what: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} skipped in CI (CI=true), where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """In CI a skipped test fails (an expected failure, xfail, stays as it is)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _in_ci():
        _fail_skip(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """In CI a test module that skips as a whole fails too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_ci():
        _fail_skip(report, "module")
