import math

import pytest
import torch
from safetensors.torch import save_file

from actavatar_core.adapter import audio_scales
from actavatar_core.attention import PhaseRouting, RelayRouting
from actavatar_core.errors import ActAvatarError, WeightsError
from actavatar_core import model as model_module
from actavatar_core.model import (
    ActAvatarTransformer, adapter_state_dict, build_from_weights, frame_timesteps, read_actavatar_weights,
    save_actavatar_weights,
)
from actavatar_core.tiny import tiny_wan_transformer

ADAPTER = dict(audio_feature_dim=16, audio_num_layers=3)


def _inputs(frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, frames, 4, 4, generator=g)
    ctx = torch.randn(1, 12, 32, generator=g)
    ts = torch.full((1, frames * 4), 600.0)
    ts[:, :4] = 0.0
    ids = torch.zeros(1, 12, dtype=torch.long)
    ids[:, 3:8] = 1
    feats = torch.randn(1, frames, 8, 3, 16, generator=g)
    return x, ts, ctx, ids, feats


@torch.no_grad()
def test_untrained_adapter_and_single_phase_leave_the_base_model_unchanged():
    base = tiny_wan_transformer()
    model = ActAvatarTransformer.from_base(base, **ADAPTER)
    x, ts, ctx, ids, feats = _inputs()
    ref = base(x, ts, ctx).sample
    routing = PhaseRouting.build(ids, [frozenset({1})] * 3)
    for mode, route in (("global", routing), ("learned", routing), ("routed", routing), ("relay", RelayRouting(routing, 2.0))):
        out = model(x, ts, ctx, phase_ids=ids, audio_features=feats, routing=route, paca_mode=mode).sample
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_frame_timesteps_only_for_timesteps_constant_within_each_latent_frame():
    ts = torch.tensor([[0.0] * 4 + [600.0] * 8, [0.0] * 4 + [300.0] * 8])
    torch.testing.assert_close(frame_timesteps(ts, 2, 3, 4), torch.tensor([[0.0, 600.0, 600.0], [0.0, 300.0, 300.0]]))
    mixed = ts.clone()
    mixed[0, 5] = 599.0  # one token of frame 1 differs: the per-token path must handle it
    assert frame_timesteps(mixed, 2, 3, 4) is None
    assert frame_timesteps(ts[:, :6], 2, 3, 4) is None  # a context-parallel rank's slice of the tokens
    assert frame_timesteps(torch.tensor([600.0, 300.0]), 2, 3, 4) is None  # one timestep per sample


def test_per_frame_modulation_matches_the_per_token_path_in_output_and_gradients(monkeypatch):
    """The fast path (time embedding and modulation per latent frame) must train exactly like Wan's per-token one."""
    torch.manual_seed(0)
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(), **ADAPTER).train()
    for block in model.blocks:
        torch.nn.init.normal_(block.audio_attn.to_out[0].weight, std=0.05)
    x, _, ctx, ids, feats = _inputs()
    x, ctx, ids, feats = (t.repeat(2, *([1] * (t.dim() - 1))) for t in (x, ctx, ids, feats))
    ts = torch.tensor([[0.0] * 4 + [600.0] * 8, [0.0] * 4 + [250.0] * 8])
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[2].dim()))

    def run():
        model.zero_grad()
        out = model(x, ts, ctx, phase_ids=ids, audio_features=feats, paca_mode="learned").sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, fast_grads = run()
    monkeypatch.setattr(model_module, "frame_timesteps", lambda *args: None)
    slow, slow_grads = run()
    assert seen == [5, 4]  # (B, F, 1, 6, D) per frame, then Wan's (B, S, 6, D) per token
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == slow_grads.keys() and len(fast_grads) > 20
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def test_trained_phase_embedding_and_audio_change_the_output():
    base = tiny_wan_transformer()
    model = ActAvatarTransformer.from_base(base, **ADAPTER)
    x, ts, ctx, ids, feats = _inputs()
    ref = model(x, ts, ctx, phase_ids=ids, paca_mode="learned").sample
    model.phase_embedding.weight[1].fill_(0.5)
    assert (model(x, ts, ctx, phase_ids=ids, paca_mode="learned").sample - ref).abs().max() > 1e-4
    assert torch.equal(model(x, ts, ctx, phase_ids=ids, paca_mode="global").sample, ref)
    for block in model.blocks:
        torch.nn.init.normal_(block.audio_attn.to_out[0].weight, std=0.05)
    with_audio = model(x, ts, ctx, audio_features=feats, paca_mode="global").sample
    assert (with_audio - ref).abs().max() > 1e-4
    silent = model(x, ts, ctx, audio_features=feats, paca_mode="global", audio_strength=0.0).sample
    torch.testing.assert_close(silent, ref)


@torch.no_grad()
def test_relay_mode_adds_the_phase_embedding_and_spans_routed_to_learned():
    """relay embeds the phases as learned and routed do; its width limits are the other two modes, whole model."""
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(), **ADAPTER)
    x, ts, ctx, ids, feats = _inputs()
    model.phase_embedding.weight[1].fill_(0.5)
    routing = PhaseRouting.build(ids, [frozenset(), frozenset({1}), frozenset()])
    run = lambda mode, route: model(x, ts, ctx, phase_ids=ids, audio_features=feats, routing=route, paca_mode=mode).sample
    learned, routed = run("learned", None), run("routed", routing)
    unembedded = model(x, ts, ctx, phase_ids=None, audio_features=feats, routing=RelayRouting(routing, 1e6),
                       paca_mode="relay").sample
    assert (learned - routed).abs().max() > 1e-4 and (learned - unembedded).abs().max() > 1e-4
    torch.testing.assert_close(run("relay", RelayRouting(routing, 1e-3)), routed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run("relay", RelayRouting(routing, 1e6)), learned, rtol=1e-5, atol=1e-5)
    middle = run("relay", RelayRouting(routing, 1.0))
    assert (middle - routed).abs().max() > 1e-5 and (middle - learned).abs().max() > 1e-5
    with pytest.raises(ActAvatarError, match="needs a width"):
        run("relay", routing)
    with pytest.raises(ActAvatarError, match="no frame-to-phase routing"):
        run("relay", None)


def test_progressive_schedule_values():
    s = audio_scales(30)
    assert math.isclose(s[0], (1 / 30) ** 1.5) and s[-1] == 1.0 and all(a < b for a, b in zip(s, s[1:]))
    assert math.isclose(s[19], (20 / 30) ** 1.5, rel_tol=1e-12)
    assert abs(sum(s) / 30 - 0.417) < 0.01  # the paper's mean
    assert audio_scales(4, "uniform") == [1.0] * 4
    assert audio_scales(2, "custom", values=[0.1, 0.2]) == [0.1, 0.2]
    with pytest.raises(ValueError, match="2 values"):
        audio_scales(2, "custom", values=[1.0])


@torch.no_grad()
def test_schedule_scales_each_block_residual():
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(), **ADAPTER)
    for block in model.blocks:
        torch.nn.init.normal_(block.audio_attn.to_out[0].weight, std=0.05)
    x, ts, ctx, ids, feats = _inputs()
    outs = {}
    for kind in ("progressive", "uniform"):
        model.set_audio_schedule(kind)
        outs[kind] = model(x, ts, ctx, audio_features=feats, paca_mode="global").sample
    model.set_audio_schedule("custom", values=[1.0, 1.0, 1.0])
    torch.testing.assert_close(model(x, ts, ctx, audio_features=feats, paca_mode="global").sample, outs["uniform"])
    assert (outs["progressive"] - outs["uniform"]).abs().max() > 1e-5
    model.set_audio_schedule(None)
    assert model.audio_block_scales() == audio_scales(3, "progressive", 1.5)


def test_weights_round_trip(tmp_path):
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(), **ADAPTER, audio_tokens=2)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn_like(p))
    path = save_actavatar_weights(model, tmp_path / "a.safetensors")
    tensors, meta = read_actavatar_weights(path)
    assert meta["contents"] == "adapter" and meta["actavatar_config"]["audio_tokens"] == 2
    assert all(".attn1." not in k for k in tensors)
    loaded = build_from_weights(tiny_wan_transformer(), path)
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not list(tmp_path.glob("*.partial"))


def test_full_weights_round_trip(tmp_path):
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(seed=1), **ADAPTER)
    path = save_actavatar_weights(model, tmp_path / "full.safetensors", contents="full")
    loaded = build_from_weights(tiny_wan_transformer(seed=2), path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_weights_for_another_architecture_are_refused(tmp_path):
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(num_layers=2), **ADAPTER)
    path = save_actavatar_weights(model, tmp_path / "a.safetensors")
    with pytest.raises(WeightsError, match="num_layers 2 vs 3"):
        build_from_weights(tiny_wan_transformer(num_layers=3), path)


def test_missing_keys_are_listed(tmp_path):
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(), **ADAPTER)
    path = save_actavatar_weights(model, tmp_path / "a.safetensors")
    tensors, meta = read_actavatar_weights(path)
    del tensors["blocks.1.audio_attn.to_q.weight"]
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta["raw"])
    with pytest.raises(WeightsError, match="missing key.*blocks.1.audio_attn.to_q.weight"):
        build_from_weights(tiny_wan_transformer(), tmp_path / "b.safetensors")


def test_non_actavatar_and_pickle_files_are_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="not an ActAvatar weights file"):
        read_actavatar_weights(tmp_path / "other.safetensors")
    torch.save({"x": torch.zeros(2)}, tmp_path / "w.ckpt")
    with pytest.raises(WeightsError, match="only read from safetensors"):
        read_actavatar_weights(tmp_path / "w.ckpt")


def test_gradient_checkpointing_training_step_reaches_adapter():
    model = ActAvatarTransformer.from_base(tiny_wan_transformer(), **ADAPTER).train()
    model.enable_gradient_checkpointing()
    x, ts, ctx, ids, feats = _inputs()
    out = model(x, ts, ctx, phase_ids=ids, audio_features=feats, paca_mode="learned").sample
    out.square().mean().backward()
    # zero-initialised output projections still receive gradients, so training can move them
    assert model.blocks[0].audio_attn.to_out[0].weight.grad.abs().sum() > 0
    assert model.phase_embedding.weight.grad[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16 once fed bf16 to the fp32 time projection (a GPU run)
def test_bench_timestep_compares_both_ways_on_the_same_inputs(tmp_path, capsys, dtype):
    from actavatar_core import bench

    out = tmp_path / "timestep.json"
    assert bench.main(["bench", "timestep", "--frames", "3", "--tokens-per-frame", "8", "--dim", "32", "--blocks", "2",
                       "--repeats", "1", "--dtype", dtype, "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["shape"]["dtype"] == dtype
    assert [r["mode"] for r in result["rows"]] == ["per token (diffusers Wan2.2 TI2V)", "per latent frame (ActAvatar)"]
    assert result["max_abs_difference"] < (1e-5 if dtype == "fp32" else 1e-2)  # the same conditioning, per frame
    assert result["rows"][0]["time_ratio"] == 1.0 and result["rows"][1]["time_ms"] > 0
    assert "per latent frame (ActAvatar)" in capsys.readouterr().out


def test_bench_paca_times_every_mode_against_plain_cross_attention(tmp_path):
    from actavatar_core import bench

    out = tmp_path / "paca.json"
    assert bench.main(["bench", "paca", "--frames", "3", "--tokens-per-frame", "8", "--heads", "2", "--head-dim", "8",
                       "--repeats", "1", "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["rows"]] == ["plain cross-attention", "global", "learned", "routed",
                                                   "routed feather=2", "relay width=2"]
    assert "relay_met" in result and "1.15x" in result["relay_target"]
    assert result["shape"]["video_tokens"] == 24 and result["shape"]["dim"] == 16
    assert all(r["time_ms"] > 0 for r in result["rows"]) and result["phase_embedding_once_per_forward_ms"] > 0
