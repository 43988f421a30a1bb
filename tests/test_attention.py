import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from actavatar_core.attention import (BatchRouting, FrameAudioProcessor, PACAProcessor, PhaseRouting, frame_mixtures,
                                      token_frame_index)
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
