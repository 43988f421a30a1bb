import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from actavatar_core.attention import (BatchRouting, FrameAudioProcessor, PACAProcessor, PhaseRouting, RelayRouting,
                                      frame_mixtures, phase_attention, relay_attention, relay_bias, routing_for_mode,
                                      token_frame_index)
from actavatar_core.errors import ActAvatarError
from actavatar_core.phases import PhaseScript, latent_frame_times
from actavatar_core.sampling import build_routing

DIM, HEADS, FRAMES, HW, TEXT = 64, 2, 6, 8, 20


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return WanAttention(dim=DIM, heads=HEADS, dim_head=DIM // HEADS, eps=1e-6, cross_attention_dim_head=DIM // HEADS).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, FRAMES * HW, DIM, generator=g)
    ctx = torch.randn(1, TEXT, DIM, generator=g)
    ids = torch.zeros(1, TEXT, dtype=torch.long)
    ids[0, 4:9], ids[0, 9:14] = 1, 2  # base 0-3, phase 1 4-8, phase 2 9-13, end/padding 14-19
    return x, ctx, ids


def _dense_reference(attn, x, ctx, ids, active):
    """Masked softmax attention with an explicit (frames x tokens) mask: the slow definition routed must equal."""
    q = attn.norm_q(attn.to_q(x)).unflatten(2, (HEADS, -1)).transpose(1, 2)
    k = attn.norm_k(attn.to_k(ctx)).unflatten(2, (HEADS, -1)).transpose(1, 2)
    v = attn.to_v(ctx).unflatten(2, (HEADS, -1)).transpose(1, 2)
    visible = torch.stack([(ids[0] == 0) | torch.isin(ids[0], torch.tensor(sorted(a) or [-1])) for a in active])
    mask = visible.repeat_interleave(HW, dim=0)[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    return attn.to_out[0](out)


@torch.no_grad()
def test_single_full_phase_equals_plain_attention(attn):
    x, ctx, ids = _inputs()
    ids[0, 9:14] = 1  # one phase only
    plain = WanAttnProcessor()(attn, x, ctx)
    routing = PhaseRouting.build(ids, [frozenset({1})] * FRAMES)
    tf = token_frame_index(FRAMES, HW)
    assert torch.equal(PACAProcessor()(attn, x, ctx), plain)
    torch.testing.assert_close(PACAProcessor()(attn, x, ctx, routing=routing, token_frame=tf), plain, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_routed_equals_dense_masked_reference(attn):
    x, ctx, ids = _inputs()
    active = [frozenset({1}), frozenset({1}), frozenset(), frozenset({2}), frozenset({2}), frozenset({1, 2})]
    routing = PhaseRouting.build(ids, active)
    got = PACAProcessor()(attn, x, ctx, routing=routing, token_frame=token_frame_index(FRAMES, HW))
    torch.testing.assert_close(got, _dense_reference(attn, x, ctx, ids, active), rtol=1e-5, atol=1e-5)
    assert len(routing.runs(token_frame_index(FRAMES, HW))) == 4  # frames sharing a set are merged into runs


@torch.no_grad()
def test_frames_outside_a_window_get_exactly_zero_attention_from_it(attn):
    x, ctx, ids = _inputs()
    active = [frozenset({1})] * 3 + [frozenset({2})] * 3
    tf = token_frame_index(FRAMES, HW)
    a = PACAProcessor()(attn, x, ctx, routing=PhaseRouting.build(ids, active), token_frame=tf)
    ctx2 = ctx.clone()
    ctx2[0, 4:9] += 100.0 * torch.randn(5, DIM)  # change phase-1 tokens only
    b = PACAProcessor()(attn, x, ctx2, routing=PhaseRouting.build(ids, active), token_frame=tf)
    outside = slice(3 * HW, 6 * HW)
    assert torch.equal(a[:, outside], b[:, outside])  # bit for bit: phase 1 has no path to frames 3-5
    assert (a[:, : 3 * HW] - b[:, : 3 * HW]).abs().max() > 1e-3


@torch.no_grad()
def test_per_sample_layouts_use_a_key_mask(attn):
    x, ctx, ids = _inputs()
    x2, ids2 = torch.cat([x, x]), torch.cat([ids, torch.zeros_like(ids)])  # sample 2: all base tokens
    active = [frozenset({1})] * 3 + [frozenset({2})] * 3
    out = PACAProcessor()(attn, x2, torch.cat([ctx, ctx]), routing=PhaseRouting.build(ids2, active),
                          token_frame=token_frame_index(FRAMES, HW))
    torch.testing.assert_close(out[:1], _dense_reference(attn, x, ctx, ids, active), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], WanAttnProcessor()(attn, x, ctx), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batch_routing_gives_each_sample_its_own_windows(attn):
    """Training batches mix clips with their own scripts: each sample must equal its own single-clip routed output."""
    x, ctx, ids = _inputs()
    x2, ctx2, _ = _inputs(seed=2)
    first = [frozenset({1})] * 3 + [frozenset({2})] * 3
    second = [frozenset()] * 2 + [frozenset({2})] * 2 + [frozenset({1})] * 2
    routing = BatchRouting.build(torch.cat([ids, ids]), [first, second])
    tf = token_frame_index(FRAMES, HW)
    out = PACAProcessor()(attn, torch.cat([x, x2]), torch.cat([ctx, ctx2]), routing=routing, token_frame=tf)
    for b, (xs, cs, active) in enumerate([(x, ctx, first), (x2, ctx2, second)]):
        alone = PACAProcessor()(attn, xs, cs, routing=PhaseRouting.build(ids, active), token_frame=tf)
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-5, atol=1e-5)
    # base (0-3) and padding (14-19) stay visible; phase 2 (9-13) is hidden from the first sample's frame 0
    assert routing.visible[0, 0, :4].all() and routing.visible[0, 0, 14:].all() and not routing.visible[0, 0, 9:14].any()
    assert routing.visible[1, 0, 4:14].sum() == 0 and routing.visible[1, 5, 4:9].all()


def test_batch_routing_rejects_mismatched_maps():
    ids = torch.zeros(2, TEXT, dtype=torch.long)
    with pytest.raises(ValueError, match="frame-to-phase maps for a batch of 2"):
        BatchRouting.build(ids, [[frozenset()] * FRAMES])
    with pytest.raises(ValueError, match="different latent frame counts"):
        BatchRouting.build(ids, [[frozenset()] * FRAMES, [frozenset()] * (FRAMES - 1)])


def test_feather_blends_only_near_boundaries():
    script = PhaseScript.parse("x | 0-2s: a | 2-4s: b")
    times = latent_frame_times(26, 25)
    active = script.active_phases(26, 25)
    hard = frame_mixtures(active, times, [0, 2, 4], 0, 4 / 25)
    soft = frame_mixtures(active, times, [0, 2, 4], 3, 4 / 25)
    assert all(len(m) == 1 for m in hard)
    blended = [j for j, m in enumerate(soft) if len(m) == 2]
    assert blended and all(abs(times[j] - 2) < 1.5 * 4 / 25 or abs(times[j] - 4) < 1.5 * 4 / 25 for j in blended)
    for j in blended:
        (s1, w1), (s2, w2) = soft[j]
        assert abs(w1 + w2 - 1) < 1e-9 and 0 < w2 < 1
    far = [j for j in range(26) if j not in blended]
    assert all(soft[j] == hard[j] for j in far)
    # the weight of the later set grows across the boundary at 2 s
    around = [soft[j] for j in blended if abs(times[j] - 2) < 0.5]
    weights_after = [dict((tuple(sorted(s)), w) for s, w in m).get((2,), 0.0) for m in around]
    assert weights_after == sorted(weights_after)


@torch.no_grad()
def test_feathered_output_is_the_weighted_blend(attn):
    x, ctx, ids = _inputs()
    mix = [((frozenset({1}), 0.25), (frozenset({2}), 0.75))] * FRAMES
    routing = PhaseRouting(ids, mix)
    got = PACAProcessor()(attn, x, ctx, routing=routing, token_frame=token_frame_index(FRAMES, HW))
    a = _dense_reference(attn, x, ctx, ids, [frozenset({1})] * FRAMES) - attn.to_out[0].bias
    b = _dense_reference(attn, x, ctx, ids, [frozenset({2})] * FRAMES) - attn.to_out[0].bias
    torch.testing.assert_close(got, 0.25 * a + 0.75 * b + attn.to_out[0].bias, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_build_routing_from_script():
    script = PhaseScript.parse("x | 0-1s: a | 1-2s: b")
    routing = build_routing(script, torch.zeros(1, 4, dtype=torch.long), 13, 25, feather=0)
    sets = [m[0][0] for m in routing.mixtures]
    assert sets[0] == frozenset({1}) and sets[-1] == frozenset({2}) and routing.num_frames == 13


@torch.no_grad()
def test_frame_audio_attention_is_per_frame(attn):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, FRAMES * HW, DIM, generator=g)
    audio = torch.randn(2, FRAMES, 4, DIM, generator=g)
    tf = token_frame_index(FRAMES, HW)
    out = FrameAudioProcessor()(attn, x, audio, token_frame=tf)
    for f in range(FRAMES):  # frame f alone against its own 4 audio tokens
        ref = WanAttnProcessor()(attn, x[:, f * HW:(f + 1) * HW], audio[:, f])
        torch.testing.assert_close(out[:, f * HW:(f + 1) * HW], ref, rtol=1e-5, atol=1e-5)
    # a shard that cuts through frames (as context parallelism may) takes the per-frame path, same numbers
    shard = slice(HW // 2, 3 * HW + 3)
    part = FrameAudioProcessor()(attn, x[:, shard], audio, token_frame=tf[:, shard])
    torch.testing.assert_close(part, out[:, shard], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_runs_projected_in_place_equal_the_assembled_output(attn, monkeypatch):
    """Each hard run goes through the output projection into its own rows; hooks, autograd or feathering keep the
    assembled path, and both give the same layer output."""
    from actavatar_core import attention as A

    x, ctx, ids = _inputs()
    x2, ctx2, _ = _inputs(seed=2)
    active = [frozenset({1}), frozenset({1}), frozenset(), frozenset({2}), frozenset({2}), frozenset({1, 2})]
    routing = PhaseRouting.build(torch.cat([ids, ids]), active)
    tf = token_frame_index(FRAMES, HW)
    xs, cs = torch.cat([x, x2]), torch.cat([ctx, ctx2])
    assert A._projects_in_place(attn.to_out[0], xs)
    calls = []
    handle = attn.to_out[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        assembled = PACAProcessor()(attn, xs, cs, routing=routing, token_frame=tf)
    finally:
        handle.remove()
    assert calls == [1]  # a hooked projection (LoRA, offloading, casting) is called as a module
    monkeypatch.setattr(A, "routed_attention", lambda *a, **k: pytest.fail("the attention output was assembled"))
    in_place = PACAProcessor()(attn, xs, cs, routing=routing, token_frame=tf)
    torch.testing.assert_close(in_place, assembled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_place[:1], _dense_reference(attn, x, ctx, ids, active), rtol=1e-5, atol=1e-5)


def test_projecting_in_place_needs_a_plain_inference_linear(attn):
    from actavatar_core.attention import _projects_in_place

    q = torch.zeros(1, 4, DIM)
    with torch.no_grad():
        assert _projects_in_place(attn.to_out[0], q)
        assert not _projects_in_place(attn.to_out[0], q.double())  # dtype mismatch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _projects_in_place(attn.to_out[0], q)
    assert not _projects_in_place(attn.to_out[0], q)  # autograd on: out= cannot record the graph
    wrapped = torch.nn.Sequential(attn.to_out[0])
    assert not _projects_in_place(wrapped, q)
    offloaded = torch.nn.Linear(DIM, DIM)
    offloaded.forward = lambda x: torch.nn.Linear.forward(offloaded, x)  # how accelerate's offload hooks attach
    with torch.no_grad():
        assert not _projects_in_place(offloaded, q)


# ------------------------------------------------------------------------------------------------------------ relay
RELAY_ACTIVE = [frozenset({1}), frozenset({1}), frozenset(), frozenset({2}), frozenset({2}), frozenset({1, 2})]


def _relay_reference(attn, x, ctx, ids, active, width):
    """Relay by its definition, one frame and one token at a time: softmax(q k^T / sqrt(D) - d^2 / (2 w^2)) v with d
    the latent frames from the frame to the nearest frame where the token's phase is active (F if none, 0 for base)."""
    q = attn.norm_q(attn.to_q(x)).unflatten(2, (HEADS, -1)).transpose(1, 2)  # (B, H, N, D)
    k = attn.norm_k(attn.to_k(ctx)).unflatten(2, (HEADS, -1)).transpose(1, 2)
    v = attn.to_v(ctx).unflatten(2, (HEADS, -1)).transpose(1, 2)
    frames = len(active)
    bias = torch.zeros(frames, ids.shape[1])
    for f in range(frames):
        for s, phase in enumerate(ids[0].tolist()):
            if phase == 0:
                continue
            where = [g for g in range(frames) if phase in active[g]]
            d = min(abs(f - g) for g in where) if where else frames
            bias[f, s] = -(d ** 2) / (2 * width ** 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.repeat_interleave(HW, dim=0)
    out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return attn.to_out[0](out)


def test_relay_bias_is_the_gaussian_of_the_distance_to_each_phase_window():
    ids = torch.tensor([[0, 1, 1, 2, 3, 0]])  # phase 3 is active at no frame
    routing = PhaseRouting.build(ids, RELAY_ACTIVE)
    distance = routing.phase_distance()
    assert distance[:, 0].tolist() == [0.0] * FRAMES  # the base block is never penalised
    assert distance[:, 1].tolist() == [0, 0, 1, 2, 1, 0] and distance[:, 2].tolist() == [3, 2, 1, 0, 0, 0]
    assert distance[:, 3].tolist() == [FRAMES] * FRAMES
    bias = relay_bias(routing, 2.0)
    assert bias.shape == (1, FRAMES, 6)
    torch.testing.assert_close(bias[0, 2], torch.tensor([0.0, -1 / 8, -1 / 8, -1 / 8, -36 / 8, 0.0]))
    hard = relay_bias(routing, 0.0)[0]
    assert torch.equal(hard == 0, torch.stack([torch.tensor([True, *(1 in a,) * 2, 2 in a, False, True]) for a in RELAY_ACTIVE]))
    assert torch.equal(relay_bias(routing, math.inf), torch.zeros(1, FRAMES, 6))
    assert relay_bias(PhaseRouting.build(torch.cat([ids, ids]), RELAY_ACTIVE), 2.0).shape[0] == 1  # shared layout
    assert relay_bias(PhaseRouting.build(torch.cat([ids, ids.flip(1)]), RELAY_ACTIVE), 2.0).shape[0] == 2


@torch.no_grad()
@pytest.mark.parametrize("width", [0.7, 2.0, 5.0])
def test_relay_equals_the_dense_reference_with_the_same_additive_bias(attn, width):
    x, ctx, ids = _inputs()
    relay = RelayRouting(PhaseRouting.build(ids, RELAY_ACTIVE), width)
    got = PACAProcessor()(attn, x, ctx, routing=relay, token_frame=token_frame_index(FRAMES, HW))
    torch.testing.assert_close(got, _relay_reference(attn, x, ctx, ids, RELAY_ACTIVE, width), rtol=1e-5, atol=1e-5)
    assert (got - PACAProcessor()(attn, x, ctx)).abs().max() > 1e-3  # the bias changes the output


@torch.no_grad()
def test_relay_width_to_zero_is_routed_and_to_infinity_is_learned(attn):
    x, ctx, ids = _inputs()
    tf = token_frame_index(FRAMES, HW)
    routing = PhaseRouting.build(ids, RELAY_ACTIVE)
    routed = PACAProcessor()(attn, x, ctx, routing=routing, token_frame=tf)
    learned = PACAProcessor()(attn, x, ctx)
    assert (routed - learned).abs().max() > 1e-2  # the two limits differ, so both checks can fail
    for width in (0.0, 1e-3):
        relay = PACAProcessor()(attn, x, ctx, routing=RelayRouting(routing, width), token_frame=tf)
        torch.testing.assert_close(relay, routed, rtol=1e-5, atol=1e-6)
    for width in (1e6, math.inf):
        relay = PACAProcessor()(attn, x, ctx, routing=RelayRouting(routing, width), token_frame=tf)
        torch.testing.assert_close(relay, learned, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_relay_batches_shared_and_per_sample_layouts_and_shards(attn):
    x, ctx, ids = _inputs()
    x2, ctx2, _ = _inputs(seed=2)
    tf = token_frame_index(FRAMES, HW)
    xs, cs = torch.cat([x, x2]), torch.cat([ctx, ctx2])
    shared = PACAProcessor()(attn, xs, cs, routing=RelayRouting(PhaseRouting.build(torch.cat([ids, ids]), RELAY_ACTIVE), 2.0),
                             token_frame=tf)
    for b, (xb, cb) in enumerate([(x, ctx), (x2, ctx2)]):
        torch.testing.assert_close(shared[b : b + 1], _relay_reference(attn, xb, cb, ids, RELAY_ACTIVE, 2.0), rtol=1e-5, atol=1e-5)
    ids2 = torch.zeros_like(ids)
    ids2[0, 14:17] = 2  # sample 2: another layout, phase 2 only
    mixed = PACAProcessor()(attn, xs, cs, routing=RelayRouting(PhaseRouting.build(torch.cat([ids, ids2]), RELAY_ACTIVE), 2.0),
                            token_frame=tf)
    torch.testing.assert_close(mixed[:1], shared[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1:], _relay_reference(attn, x2, ctx2, ids2, RELAY_ACTIVE, 2.0), rtol=1e-5, atol=1e-5)
    # a context-parallel shard (cutting through frames) gets the rows of the whole sequence
    q, k, v = (t.unflatten(2, (HEADS, -1)) for t in (attn.norm_q(attn.to_q(xs)), attn.norm_k(attn.to_k(cs)), attn.to_v(cs)))
    routing = PhaseRouting.build(torch.cat([ids, ids]), RELAY_ACTIVE)
    whole = relay_attention(q, k, v, routing, tf, 2.0)
    shard = slice(HW // 2, 4 * HW + 3)
    torch.testing.assert_close(relay_attention(q[:, shard], k, v, routing, tf[:, shard], 2.0), whole[:, shard],
                               rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_relay_keeps_every_phase_visible_with_less_weight_further_away(attn):
    """Unlike routed, a frame outside phase 1's window still hears it, and less the further it is."""
    x, ctx, ids = _inputs()
    active = [frozenset({1})] * 2 + [frozenset({2})] * 4
    tf = token_frame_index(FRAMES, HW)
    relay = RelayRouting(PhaseRouting.build(ids, active), 1.5)
    ctx2 = ctx.clone()
    ctx2[0, 4:9] += 10.0 * torch.randn(5, DIM)  # change phase-1 tokens only
    a = PACAProcessor()(attn, x, ctx, routing=relay, token_frame=tf)
    b = PACAProcessor()(attn, x, ctx2, routing=relay, token_frame=tf)
    change = [(a - b)[0, f * HW:(f + 1) * HW].abs().mean().item() for f in range(FRAMES)]
    assert min(change) > 0  # visible everywhere
    assert change[2] > change[3] > change[4] > change[5]  # fading with the distance from frames 0-1


def test_relay_routing_refuses_what_would_run_another_mode():
    _, _, ids = _inputs()
    routing = PhaseRouting.build(ids, RELAY_ACTIVE)
    relay = RelayRouting(routing, 2.0)
    assert routing_for_mode("relay", relay, ids) is relay and routing_for_mode("routed", routing, ids) is routing
    assert routing_for_mode("learned", relay, ids) is None and routing_for_mode("global", routing, ids) is None
    assert routing_for_mode("relay", None, None) is None and routing_for_mode("relay", None, torch.zeros_like(ids)) is None
    with pytest.raises(ActAvatarError, match="needs a width"):
        routing_for_mode("relay", routing, ids)
    with pytest.raises(ActAvatarError, match="training batches"):
        routing_for_mode("relay", BatchRouting.build(ids, [RELAY_ACTIVE]), ids)
    with pytest.raises(ActAvatarError, match="no frame-to-phase routing"):
        routing_for_mode("relay", None, ids)  # e.g. a training step in relay mode
    with pytest.raises(ActAvatarError, match="given to routed mode"):
        routing_for_mode("routed", relay, ids)
    with pytest.raises(ActAvatarError, match="feathered"):
        RelayRouting(PhaseRouting(ids, [((frozenset({1}), 0.5), (frozenset({2}), 0.5))] * FRAMES), 2.0)
    for bad in (-1.0, math.nan):
        with pytest.raises(ActAvatarError, match="Fix:"):
            RelayRouting(routing, bad)


@torch.no_grad()
def test_phase_attention_is_the_processor_at_the_qkv_level(attn):
    """The q/k/v-level entry (for attention code without diffusers' Attention object) equals the processor for
    every kind of routing, before the output projection."""
    x, ctx, ids = _inputs()
    tf = token_frame_index(FRAMES, HW)
    q, k, v = (t.unflatten(2, (HEADS, -1)) for t in (attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(ctx)), attn.to_v(ctx)))
    hard = PhaseRouting.build(ids, RELAY_ACTIVE)
    kinds = {"plain": None, "routed": hard, "feathered": PhaseRouting(ids, [((frozenset({1}), 0.25), (frozenset({2}), 0.75))] * FRAMES),
             "relay": RelayRouting(hard, 1.5), "batch": BatchRouting.build(ids, [RELAY_ACTIVE])}
    outputs = {}
    for name, routing in kinds.items():
        got = attn.to_out[0](phase_attention(q, k, v, routing, tf).flatten(2))
        outputs[name] = got
        torch.testing.assert_close(got, PACAProcessor()(attn, x, ctx, routing=routing, token_frame=tf), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["batch"], outputs["routed"], rtol=1e-5, atol=1e-6)
    assert len({round(float(o.sum()), 4) for n, o in outputs.items() if n != "batch"}) == 4  # four different results
