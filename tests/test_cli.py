import json
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actavatar_core.cli import main
from actavatar_core.video import probe_video, write_mp4

ROOT = Path(__file__).resolve().parents[1]


def _wav(path: Path, seconds: float, rate: int, channels: int, silent: bool = False) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.0 * t if silent else 0.3 * np.sin(2 * np.pi * 200 * t) * np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    pcm = np.repeat((x * 32767).astype(np.int16)[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _files(tmp_path, speech):
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "face.png")
    write_mp4(tmp_path / "speech.mp4", np.zeros((5, 32, 32, 3), np.uint8), 5, speech(1.0, 22050, 2), 22050)
    (tmp_path / "phases.json").write_text(json.dumps(
        {"version": 1, "base": "a man talks", "phases": [{"start": 0, "end": 0.5, "text": "waves"}]}))


def _base(tmp_path) -> dict[str, str]:
    return {"--image": str(tmp_path / "face.png"), "--audio": str(tmp_path / "speech.mp4"),
            "--phases": str(tmp_path / "phases.json"), "--out": str(tmp_path / "out" / "clip.mp4"),
            "--steps": "2", "--width": "64", "--height": "64", "--fps": "24"}


def _argv(options: dict[str, str | None], *flags: str) -> list[str]:
    argv = ["generate", "--smoke", *flags]
    for key, value in options.items():
        if value is not None:
            argv += [key, value]
    return argv


def test_generate_writes_an_mp4_with_the_original_speech(tmp_path, speech, capsys):
    _files(tmp_path, speech)
    code = main(_argv(_base(tmp_path)))
    assert code == 0, capsys.readouterr().err
    info = probe_video(tmp_path / "out" / "clip.mp4")
    assert info["frames"] == 25 and info["fps"] == 24.0 and info["audio_codec"] == "aac"
    # the speech as given (22.05 kHz stereo), not the model's 16 kHz mono, fitted to the clip's 25/24 s
    assert (info["sample_rate"], info["audio_channels"]) == (22050, 2)
    assert 25 / 24 <= info["audio_duration"] < 25 / 24 + 1024 / 22050 + 1e-6
    assert "SMOKE RUN" in capsys.readouterr().out


def test_bad_phase_script_exits_2_with_the_fix(tmp_path, speech, capsys):
    _files(tmp_path, speech)
    code = main(_argv({**_base(tmp_path), "--phases": "a man | 0-5s: waves"}))
    err = capsys.readouterr().err
    assert code == 2 and "ends after the clip" in err and "Fix:" in err
    assert not (tmp_path / "out").exists()


def _bad_inputs(tmp_path: Path) -> None:
    """Files the bad-value cases below point at."""
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "not_audio.wav").write_text("hello")
    _wav(tmp_path / "silent.wav", 1.0, 16000, 1, silent=True)
    _wav(tmp_path / "ten_minutes.wav", 600.0, 8000, 1)
    (tmp_path / "latin1.json").write_bytes('{"base": "caf\xe9 | 0-1s: waves"}'.encode("latin-1"))
    (tmp_path / "broken.json").write_text('{"base": "x", "phases": [')
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "exists.mp4").write_bytes(b"an older video")
    (tmp_path / "a_dir").mkdir()
    no_index = tmp_path / "no_index"
    no_index.mkdir()
    # a diffusers-layout model folder whose transformer weights are a pickle (a function reference)
    pickled = tmp_path / "pickled_model"
    for part in ("transformer", "vae", "text_encoder", "audio_encoder"):
        (pickled / part).mkdir(parents=True)
        (pickled / part / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2), "hook": os.getcwd}, pickled / "transformer" / "diffusion_pytorch_model.bin")
    (pickled / "actavatar_model.json").write_text(json.dumps({"format": "actavatar-model", "version": 1}))
    # a single-file layout with a truncated safetensors file
    from safetensors.torch import save_file

    truncated = tmp_path / "truncated_model"
    (truncated / "comfyui" / "vae").mkdir(parents=True)
    save_file({"w": torch.ones(64)}, str(truncated / "comfyui" / "vae" / "v.safetensors"))
    data = (truncated / "comfyui" / "vae" / "v.safetensors").read_bytes()
    (truncated / "comfyui" / "vae" / "v.safetensors").write_bytes(data[:-40])
    (truncated / "actavatar_model.json").write_text(json.dumps(
        {"format": "actavatar-model", "version": 1, "layout": "comfyui-files", "files": "comfyui", "name": "t"}))


#: (option, bad value, words the message must contain). Every option of 'actavatar generate' appears.
BAD = [
    ("--image", "{t}/missing.png", "does not exist"),
    ("--image", "{t}/a_dir", "is a directory"),
    ("--image", "{t}/not_an_image.png", "not an image"),
    ("--image", "/dev/null", "not a regular file"),
    ("--audio", "/dev/null", "not a regular file"),
    ("--phases", "/dev/null", "not a regular file"),
    ("--audio", "{t}/missing.wav", "does not exist"),
    ("--audio", "{t}/a_dir", "is a directory"),
    ("--audio", "{t}/not_audio.wav", "could not be decoded"),
    ("--audio", "{t}/silent.wav", "silent"),
    ("--audio", "{t}/ten_minutes.wav", "at most 4093 frames"),
    ("--phases", "{t}/typo.json", "does not exist"),
    ("--phases", "{t}/sub/phases", "does not exist"),
    ("--phases", "{t}/a_dir", "is a directory"),
    ("--phases", "{t}/latin1.json", "not UTF-8"),
    ("--phases", "{t}/broken.json", "not valid JSON"),
    ("--phases", "a man | 3-4s: waves", "ends after the clip"),
    ("--phases", "a man | 0.5-0.51s: waves", "too short"),
    ("--out", "{t}/clip.avi", "does not end in .mp4"),
    ("--out", "{t}/a_file/sub/clip.mp4", "is a file, not a folder"),
    ("--out", "{t}/exists.mp4", "already exists"),
    ("--out", "/proc/actavatar/clip.mp4", "cannot be written"),
    ("--out", "{t}/" + "a" * 300 + ".mp4", "File name too long"),
    ("--image", "{t}/" + "a" * 300 + ".png", "File name too long"),
    ("--audio", "{t}/" + "a" * 300 + ".wav", "File name too long"),
    ("--phases", "{t}/" + "a" * 300 + ".json", "File name too long"),
    ("--model-dir", "{t}/" + "a" * 300, "File name too long"),
    ("--model-dir", "{t}/missing_model", "does not exist"),
    ("--model-dir", "{t}/a_file", "not a model folder"),
    ("--model-dir", "{t}/no_index", "not an ActAvatar model folder"),
    ("--model-dir", "{t}/pickled_model", "pickled"),
    ("--model-dir", "{t}/truncated_model", "could not be read as safetensors"),
    ("--steps", "0", "outside 1..1000"),
    ("--steps", "1001", "outside 1..1000"),
    ("--steps", "two", "not a whole number"),
    ("--steps", "300", "cannot take 300 steps at shift 5"),
    ("--seed", "-1", "outside 0..18446744073709551615"),
    ("--seed", str(2**64), "outside 0..18446744073709551615"),
    ("--fps", "0", "outside 1..120"),
    ("--fps", "nan", "not a finite number"),
    ("--fps", "fast", "not a number"),
    ("--width", "0", "not a positive number"),
    ("--width", "100", "not a multiple of 32"),
    ("--width", "65536", "larger than this model can make"),
    ("--height", "-64", "not a positive number"),
    ("--height", "1.5", "not a whole number"),
    ("--frames", "0", "not a positive number"),
    ("--frames", "26", "4k+1"),
    ("--frames", "4097", "at most 4093 frames"),
    ("--paca-mode", "spotlight", "invalid choice"),
    ("--feather", "-1", "outside 0..8"),
    ("--feather", "inf", "not a finite number"),
    ("--relay-width", "0", "outside 0.05..64"),
    ("--relay-width", "nan", "not a finite number"),
    ("--text-cfg", "-1", "outside 0..30"),
    ("--audio-cfg", "31", "outside 0..30"),
    ("--phase-cfg", "-0.5", "outside 0..30"),
    ("--shift", "0", "outside 0.01..100"),
    ("--sampler", "ddim", "invalid choice"),
    ("--negative", "x" * 2001, "more than 2000"),
    ("--device", "gpu7", "not a device name"),
    ("--device", "tpu", "not a device name"),
    ("--dtype", "fp8", "invalid choice"),
    ("--context-parallel", "pipeline", "invalid choice"),
    ("--memory-mode", "half", "invalid choice"),
    ("--overwrite=yes", None, "gnored explicit argument"),
    ("--smoke=1", None, "gnored explicit argument"),
    ("--frobnicate", None, "nrecognized arguments"),
]
if not torch.cuda.is_available():
    BAD.append(("--device", "cuda:0", "none is available"))


def test_every_option_refuses_bad_values_before_loading_models(tmp_path, speech, capsys, monkeypatch):
    """Each bad value: rc 2, a 'problem. Fix: ...' message, no traceback, no model loaded, nothing left on disk."""
    import actavatar_core.bundle as bundle
    import actavatar_core.defaults as defaults

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(defaults, "load_default_models", no_loading)
    monkeypatch.setattr(bundle, "load_model_folder", no_loading)
    _files(tmp_path, speech)
    _bad_inputs(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    seen = set()
    for option, value, words in BAD:
        seen.add(option.split("=")[0])
        options = {**_base(tmp_path)}
        flags: list[str] = []
        if value is None:
            flags.append(option)
        else:
            options[option] = value.format(t=tmp_path)
        case = f"{option} {str(value)[:40]!r}"
        started = time.monotonic()
        try:
            code = main(_argv(options, *flags))
        except AssertionError as exc:
            raise AssertionError(f"{case}: {exc}") from None
        err = capsys.readouterr().err
        assert code == 2, f"{case}: rc {code}\n{err}"
        assert words in err and "Fix:" in err, f"{case}: {err}"
        assert "Traceback" not in err and err.startswith("actavatar generate: "), f"{case}: {err}"
        assert time.monotonic() - started < 10, f"{case} took too long: checks must come before any heavy work"
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, f"{case} left files behind"
    every = {a for action in __import__("actavatar_core.pipeline_cli", fromlist=["_parser"])._parser("generate")._actions
             for a in action.option_strings if a.startswith("--") and a != "--help"}
    assert every <= seen, f"options without a bad-value case: {sorted(every - seen)}"


def test_a_failing_run_leaves_no_folder(tmp_path, speech, capsys, monkeypatch):
    """A failure after the checks (here in sampling) removes the output folders the run made."""
    import actavatar_core.pipeline as pipeline

    _files(tmp_path, speech)

    def broken(*args, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(pipeline, "decode_stream", broken)
    with pytest.raises(RuntimeError, match="sampling failed"):
        main(_argv({**_base(tmp_path), "--out": str(tmp_path / "new" / "deeper" / "clip.mp4"), "--steps": "1"}))
    assert not (tmp_path / "new").exists()


def test_sigterm_stops_like_ctrl_c(tmp_path, speech):
    """SIGTERM during a run: exit code 143, a message, no video, no partial file, no folder the run made."""
    _files(tmp_path, speech)
    out = tmp_path / "made" / "clip.mp4"
    argv = _argv({**_base(tmp_path), "--out": str(out), "--steps": "1000", "--sampler": "euler"})
    proc = subprocess.Popen([sys.executable, "-m", "actavatar_core.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not (seen and seen[-1].startswith("model:")):  # "model: ..." is printed once the models are loaded
            seen.append(proc.stdout.readline())
            assert seen[-1], "".join(seen) + proc.stderr.read()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM; no file was written." in err and "Traceback" not in err
    assert not (tmp_path / "made").exists()


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("generate", "demo", "synth", "train", "bench"):
        assert name in out
    assert main(["frobnicate"]) == 2
    assert main(["generate", "--help"]) == 0
