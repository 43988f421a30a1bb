import json

import numpy as np
from PIL import Image

from actavatar_core.cli import main
from actavatar_core.video import probe_video, write_mp4


def _files(tmp_path, speech):
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "face.png")
    write_mp4(tmp_path / "speech.mp4", np.zeros((5, 32, 32, 3), np.uint8), 5, speech(1.0, 16000), 16000)
    (tmp_path / "phases.json").write_text(json.dumps(
        {"version": 1, "base": "a man talks", "phases": [{"start": 0, "end": 0.5, "text": "waves"}]}))


def test_generate_writes_an_mp4(tmp_path, speech, capsys):
    _files(tmp_path, speech)
    code = main(["generate", "--smoke", "--image", str(tmp_path / "face.png"), "--audio", str(tmp_path / "speech.mp4"),
                 "--phases", str(tmp_path / "phases.json"), "--out", str(tmp_path / "out.mp4"), "--steps", "2",
                 "--width", "64", "--height", "64", "--fps", "24"])
    assert code == 0, capsys.readouterr().err
    info = probe_video(tmp_path / "out.mp4")
    assert info["frames"] == 25 and info["fps"] == 24.0 and "audio_codec" in info
    assert "SMOKE RUN" in capsys.readouterr().out


def test_bad_phase_script_exits_2_with_the_fix(tmp_path, speech, capsys):
    _files(tmp_path, speech)
    code = main(["generate", "--smoke", "--image", str(tmp_path / "face.png"), "--audio", str(tmp_path / "speech.mp4"),
                 "--phases", "a man | 0-5s: waves", "--out", str(tmp_path / "out.mp4"), "--steps", "1",
                 "--width", "64", "--height", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "ends after the clip" in err and "Fix:" in err
    assert not (tmp_path / "out.mp4").exists()


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("generate", "demo", "synth", "train", "bench"):
        assert name in out
    assert main(["frobnicate"]) == 2
