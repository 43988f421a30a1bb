"""Synthetic dataset: determinism, identity, annotation validity, audio/mouth coupling, writer and command line."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from actavatar_core.phases import PhaseScript, latent_frame_count
from actavatar_lab.synth import ACTIONS, IDLE, action_for_text, make_clip, sample_identity, sample_phases
from actavatar_lab.synth.actions import RAMP_SECONDS
from actavatar_lab.synth.audio import (SAMPLE_RATE, audio_envelope, espeak_available, mouth_from_envelope, resample,
                                        speech_audio)
from actavatar_lab.synth.cli import main as synth_main
from actavatar_lab.synth.writer import SPLITS, split_seeds, write_dataset


@pytest.fixture(scope="module")
def clips():
    return [make_clip(s, voice="synthetic") for s in range(7000, 7012)]


def test_same_seed_same_clip_and_other_seed_differs():
    a, b, c = make_clip(123, voice="synthetic"), make_clip(123, voice="synthetic"), make_clip(124, voice="synthetic")
    assert np.array_equal(a.frames, b.frames)
    assert np.array_equal(a.audio, b.audio)
    assert a.annotation == b.annotation and a.groundtruth == b.groundtruth
    assert not np.array_equal(a.frames[0], c.frames[0])
    assert a.annotation["base"] != c.annotation["base"] or a.annotation["phases"] != c.annotation["phases"]


def test_identity_is_seeded_varied_and_visible_in_first_frame(clips):
    bases = {sample_identity(s).describe() for s in range(200)}
    assert len(bases) > 150  # characters really differ
    styles = {sample_identity(s).hair_style for s in range(200)}
    assert styles == {"short", "long", "bald", "hat", "bun"}
    for clip in clips:
        ident = clip.groundtruth["identity"]
        frame0 = clip.frames[0].astype(int)
        assert np.abs(frame0[2, 2] - ident["background"]).max() <= 1
        assert np.abs(frame0[115, 64] - ident["shirt"]).max() <= 1
        assert ident["shirt_name"] in clip.annotation["base"] and ident["background_name"] in clip.annotation["base"]
        assert clip.groundtruth["labels"][0] == IDLE  # frame 0 (the reference image) is the rest pose


def test_annotations_parse_and_validate(clips):
    for clip in clips:
        ann = clip.annotation
        assert (ann["num_frames"] - 1) % 4 == 0 and latent_frame_count(ann["num_frames"]) >= 2
        assert math.isclose(ann["duration"], ann["num_frames"] / ann["fps"])
        assert ann["caption"] == "a person is talking" and ann["base"].startswith("A person with")
        script = PhaseScript.from_json({"version": 1, "base": ann["base"], "phases": ann["phases"]})
        script.validate(ann["duration"], ann["fps"])
        assert json.loads(json.dumps(ann)) == ann
    for seed in range(400):  # the sampler alone, many layouts and durations
        duration = 3.0 + (seed % 5) * 0.5
        phases = sample_phases(seed, duration)
        assert 1 <= len(phases) <= 3
        assert len({p.key for p in phases}) == len(phases)
        for p in phases:
            assert p.end - p.start >= 0.8 - 1e-9 and 0 <= p.start and p.end <= duration + 1e-9
        for p, q in zip(phases, phases[1:]):
            assert q.start >= p.end - 1e-9
        PhaseScript.from_json({"base": "x", "phases": [{"start": p.start, "end": p.end, "text": ACTIONS[p.key].text} for p in phases]}).validate(duration)
    counts = {k: sum(len(sample_phases(s, 4.04)) == k for s in range(300)) for k in (1, 2, 3)}
    assert all(v > 30 for v in counts.values())


def test_ground_truth_labels_follow_the_windows(clips):
    for clip in clips:
        gt, fps = clip.groundtruth, clip.fps
        t = np.arange(clip.annotation["num_frames"]) / fps
        for i, label in enumerate(gt["labels"]):
            inside = [p for p in gt["phases"] if p["start"] <= t[i] < p["end"]]
            # blends are centred on the edges, except that a window starting at 0 blends in over its first RAMP
            near_edge = any(min(abs(t[i] - p["start"]), abs(t[i] - p["end"])) < RAMP_SECONDS / 2 + 1e-6
                            or (p["start"] == 0 and t[i] < RAMP_SECONDS) for p in gt["phases"])
            if near_edge:
                continue
            assert label == (inside[0]["action"] if inside else IDLE), (clip.id, i)
            assert not gt["transition"][i]


def test_audio_is_speech_like_and_drives_the_mouth(clips):
    for clip in clips:
        audio, gt = clip.audio, clip.groundtruth
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert len(audio) == round(clip.annotation["duration"] * SAMPLE_RATE)
        assert 0.3 < np.abs(audio).max() <= 1.0
        env = audio_envelope(audio, SAMPLE_RATE, clip.fps, clip.annotation["num_frames"])
        mouth = np.asarray(gt["mouth"])
        assert np.allclose(env, gt["envelope"], atol=1e-4)
        assert np.corrcoef(env, mouth)[0, 1] > 0.9
        # pauses close the mouth and speech opens it
        assert mouth.min() == 0.0 and mouth.max() > 0.6
        quiet = np.convolve((env < 0.05).astype(int), [1, 1, 1], "same") == 3  # silent with both neighbours
        assert quiet.sum() >= 3 and np.all(mouth[quiet] == 0.0)
        # syllables: the envelope rises and falls many times per second
        peaks = np.sum((env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & (env[1:-1] > 0.3))
        assert peaks >= 4
    # the spectrum has voice-like energy (a harmonic source below 1 kHz and formant energy above)
    spec = np.abs(np.fft.rfft(clips[0].audio)) ** 2
    freqs = np.fft.rfftfreq(len(clips[0].audio), 1 / SAMPLE_RATE)
    low, mid, high = (spec[(freqs >= a) & (freqs < b)].sum() for a, b in ((80, 1000), (1000, 4000), (6000, 8000)))
    assert low > high and mid > 0.01 * low


def test_voice_selection_and_resampler(monkeypatch, tmp_path):
    import actavatar_lab.synth.audio as audio_mod
    from actavatar_core.errors import ActAvatarError

    with monkeypatch.context() as m:  # a machine without espeak-ng: a clear refusal, and auto falls back
        m.setattr(audio_mod.shutil, "which", lambda name: None)
        for voice in ("espeak-ng", "mixed"):
            with pytest.raises(ActAvatarError, match=f"--voice {voice} needs espeak-ng.*Fix: Install it.*apt-get install espeak-ng"):
                speech_audio(1, 2.0, voice=voice)
        assert speech_audio(1, 2.0, voice="auto")[1] == "synthetic"
        with pytest.raises(ActAvatarError, match="needs espeak-ng"):
            write_dataset(tmp_path / "x", clips=1, voice="mixed")
        assert not (tmp_path / "x").exists()  # refused before any folder or clip was written
    with pytest.raises(ValueError):
        speech_audio(1, 1.0, voice="robot")
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, 22050, 16000)
    assert len(out) == 16000
    peak = np.fft.rfftfreq(len(out), 1 / 16000)[np.argmax(np.abs(np.fft.rfft(out)))]
    assert abs(peak - 440) <= 1.0 and abs(np.abs(out).max() - 1.0) < 0.05


def test_mouth_from_envelope_is_gated_and_bounded():
    env = np.array([0.0, 0.05, 0.5, 1.4, 0.2, 0.0, 0.0])
    m = mouth_from_envelope(env)
    assert m.shape == env.shape and m.min() >= 0 and m.max() <= 1
    assert m[-1] == 0.0 and m[3] > m[1]


def test_action_texts_map_back():
    for key, action in ACTIONS.items():
        assert action_for_text(action.text) == key
    assert action_for_text("Raise your LEFT hand") == "raise_left"
    assert action_for_text("waving with the right hand") == "wave_right"
    assert action_for_text("dances") is None
    assert len(ACTIONS) >= 6


def test_rendering_is_fast_and_sized():
    start = time.perf_counter()
    clip = make_clip(5, voice="synthetic")
    elapsed = time.perf_counter() - start
    assert clip.frames.shape == (101, 128, 128, 3) and clip.frames.dtype == np.uint8
    assert elapsed < 1.0, f"a 4-s clip took {elapsed:.2f} s"
    big = make_clip(5, size=256, fps=24, duration=(3.0, 5.0), voice="synthetic")
    assert big.frames.shape[1:] == (256, 256, 3) and (big.frames.shape[0] - 1) % 4 == 0
    assert 3.0 <= big.annotation["duration"] <= 5.0 + 4 / 24
    with pytest.raises(ValueError):
        make_clip(5, size=100)


def test_split_seed_ranges_are_disjoint_and_test_is_fixed():
    ranges = sorted(SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert split_seeds("test", 100)[0] == 900_000_000 and split_seeds("test", 100)[-1] == 900_000_099
    assert set(split_seeds("train", 1000, seed=5)).isdisjoint(split_seeds("test", 100))
    with pytest.raises(ValueError):
        split_seeds("train", 10, seed=800_000_000 - 5)
    with pytest.raises(ValueError):
        split_seeds("holdout", 1)


def test_synth_command_writes_a_readable_dataset(tmp_path):
    from actavatar_core.video import read_video

    out = tmp_path / "ds"
    rc = synth_main(["synth", "--out", str(out), "--clips", "3", "--split", "test", "--workers", "1",
                     "--voice", "synthetic", "--duration", "2:3"])
    assert rc == 0
    lines = (out / "annotations.jsonl").read_text().strip().splitlines()
    assert len(lines) == 3
    assert (out / "README.md").read_text().count("raises the left hand") >= 1
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["seeds"] == [900_000_000, 900_000_002] and manifest["voices"] == {"synthetic": 3}
    for line in lines:
        ann = json.loads(line)
        assert set(ann) == {"id", "video", "fps", "num_frames", "width", "height", "duration", "caption", "base", "phases", "seed"}
        PhaseScript.from_json({"base": ann["base"], "phases": ann["phases"]}).validate(ann["duration"], ann["fps"])
        frames, fps, audio, rate = read_video(out / ann["video"])
        assert frames.shape == (ann["num_frames"], 128, 128, 3) and fps == 25.0
        assert audio is not None and rate == 16000 and audio.shape[1] >= 0.95 * ann["duration"] * rate
        gt = json.loads((out / "groundtruth" / f"{ann['id']}.json").read_text())
        assert len(gt["labels"]) == len(gt["mouth"]) == ann["num_frames"]
        # the file holds the same pictures as a fresh render of the seed (H.264 at crf 18 is nearly lossless here)
        fresh = make_clip(ann["seed"], duration=(2.0, 3.0), split="test", voice="synthetic")
        assert fresh.annotation == ann
        assert np.abs(frames.astype(int) - fresh.frames).mean() < 3.0
    # the files themselves score perfectly when evaluated as if a model had generated them
    from actavatar_lab.synth.metrics import evaluate_folder

    scored = evaluate_folder(out, out / "clips")
    assert scored["missing"] == [] and scored["aggregate"]["hit_at_segment"] == 1.0
    assert scored["aggregate"]["lipsync_corr"] > 0.9
    assert synth_main(["synth", "--out", str(out), "--clips", "1", "--split", "test", "--voice", "synthetic"]) == 2
    assert synth_main(["synth", "--out", str(out), "--clips", "1", "--size", "100"]) == 2


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng); .ci/run installs it")
def test_mixed_voices_vary_speakers_deterministically():
    from actavatar_lab.synth.audio import MIXED_SYNTHETIC_SHARE, speech

    runs = [speech(seed, 2.0, voice="mixed") for seed in range(40)]
    voices = [v for _a, v, _s in runs]
    speakers = {s for _a, v, s in runs if v == "espeak-ng"}
    share = voices.count("synthetic") / len(voices)
    assert abs(share - MIXED_SYNTHETIC_SHARE) < 0.2 and len(speakers) >= 20  # both sources, many distinct speakers
    accents = {s.split()[0].split("+")[0] for s in speakers}
    assert len(accents) >= 4
    for seed in (3, 11):  # a clip's seed alone decides its speech
        a, v, s = speech(seed, 2.0, voice="mixed")
        b, w, t = speech(seed, 2.0, voice="mixed")
        assert (v, s) == (w, t) and np.array_equal(a, b) and len(a) == 32000
    audio, voice, speaker = speech(5, 2.5, voice="espeak-ng")
    assert voice == "espeak-ng" and len(audio) == 40000 and np.abs(audio).max() > 0.3 and "+" in speaker or " s" in speaker
