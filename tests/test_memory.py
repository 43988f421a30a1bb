"""Memory modes (``actavatar_core.memory``) on the CPU with tiny models of the real classes: each mode against the
plain path, the fallbacks' messages, the tiled streaming decode against diffusers' ``tiled_decode``, and the routed
PACA fast path under diffusers' layerwise-casting hooks."""

import json

import numpy as np
import pytest
import torch

from actavatar_core import memory
from actavatar_core.bundle import tiny_models
from actavatar_core.pipeline import ActAvatarPipeline, GenerationRequest
from actavatar_core.sampling import SamplingOptions
from actavatar_core.vae import decode_chunks

SCRIPT = "A man talks | 0-0.6s: raises the left hand | 0.6-1.2s: waves the right hand"
#: fp8 storage against the unrounded weights: the tiny random models' latents after 2 steps move by at most this
#: much (measured 0.05-0.1 on latents of unit scale: e4m3's 3 mantissa bits round each weight by up to 6 %).
FP8_LATENT_TOLERANCE = 0.25


def _request(portrait, speech, mode="learned", **kw):
    audio = {"waveform": torch.from_numpy(speech(1.2, 16000))[None], "sample_rate": 16000}
    return GenerationRequest(image=portrait, audio=audio, phases=SCRIPT, width=64, height=64, fps=25,
                             options=SamplingOptions(steps=2, seed=1, paca_mode=mode), **kw)


def _run(models, portrait, speech, mode="learned"):
    return ActAvatarPipeline(models).generate(_request(portrait, speech, mode))


def _round_to_fp8(models, parts=("transformer", "text_encoder")) -> None:
    """The plain models with every weight layerwise casting stores in fp8 rounded to fp8 and back: the same
    arithmetic as the fp8 mode, with no hooks."""
    for module in (getattr(models, part) for part in parts):
        for _, sub in memory.castable_layers(module):
            with torch.no_grad():
                for p in sub.parameters(recurse=False):
                    p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))


_PLAIN: dict = {}


@pytest.fixture
def plain(portrait, speech):
    """The plain path's result (made once: every model here is built fresh from the same seed)."""
    if "learned" not in _PLAIN:
        _PLAIN["learned"] = _run(tiny_models(seed=0), portrait, speech)
    return _PLAIN["learned"]


def test_full_mode_is_the_plain_path(plain, portrait, speech):
    models = tiny_models(seed=0)
    report = memory.apply_memory_mode(models, "full", "cpu")
    assert report.mode == "full" and not report.fallbacks
    out = _run(models, portrait, speech)
    assert torch.equal(out.latents, plain.latents) and np.array_equal(out.frames, plain.frames)


def test_offload_mode_on_the_cpu_falls_back_and_says_why(plain, portrait, speech):
    models = tiny_models(seed=0)
    lines: list[str] = []
    report = memory.apply_memory_mode(models, "offload", "cpu", log=lines.append)
    assert report.mode == "offload"
    assert any("block offloading" in f and "CUDA" in f and "stays whole" in f for f in report.fallbacks)
    assert any(line.startswith("  fallback: block offloading") for line in lines)
    assert any("text encoder: on the CPU" in a for a in report.applied)
    assert models.vae.use_tiling  # the 64x64 clip is smaller than one tile, so the decode is the untiled one
    out = _run(models, portrait, speech)
    assert torch.equal(out.latents, plain.latents) and np.array_equal(out.frames, plain.frames)


def test_block_offload_machinery_is_exact_and_samples_on_its_onload_device(plain, portrait, speech):
    """diffusers' block-level group offloading on the ActAvatar transformer (CPU to CPU here, no stream: the same
    hooks and groups as on a GPU): same latents, and the sampler finds the onload device through the hooks."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    models = tiny_models(seed=0)
    memory.enable_block_offload(models.transformer, "cpu", "cpu", use_stream=False)
    assert _is_group_offload_enabled(models.transformer)
    assert memory.execution_device(models.transformer) == torch.device("cpu")
    assert all(hasattr(b, "_diffusers_hook") for b in models.transformer.blocks)
    out = _run(models, portrait, speech)
    assert torch.equal(out.latents, plain.latents)


def test_fp8_mode_equals_the_plain_path_with_fp8_rounded_weights(plain, portrait, speech):
    models = tiny_models(seed=0)
    before = memory.module_bytes(models.transformer)
    report = memory.apply_memory_mode(models, "fp8", "cpu")
    assert not report.fallbacks and any("transformer: fp8 storage" in a for a in report.applied)
    assert memory.module_bytes(models.transformer) < 0.5 * before  # fp32 weights -> 1 byte each for the linears
    assert models.transformer.blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn
    assert models.transformer.phase_embedding.weight.dtype == torch.float32  # skipped: PACA's phase embedding
    out = _run(models, portrait, speech)
    rounded = tiny_models(seed=0)
    _round_to_fp8(rounded)
    reference = _run(rounded, portrait, speech)
    assert torch.equal(out.latents, reference.latents)
    assert np.array_equal(out.frames, reference.frames)
    diff = float((out.latents - plain.latents).abs().max())
    assert 0 < diff < FP8_LATENT_TOLERANCE


def test_fp8_and_block_offload_compose(portrait, speech):
    fp8_only = tiny_models(seed=0)
    memory.enable_fp8_storage(fp8_only.transformer, torch.float32)
    both = tiny_models(seed=0)
    memory.enable_fp8_storage(both.transformer, torch.float32)
    memory.enable_block_offload(both.transformer, "cpu", "cpu", use_stream=False)
    assert torch.equal(_run(both, portrait, speech).latents, _run(fp8_only, portrait, speech).latents)


def test_routed_fast_path_falls_back_under_layerwise_casting(portrait, speech):
    """PACA's routed fast path projects each run with ``addmm(out=...)``, which would bypass the casting hook and
    meet an fp8 weight: under the hooks it must take the assembled path, and give the rounded plain model's result."""
    from actavatar_core.attention import _projects_in_place

    models = tiny_models(seed=0)
    out_proj = models.transformer.blocks[0].attn2.to_out[0]
    query = torch.zeros(1, 4, out_proj.in_features)
    with torch.no_grad():  # as the sampler runs it
        assert _projects_in_place(out_proj, query)
        memory.enable_fp8_storage(models.transformer, torch.float32)
        assert not _projects_in_place(out_proj, query)
    out = _run(models, portrait, speech, mode="routed")
    rounded = tiny_models(seed=0)
    _round_to_fp8(rounded, parts=("transformer",))
    reference = _run(rounded, portrait, speech, mode="routed")  # the fast path on plain weights
    assert torch.equal(out.latents, reference.latents)


def test_fp8_falls_back_with_the_reason_when_the_device_has_no_float8(plain, portrait, speech, monkeypatch):
    assert "MPS" in memory.fp8_unsupported("mps")
    assert memory.fp8_unsupported("cpu") is None
    monkeypatch.setattr(memory, "fp8_unsupported", lambda device: "this device has no float8 casts")
    models = tiny_models(seed=0)
    report = memory.apply_memory_mode(models, "fp8", "cpu")
    assert any("transformer does not apply: this device has no float8 casts" in f for f in report.fallbacks)
    assert any("text encoder does not apply" in f for f in report.fallbacks)
    assert torch.equal(_run(models, portrait, speech).latents, plain.latents)


def test_fp8_needs_a_float_compute_dtype():
    with pytest.raises(memory.MemoryModeError, match="Fix:"):
        memory.enable_fp8_storage(torch.nn.Linear(2, 2), torch.int8)


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(memory.MemoryModeError, match=r"Unknown memory mode 'half'.*Fix: Use one of auto, full"):
        memory.apply_memory_mode(tiny_models(seed=0), "half", "cpu")


def test_auto_chooses_the_first_mode_that_fits():
    peaks = {"full": 30 << 30, "fp8": 18 << 30, "offload": 9 << 30, "fp8-offload": 6 << 30}
    assert memory.choose_mode(None, peaks) == "full"
    assert memory.choose_mode(80 << 30, peaks) == "full"
    assert memory.choose_mode(24 << 30, peaks) == "fp8"
    assert memory.choose_mode(12 << 30, peaks) == "offload"
    assert memory.choose_mode(8 << 30, peaks) == "fp8-offload"
    assert memory.choose_mode(2 << 30, peaks) == "fp8-offload"


def test_auto_on_the_cpu_keeps_everything_resident_and_says_so():
    models = tiny_models(seed=0)
    report = memory.apply_memory_mode(models, "auto", "cpu")
    assert report.requested == "auto" and report.mode == "full"
    assert any("no free-memory figure" in a for a in report.applied)
    assert set(report.estimates_gb) == set(memory.FIT_ORDER)
    json.dumps(report.to_json())


def test_estimates_order_the_modes_at_the_5b_shape():
    """At the 5B shape (configs only, on the meta device: no weights are made) the modes' estimated peaks fall in
    the order auto tries them, and block offloading keeps the transformer's share to a few blocks."""
    from diffusers import AutoencoderKLWan

    from actavatar_core.bench_clip import build_models

    with torch.device("meta"):
        models = build_models("5b", device="meta", dtype=torch.bfloat16, layers=30)
    acts = memory.activation_bytes(models.transformer.config, models.vae.config, width=704, height=1280, frames=121)
    assert 1.5 * 2**30 < acts["forward"] < 4 * 2**30  # 2.3 GB measured on an H200
    assert acts["decode_tiled"] < acts["decode"]
    peaks = memory.estimate_peaks(models, acts)
    assert peaks["full"] > peaks["fp8"] > peaks["offload"] > peaks["fp8-offload"]
    assert peaks["offload"] < 8 * 2**30 < peaks["fp8"]
    assert isinstance(models.vae, AutoencoderKLWan)


@pytest.mark.parametrize("chunk", [1, 2])
def test_tiled_stream_equals_diffusers_tiled_decode(chunk):
    from actavatar_core.tiny import tiny_vae

    vae = tiny_vae(seed=0)
    vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                      tile_sample_stride_width=48)
    z = torch.randn(1, 48, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.tiled_decode(z).sample
    streamed = torch.cat(list(decode_chunks(vae, z, chunk)), dim=2)
    assert streamed.shape == whole.shape == (1, 3, 9, 128, 96)
    assert torch.equal(streamed, whole)
    vae.disable_tiling()
    plain = torch.cat(list(decode_chunks(vae, z, chunk)), dim=2)
    assert not torch.equal(plain, streamed)  # tiling blends the seams: another decode, not a copy of the plain one


def test_tiling_leaves_the_reference_latent_alone(portrait):
    from actavatar_core.tiny import tiny_vae
    from actavatar_core.vae import encode_reference

    vae = tiny_vae(seed=0)
    plain = encode_reference(vae, portrait, 128, 96)
    vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                      tile_sample_stride_width=48)
    assert torch.equal(encode_reference(vae, portrait, 128, 96), plain)
    assert vae.use_tiling


def test_bench_clip_tiny_prints_and_writes_every_stage(tmp_path, capsys):
    from actavatar_core.bench import main

    out = tmp_path / "figures" / "clip.json"
    assert main(["bench", "clip", "--tiny", "--memory-mode", "fp8", "--phase-cfg", "1.5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    stages = ("text_encoding", "speech_encoding", "reference_encoding", "sampling", "vae_decode", "mp4")
    for stage in stages:
        assert data["stages"][stage]["seconds"] > 0
        assert stage in printed
    assert all(data["stages"][s]["peak_gb"] > 0 for s in stages if s != "mp4")
    assert data["shape"]["passes_per_step"] == 4  # text, audio and phase guidance
    assert data["steps"]["count"] == 2 and len(data["steps"]["per_step_seconds"]) == 2
    assert data["total_seconds"] == pytest.approx(sum(data["stages"][s]["seconds"] for s in stages))
    assert data["memory"]["mode"] == "fp8" and any("fp8 storage" in a for a in data["memory"]["applied"])
    assert data["video"] is None  # the MP4 went to a temporary folder, removed
    assert "time per step" in printed and "memory mode fp8" in printed


def test_bench_clip_refuses_an_off_grid_size(capsys):
    from actavatar_core.bench import main

    assert main(["bench", "clip", "--tiny", "--width", "70"]) == 2
    assert "Fix:" in capsys.readouterr().err


def test_generate_takes_a_memory_mode_and_prints_what_it_did(tmp_path, capsys):
    from actavatar_core.pipeline_cli import main

    out = tmp_path / "demo.mp4"
    assert main(["demo", "--smoke", "--memory-mode", "fp8", "--out", str(out), "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "memory mode: fp8" in printed and "transformer: fp8 storage" in printed
    assert main(["demo", "--smoke", "--memory-mode", "half"]) == 2
    assert "invalid choice: 'half'" in capsys.readouterr().err
