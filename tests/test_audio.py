import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actavatar_core import audio as audio_module
from actavatar_core.audio import (
    AudioEmbedding, encode_audio, fit_waveform, load_waveform, resample, to_video_rate, window_per_latent_frame,
)
from actavatar_core.errors import ActAvatarError, AudioInputError
from actavatar_core.tiny import tiny_audio_encoder
from actavatar_core.video import write_mp4


def test_resample_keeps_a_tone():
    t = torch.arange(44100) / 44100
    out = resample(torch.sin(2 * math.pi * 300 * t), 44100, 16000)
    ref = torch.sin(2 * math.pi * 300 * torch.arange(16000) / 16000)
    assert out.shape == (16000,) and (out[200:-200] - ref[200:-200]).abs().max() < 2e-3


def _windowed_sinc(samples: torch.Tensor, rate_in: int, rate_out: int, lowpass: float = 0.99, width: int = 6) -> torch.Tensor:
    """The hand-written resampler that torchaudio's replaced, kept as the reference the change is measured against."""
    g = math.gcd(rate_in, rate_out)
    orig, new = rate_in // g, rate_out // g
    cutoff = min(orig, new) * lowpass
    pad = math.ceil(width * orig / cutoff)
    idx = torch.arange(-pad, pad + orig, dtype=torch.float64)[None] / orig
    t = ((-torch.arange(new, dtype=torch.float64)[:, None] / new + idx) * cutoff).clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernel = (kernel * window * cutoff / orig).float()[:, None]
    out = F.conv1d(F.pad(samples.float()[None, None], (pad, pad + orig)), kernel, stride=orig)
    return out[0].transpose(0, 1).reshape(-1)[: math.ceil(new * samples.numel() / orig)].contiguous()


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 8000])
def test_torchaudio_resampler_matches_the_one_it_replaced(speech, rate):
    x = torch.from_numpy(speech(1.3, rate)[0])
    got, want = resample(x, rate, 16000), _windowed_sinc(x, rate, 16000)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5  # the same filter (Hann-windowed sinc, width 6, rolloff 0.99)


def test_resampling_without_torchaudio_fails_clearly_and_16k_audio_does_not_need_it(monkeypatch, speech):
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # makes `import torchaudio...` raise ImportError
    monkeypatch.setitem(sys.modules, "torchaudio.functional", None)
    wave = load_waveform({"waveform": torch.from_numpy(speech(0.5))[None], "sample_rate": 16000})
    assert wave.sample_rate == 16000 and torch.equal(wave.samples, torch.from_numpy(speech(0.5)[0]))
    with pytest.raises(ActAvatarError, match="needs torchaudio") as info:
        load_waveform({"waveform": torch.from_numpy(speech(0.5, 44100))[None], "sample_rate": 44100})
    assert "Fix: Install the torchaudio" in str(info.value)


def test_the_engine_imports_without_torchaudio():
    code = ("import sys; sys.modules['torchaudio'] = None\n"
            "import actavatar_core.audio, actavatar_core.bundle, actavatar_core.pipeline\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_bundled_demo_from_44k_speech_is_the_same_clip_with_either_resampler(monkeypatch):
    """The bundled demo generated with the shipped defaults from its speech at 44.1 kHz (the bundled file is 16 kHz,
    which is never resampled, so the demo itself is bit-for-bit unchanged): once through the hand-written resampler,
    once through torchaudio's. Measured (2-core CPU, fp32, 20 steps): 6.1e-5 of the frame values differ, each by 1
    level of 255 (mean absolute difference 6.1e-5 levels); the features differ by at most 2.8e-5. Tolerance: at most 2
    levels in any value, mean under 1e-3."""
    from actavatar_core.defaults import demo_inputs, load_default_models
    from actavatar_core.pipeline import ActAvatarPipeline, GenerationRequest
    from actavatar_core.sampling import SamplingOptions

    models, d = load_default_models()
    image, speech_file, phases = demo_inputs()
    at_44k = resample(load_waveform(speech_file).samples, 16000, 44100)

    def demo() -> np.ndarray:
        request = GenerationRequest(
            image=image, audio={"waveform": at_44k[None, None], "sample_rate": 44100}, phases=json.loads(phases),
            width=d["width"], height=d["height"], fps=d["fps"], negative=d.get("negative", ""),
            options=SamplingOptions(steps=d["steps"], text_cfg=d["text_cfg"], audio_cfg=d["audio_cfg"], shift=d["shift"],
                                    seed=0, paca_mode=d["paca_mode"], phase_cfg=d["phase_cfg"]))
        return ActAvatarPipeline(models).generate(request).frames.astype(np.int16)

    after = demo()
    monkeypatch.setattr(audio_module, "resample", _windowed_sinc)
    before = demo()
    diff = np.abs(after - before)
    assert after.shape == before.shape == (77, d["height"], d["width"], 3)
    assert diff.max() <= 2 and diff.mean() < 1e-3, (diff.max(), diff.mean())


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
