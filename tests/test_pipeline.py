import json

import numpy as np
import pytest
import torch

from actavatar_core.errors import (
    AudioInputError, GenerationCancelled, ImageInputError, OutputPathError, PhaseScriptError, SizeError,
)
from actavatar_core.bundle import load_model_folder, save_model_folder
from actavatar_core.pipeline import ActAvatarPipeline, GenerationRequest
from actavatar_core.sampling import SamplingOptions
from actavatar_core.video import probe_video, read_video

SCRIPT = "A man talks | 0-0.6s: raises the left hand | 0.6-1.2s: waves the right hand"


def _request(portrait, speech, **kw):
    audio = {"waveform": torch.from_numpy(speech(1.2, 22050))[None], "sample_rate": 22050}
    base = dict(image=portrait, audio=audio, phases=SCRIPT, width=64, height=64, fps=25,
                options=SamplingOptions(steps=2, seed=1))
    base.update(kw)
    return GenerationRequest(**base)


def test_end_to_end_mp4(tmp_path, tiny_models, portrait, speech):
    result = ActAvatarPipeline(tiny_models).generate_to_file(_request(portrait, speech), tmp_path / "clip.mp4")
    info = probe_video(result.path)
    # 1.2 s of speech at 25 fps -> 30 frames -> the next 4k+1 is 33 frames
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (33, 64, 64, 25.0)
    assert info["audio_codec"] == "aac" and abs(info["audio_duration"] - 33 / 25) < 0.07
    meta = json.loads(info["metadata"]["actavatar"])
    assert [p["text"] for p in meta["phases"]["phases"]] == ["raises the left hand", "waves the right hand"]
    assert result.latents.shape == (1, 48, 9, 4, 4)


def test_in_memory_frames_match_the_file(tmp_path, tiny_models, portrait, speech):
    pipe = ActAvatarPipeline(tiny_models)
    frames = pipe.generate(_request(portrait, speech)).frames
    again = pipe.generate(_request(portrait, speech)).frames
    assert frames.shape == (33, 64, 64, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, again)  # same seed, same device: bit for bit


@pytest.mark.parametrize("change, error, needle", [
    (dict(phases="A man | 0-3s: waves"), PhaseScriptError, "ends after the clip"),
    (dict(phases='{"base": "x", "phases": [{"start": 0, "end": 1}]}'), PhaseScriptError, "lacks text"),
    (dict(width=70), SizeError, "nearest|Use width 64 or 96"),
    (dict(image=np.zeros((4, 4))), ImageInputError, "shape"),
    (dict(audio={"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}), AudioInputError, "silent"),
    (dict(audio={"waveform": torch.ones(1, 1, 16000), "sample_rate": 1000}), AudioInputError, "sample rate"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, tiny_models, portrait, speech, change, error, needle):
    with pytest.raises(error) as info:
        ActAvatarPipeline(tiny_models).generate_to_file(_request(portrait, speech, **change), tmp_path / "x.mp4")
    assert any(n in str(info.value) for n in needle.split("|"))
    assert list(tmp_path.iterdir()) == []


def test_cancel_mid_run_leaves_no_file(tmp_path, tiny_models, portrait, speech):
    steps = []
    with pytest.raises(GenerationCancelled):
        ActAvatarPipeline(tiny_models).generate_to_file(
            _request(portrait, speech, options=SamplingOptions(steps=4)), tmp_path / "x.mp4",
            on_step=lambda info: steps.append(info.step), cancel=lambda: len(steps) >= 2)
    assert steps == [1, 2] and list(tmp_path.iterdir()) == []


def test_existing_output_is_protected(tmp_path, tiny_models, portrait, speech):
    (tmp_path / "x.mp4").write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="already exists"):
        ActAvatarPipeline(tiny_models).generate_to_file(_request(portrait, speech), tmp_path / "x.mp4")
    assert (tmp_path / "x.mp4").read_bytes() == b"keep me"


def test_model_folder_round_trip(tmp_path, tiny_models, portrait, speech):
    save_model_folder(tiny_models, tmp_path / "model")
    loaded = load_model_folder(tmp_path / "model")
    a = ActAvatarPipeline(tiny_models).generate(_request(portrait, speech)).frames
    b = ActAvatarPipeline(loaded).generate(_request(portrait, speech)).frames
    assert np.array_equal(a, b)
