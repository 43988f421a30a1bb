import math

import numpy as np
import pytest
import torch

from actavatar_core.audio import (
    AudioEmbedding, encode_audio, fit_waveform, load_waveform, resample, to_video_rate, window_per_latent_frame,
)
from actavatar_core.errors import AudioInputError
from actavatar_core.tiny import tiny_audio_encoder
from actavatar_core.video import write_mp4


def test_resample_keeps_a_tone():
    t = torch.arange(44100) / 44100
    out = resample(torch.sin(2 * math.pi * 300 * t), 44100, 16000)
    ref = torch.sin(2 * math.pi * 300 * torch.arange(16000) / 16000)
    assert out.shape == (16000,) and (out[200:-200] - ref[200:-200]).abs().max() < 2e-3


def test_stereo_44k_dict_becomes_mono_16k(speech):
    wave = load_waveform({"waveform": torch.from_numpy(speech(1.0, 44100, 2))[None], "sample_rate": 44100})
    assert wave.sample_rate == 16000 and wave.samples.ndim == 1 and abs(wave.duration - 1.0) < 1e-3


def test_decodes_audio_from_an_mp4_file(tmp_path, speech):
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    path = write_mp4(tmp_path / "a.mp4", frames, 5, speech(1.0, 22050), 22050)
    wave = load_waveform(path)
    assert wave.sample_rate == 16000 and 0.95 < wave.duration < 1.1


@pytest.mark.parametrize("source, rate, needle", [
    (np.zeros((1, 16000), np.float32), 16000, "silent"),
    (np.zeros((1, 0), np.float32), 16000, "zero length"),
    (np.full((1, 100), np.nan, np.float32), 16000, "NaN"),
    (np.ones((1, 1000), np.float32), 100, "sample rate of 100 Hz"),
    (np.ones((1, 1000), np.float32), 16000.5, "not a whole number"),
])
def test_bad_waveforms_are_refused(source, rate, needle):
    with pytest.raises(AudioInputError, match=needle) as info:
        load_waveform({"waveform": torch.from_numpy(source)[None], "sample_rate": rate})
    assert "Fix:" in str(info.value)


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    with pytest.raises(AudioInputError, match="empty"):
        load_waveform(tmp_path / "empty.wav")
    with pytest.raises(AudioInputError, match="could not be decoded"):
        load_waveform(tmp_path / "junk.wav")
    with pytest.raises(AudioInputError, match="does not exist"):
        load_waveform(tmp_path / "missing.wav")


def test_clip_follows_the_audio_or_the_caller(speech):
    model = tiny_audio_encoder()
    source = {"waveform": torch.from_numpy(speech(2.0))[None], "sample_rate": 16000}
    emb = encode_audio(model, source, fps=25)
    assert emb.num_frames == 53 and emb.features.shape[:3] == (1, 14, 8)  # 2 s -> 50 frames -> 4k+1 = 53
    assert emb.waveform.samples.numel() == round(53 / 25 * 16000)  # padded with silence to the clip
    short = encode_audio(model, source, fps=25, num_frames=25)
    assert short.features.shape[1] == 7 and short.waveform.samples.numel() == 16000  # trimmed to 1 s
    with pytest.raises(Exception, match="4k\\+1"):
        encode_audio(model, source, fps=25, num_frames=24)


def test_video_rate_alignment_and_windows():
    feats = torch.arange(100, dtype=torch.float32)[:, None, None].expand(100, 2, 3)  # 2 s of 50 Hz
    video = to_video_rate(feats, 49, 24.0)
    assert video.shape == (49, 2, 3)
    # frame at 1 s sits near wav2vec2 frame 49.5 (receptive-field centre at 1 s)
    assert abs(float(video[24, 0, 0]) - (1.0 * 16000 - 40) / 320) < 1e-4
    windows = window_per_latent_frame(video, 8)
    assert windows.shape == (13, 8, 2, 3)
    assert torch.equal(windows[0, :3], video[[0, 0, 0]])  # clamped at the start
    # latent frame 1 covers pixel frames 1-4; its window adds two frames of context each side: -1..6
    assert torch.equal(windows[1], video[[0, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(windows[12], video[[43, 44, 45, 46, 47, 48, 48, 48]])


def test_video_rate_alignment_stays_on_the_encoders_device():
    """Found on a lent H200: the interpolation weights were built on the CPU and broke preprocessing on a GPU.
    The meta device stands in for the GPU (mixing it with CPU tensors fails the same way)."""
    feats = torch.randn(100, 2, 3, device="meta")
    video = to_video_rate(feats, 49, 24.0)
    assert video.device.type == "meta" and video.shape == (49, 2, 3)
    assert window_per_latent_frame(video, 8).device.type == "meta"


def test_embedding_reacts_to_the_sound(speech):
    model = tiny_audio_encoder()
    a = encode_audio(model, {"waveform": torch.from_numpy(speech(1.0, seed=0))[None], "sample_rate": 16000}, fps=25)
    b = encode_audio(model, {"waveform": torch.from_numpy(speech(1.0, seed=5))[None], "sample_rate": 16000}, fps=25)
    assert isinstance(a, AudioEmbedding) and (a.features - b.features).abs().max() > 1e-3
