"""The clip-length limit comes from the model's rotary table, and is checked before anything runs."""

from __future__ import annotations

import inspect

import pytest
import torch

from actavatar_core import limits as L
from actavatar_core.errors import ActAvatarError, ClipTooLongError, SizeError


def test_the_wan_rope_length_is_diffusers_default():
    from diffusers import WanTransformer3DModel

    default = inspect.signature(WanTransformer3DModel.__init__).parameters["rope_max_seq_len"].default
    assert L.WAN_ROPE_POSITIONS == default == 1024
    assert L.MAX_FRAMES == 4093 and L.MAX_SIZE_PX == 32768 and L.DEFAULT_LIMITS.size_step == 32


def test_the_limit_is_the_rotary_tables_real_limit():
    """diffusers' WanRotaryPosEmbed takes exactly max_latent_frames latent frames and fails on one more."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    limits = L.ClipLimits(rope_positions=16)  # a short table keeps the check cheap; the rule is the same
    rope = WanRotaryPosEmbed(32, (1, 2, 2), limits.rope_positions)
    rope(torch.zeros(1, 1, limits.max_latent_frames, 2, 2))  # fits
    with pytest.raises(RuntimeError):
        rope(torch.zeros(1, 1, limits.max_latent_frames + 1, 2, 2))
    assert limits.max_frames == 4 * (16 - 1) + 1
    L.check_clip(fps=25, num_frames=limits.max_frames, limits=limits)
    with pytest.raises(ClipTooLongError):
        L.check_clip(fps=25, num_frames=limits.max_frames + 4, limits=limits)


def test_limits_read_from_loaded_models_and_from_folders_agree(tiny_models, tmp_path):
    from actavatar_core.bundle import save_model_folder
    from actavatar_core.defaults import MINI_MODEL_DIR, mini_model_available

    loaded = L.limits_of(tiny_models)
    assert loaded == L.ClipLimits.from_configs(dict(tiny_models.transformer.config), dict(tiny_models.vae.config))
    assert loaded.max_frames == 4093
    assert L.limits_for_folder(save_model_folder(tiny_models, tmp_path / "m")) == loaded
    if mini_model_available():
        assert L.limits_for_folder(MINI_MODEL_DIR).max_frames == 4093
    # a config with a shorter table and a temporal patch: the limits follow it
    odd = L.ClipLimits.from_configs({"rope_max_seq_len": 100, "patch_size": [2, 2, 2]}, {"scale_factor_spatial": 8})
    assert (odd.max_latent_frames, odd.max_frames, odd.size_step, odd.max_width) == (200, 797, 16, 1600)


def test_messages_say_the_longest_clip_and_what_to_do():
    with pytest.raises(ClipTooLongError) as err:
        L.check_clip(fps=25, audio_seconds=600.0)
    text = str(err.value)
    assert "600.0 s" in text and "at most 4093 frames" in text and "163.7 s at 25 fps" in text
    assert "Fix: Use audio of at most 163.7 s" in text and "--frames 4093" in text
    with pytest.raises(ClipTooLongError, match=r"4097 frames .* \(170.5 s at 24 fps.*Fix: Use at most 4093 frames"):
        L.check_clip(fps=24, num_frames=4097)
    with pytest.raises(SizeError, match="at most 32768 px"):
        L.check_clip(fps=25, num_frames=5, width=32800)
    L.check_clip(fps=25, audio_seconds=163.72)  # exactly 4093 frames
    L.check_clip(fps=25, num_frames=4093, audio_seconds=600.0)  # a fixed length trims the audio: allowed
    assert issubclass(ClipTooLongError, ActAvatarError)


def test_audio_seconds_without_decoding(tmp_path, speech):
    import wave

    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((speech(2.5, 8000, 2).T * 20000).astype("int16").tobytes())
    assert L.audio_seconds(tmp_path / "a.wav") == pytest.approx(2.5, abs=1e-3)
    assert L.audio_seconds({"waveform": torch.zeros(1, 2, 48000), "sample_rate": 16000}) == 3.0
    assert L.audio_seconds(tmp_path / "missing.wav") is None and L.audio_seconds([0.0]) is None


def test_the_pipeline_refuses_a_too_long_clip_before_encoding_audio(tiny_models, monkeypatch, portrait):
    import actavatar_core.audio as audio_mod
    import actavatar_core.pipeline as pipeline_mod
    from actavatar_core.pipeline import ActAvatarPipeline, GenerationRequest

    def boom(*args, **kwargs):
        raise AssertionError("the audio was encoded before the clip length was checked")

    for module in (audio_mod, pipeline_mod):
        for name in ("wav2vec2_hidden_states", "encode_audio", "encode_speech"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)
    long_speech = {"waveform": torch.full((1, 1, 8000 * 170), 0.1), "sample_rate": 8000}  # 170 s
    request = GenerationRequest(image=portrait, audio=long_speech, phases="a man talks", width=64, height=64)
    with pytest.raises(ClipTooLongError, match="at most 4093 frames"):
        ActAvatarPipeline(tiny_models).generate_latents(request)
    request.audio, request.num_frames = {"waveform": torch.full((1, 1, 8000), 0.1), "sample_rate": 8000}, 4097
    with pytest.raises(ClipTooLongError, match="4097 frames"):
        ActAvatarPipeline(tiny_models).generate_latents(request)
