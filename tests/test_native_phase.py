"""Phase control for native Wan models: the engine side (no ComfyUI), on random q/k/v of tiny shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actavatar_core import native_phase as N
from actavatar_core.errors import ActAvatarError, PhaseScriptError
from actavatar_core.phases import PhaseScript

FPS = 16.0
HEADS, HEAD_DIM, TPF = 2, 8, 3  # tokens per latent frame
# 9 latent frames = 33 pixel frames = 2.06 s at 16 fps; latent frame j >= 1 stands for (4j - 1.5) / 16 s.
SCRIPT = PhaseScript.from_compact("A man talks | 0-1s: waves | 1-2s: points")
# 12 text tokens: base 0-3, phase 1 4-6, phase 2 7-9, end and padding 10-11.
BLOCK_IDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0])
SPANS = N.PhaseSpans(SCRIPT, FPS, BLOCK_IDS)
ROUTED = N.PhaseControlSettings("routed")


def _attend(q, k, v):
    """ComfyUI's (B, L, H*D) attention convention, through plain SDPA."""
    qh, kh, vh = (t.unflatten(2, (HEADS, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).flatten(2)


def _qkv(batch: int, frames: int, extra: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, frames * TPF + extra, HEADS * HEAD_DIM, generator=g)
    k = torch.randn(batch, BLOCK_IDS.numel(), HEADS * HEAD_DIM, generator=g)
    v = torch.randn(batch, BLOCK_IDS.numel(), HEADS * HEAD_DIM, generator=g)
    return q, k, v


def _plan(frames: int, chunks: int = 1, specs=None, settings=ROUTED, **kw):
    """A call of ``chunks`` batch chunks u0, u1, ...; by default only u0 (the positive) carries spans."""
    uuids = [f"u{i}" for i in range(chunks)]
    specs = {"u0": SPANS} if specs is None else specs
    return N.plan_call(specs, settings, uuids=uuids, grid=(frames, 1, TPF),
                       text_len=BLOCK_IDS.numel(), **kw)


def _frames_of(phase: int, frames: int, offset: int = 0) -> set[int]:
    active = SCRIPT.active_phases(offset + frames, FPS)[offset:]
    return {j for j, a in enumerate(active) if phase in a}


def _changed_frames(a: torch.Tensor, b: torch.Tensor, frames: int, tol: float = 0.0) -> set[int]:
    diff = (a - b).abs()[0, : frames * TPF].reshape(frames, TPF, -1).amax((1, 2))
    return {j for j in range(frames) if diff[j] > tol}


def test_no_phases_or_one_phase_over_the_clip_plans_nothing():
    empty = N.PhaseSpans(PhaseScript.from_compact("A man talks"), FPS, torch.zeros(12, dtype=torch.long))
    assert N.plan_call({"u": empty}, ROUTED, uuids=["u"], grid=(9, 1, TPF), text_len=12) is None
    whole = N.PhaseSpans(PhaseScript.from_compact("A man talks | 0-2.06s: waves"), FPS,
                         torch.tensor([0] * 4 + [1] * 6 + [0] * 2))
    assert N.plan_call({"u": whole}, ROUTED, uuids=["u"], grid=(9, 1, TPF), text_len=12) is None
    assert _plan(9) is not None  # the two-phase script does route


def test_only_conditional_chunks_with_spans_are_routed():
    plan = _plan(9, chunks=2)
    assert plan.routings[0] is not None and plan.routings[1] is None
    assert _plan(9, specs={"other": SPANS}) is None  # a cond without spans
    # a negative prompt carrying spans is still not routed: the guider's negative group is left out
    conds = {"positive": [{"uuid": "p", N.PHASE_SPANS_KEY: SPANS}], "negative": [{"uuid": "n", N.PHASE_SPANS_KEY: SPANS}],
             "middle": [{"uuid": "m"}]}
    assert N.specs_from_conds(conds) == {"p": SPANS}


def test_routed_chunk_changes_only_inside_the_phase_window_and_unrouted_chunk_is_plain():
    q, k, v = _qkv(2, 9)
    plan = _plan(9, chunks=2)
    out = N.phase_cross_attention(q, k, v, HEADS, plan, _attend)
    assert torch.equal(out[1:], _attend(q[1:], k[1:], v[1:]))  # the unconditional chunk: exactly plain attention
    for phase in (1, 2):
        k2, v2 = k.clone(), v.clone()
        k2[:, BLOCK_IDS == phase] += 1.0
        v2[:, BLOCK_IDS == phase] -= 2.0
        changed = N.phase_cross_attention(q, k2, v2, HEADS, plan, _attend)
        expected = _frames_of(phase, 9)
        assert expected and expected != set(range(9))
        assert _changed_frames(out[:1], changed[:1], 9) == expected
    # the routed rows are exactly what routing computes: a frame outside both windows sees the base tokens only
    base = BLOCK_IDS == 0
    j = min(_frames_of(2, 9))  # a frame of phase 2 sees the base tokens and phase 2's
    rows = slice(j * TPF, (j + 1) * TPF)
    seen = base | (BLOCK_IDS == 2)
    ref = _attend(q[:1, rows], k[:1, seen], v[:1, seen])
    torch.testing.assert_close(out[:1, rows], ref, rtol=1e-6, atol=1e-6)


def test_tokens_after_the_clip_frames_attend_to_everything():
    q, k, v = _qkv(1, 9, extra=5)
    out = N.phase_cross_attention(q, k, v, HEADS, _plan(9), _attend)
    assert out.shape == q.shape
    assert torch.equal(out[:, 9 * TPF:], _attend(q[:, 9 * TPF:], k, v))


def test_context_window_routes_by_absolute_frame():
    q, k, v = _qkv(1, 9)
    full = N.phase_cross_attention(q, k, v, HEADS, _plan(9), _attend)
    window = [4, 5, 6, 7, 8]  # starts at latent frame 4 (t = 0.91 s); phase 1 ends at 1 s, inside frame 4 only
    qw = q[:, 4 * TPF:]
    plan = _plan(5, window_indices=window)
    out = N.phase_cross_attention(qw, k, v, HEADS, plan, _attend)
    torch.testing.assert_close(out, full[:, 4 * TPF:], rtol=1e-6, atol=1e-6)
    local = N.phase_cross_attention(qw, k, v, HEADS, _plan(5), _attend)  # what routing by local frame would give
    assert not torch.allclose(local, out)
    # a causal anchor frame before the window is the clip's frame 3
    plan = _plan(6, window_indices=window, anchor_index=3)
    out = N.phase_cross_attention(q[:, 3 * TPF:], k, v, HEADS, plan, _attend)
    torch.testing.assert_close(out, full[:, 3 * TPF:], rtol=1e-6, atol=1e-6)


def test_clip_frame_indices():
    assert N.clip_frame_indices(3) == [0, 1, 2]
    assert N.clip_frame_indices(4, [7, 8, 9]) == [7, 8, 9, None]
    assert N.clip_frame_indices(3, [7, 8, 9], anchor_index=6) == [6, 7, 8]


def test_feathered_blends_at_the_boundary_only():
    q, k, v = _qkv(1, 9)
    hard = N.phase_cross_attention(q, k, v, HEADS, _plan(9), _attend)
    soft = N.phase_cross_attention(q, k, v, HEADS, _plan(9, settings=N.PhaseControlSettings("feathered", 2.0)), _attend)
    differs = _changed_frames(hard, soft, 9, tol=1e-5)  # runs split differently: last-bit noise elsewhere
    # the 1 s boundary lies between latent frames 4 (0.91 s) and 5 (1.16 s): a 2-frame ramp touches only those
    assert differs == {4, 5}


def test_checks_before_sampling():
    with pytest.raises(ActAvatarError, match="no conditioning carries phase spans.*Fix:"):
        N.check_before_sampling({}, 9)
    N.check_before_sampling({"u": SPANS}, 9)
    with pytest.raises(PhaseScriptError, match="ends after the clip"):
        N.check_before_sampling({"u": SPANS}, 5)  # 17 frames = 1.06 s, phase 2 ends at 2 s
    with pytest.raises(ActAvatarError, match="Fix:"):
        N.PhaseControlSettings("sideways")
    with pytest.raises(ActAvatarError, match="ramp"):
        N.PhaseControlSettings("feathered", 0.0)


def test_text_length_mismatch_is_refused_and_repetition_is_followed():
    with pytest.raises(ActAvatarError, match="text context has 13 tokens"):
        N.plan_call({"u": SPANS}, ROUTED, uuids=["u"], grid=(9, 1, TPF), text_len=13)
    # ComfyUI repeats a shorter context to batch it with a longer one: attention over repeated keys is unchanged
    q, k, v = _qkv(1, 9)
    plan = N.plan_call({"u": SPANS}, ROUTED, uuids=["u"], grid=(9, 1, TPF), text_len=24)
    out = N.phase_cross_attention(q, k.repeat(1, 2, 1), v.repeat(1, 2, 1), HEADS, plan, _attend)
    torch.testing.assert_close(out, N.phase_cross_attention(q, k, v, HEADS, _plan(9), _attend), rtol=1e-6, atol=1e-6)


def test_token_spans():
    assert SPANS.token_spans() == [(4, 7), (7, 10)]


def test_relay_limits_and_windows_measured_on_the_whole_clip():
    q, k, v = _qkv(1, 9)
    routed = N.phase_cross_attention(q, k, v, HEADS, _plan(9), _attend)
    narrow = N.phase_cross_attention(q, k, v, HEADS, _plan(9, settings=N.PhaseControlSettings("relay", relay_width=1e-3)), _attend)
    torch.testing.assert_close(narrow, routed, rtol=1e-5, atol=1e-5)
    wide = N.phase_cross_attention(q, k, v, HEADS, _plan(9, settings=N.PhaseControlSettings("relay", relay_width=1e6)), _attend)
    torch.testing.assert_close(wide, _attend(q, k, v), rtol=1e-5, atol=1e-5)
    relay = N.PhaseControlSettings("relay", relay_width=2.0)
    full = N.phase_cross_attention(q, k, v, HEADS, _plan(9, settings=relay), _attend)
    assert (full - routed).abs().max() > 1e-3 and (full - _attend(q, k, v)).abs().max() > 1e-3
    # a window of frames 0-4: phase 2 starts at frame 5, outside it; its distance still counts from the clip
    head = _plan(5, settings=relay, window_indices=[0, 1, 2, 3, 4], sampled_frames=9)
    out = N.phase_cross_attention(q[:, : 5 * TPF], k, v, HEADS, head, _attend)
    torch.testing.assert_close(out, full[:, : 5 * TPF], rtol=1e-6, atol=1e-6)
    blind = _plan(5, settings=relay, window_indices=[0, 1, 2, 3, 4])  # without the clip length: phase 2 is nowhere
    assert not torch.allclose(N.phase_cross_attention(q[:, : 5 * TPF], k, v, HEADS, blind, _attend), out)
    with pytest.raises(ActAvatarError, match="width above 0"):
        N.PhaseControlSettings("relay", relay_width=0.0)


def test_an_extension_routes_by_its_start_in_the_clip():
    q, k, v = _qkv(1, 9)
    full = N.phase_cross_attention(q, k, v, HEADS, _plan(9), _attend)
    later = N.PhaseControlSettings("routed", start_seconds=1.0)  # 16 video frames = 4 latent frames into the clip
    out = N.phase_cross_attention(q[:, 4 * TPF:], k, v, HEADS, _plan(5, settings=later), _attend)
    torch.testing.assert_close(out, full[:, 4 * TPF:], rtol=1e-6, atol=1e-6)
    # the clip's length: this sampling's end, or clip_seconds when the script runs past it
    N.check_before_sampling({"u": SPANS}, 5, later)
    with pytest.raises(PhaseScriptError, match="ends after the clip"):
        N.check_before_sampling({"u": SPANS}, 5, N.PhaseControlSettings("routed"))
    N.check_before_sampling({"u": SPANS}, 5, N.PhaseControlSettings("routed", clip_seconds=2.06))
    with pytest.raises(ActAvatarError, match="start_seconds must be 0 or more"):
        N.PhaseControlSettings("routed", start_seconds=-1.0)


def test_phase_guidance_base_pass_hides_every_phase_in_every_mode():
    q, k, v = _qkv(1, 9)
    base = BLOCK_IDS == 0
    for settings in (ROUTED, N.PhaseControlSettings("relay", relay_width=3.0)):
        plan = _plan(9, specs={"u0": SPANS.hidden()}, settings=settings)
        out = N.phase_cross_attention(q, k, v, HEADS, plan, _attend)
        torch.testing.assert_close(out, _attend(q, k[:, base], v[:, base]), rtol=1e-6, atol=1e-6)
    full = torch.ones(9 * TPF, 4)
    torch.testing.assert_close(N.phase_guidance(full, full * 3, full * 2, 0.5), full * 1.5)


@pytest.mark.parametrize("mode", ["routed", "feathered", "relay"])
def test_routed_attention_calls_go_through_a_given_attention_function(mode):
    """attend_heads (the framework's attention on (B, S, H, D), mask None / boolean / additive) takes every attention
    call of the routed chunks; the result matches the engine's own dispatcher."""
    q, k, v = _qkv(2, 9)
    plan = _plan(9, chunks=2, settings=N.PhaseControlSettings(mode, 2.0, 1.5))
    masks: list = []

    def sdpa(q_, k_, v_, mask):
        masks.append(None if mask is None else mask.dtype)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q_.dtype).masked_fill_(~mask, -torch.inf)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_, k_, v_)), attn_mask=mask).transpose(1, 2)

    expected = N.phase_cross_attention(q, k, v, HEADS, plan, _attend)
    got = N.phase_cross_attention(q, k, v, HEADS, plan, _attend, sdpa)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert masks and (set(masks) == {torch.float32} if mode == "relay" else set(masks) == {None})
