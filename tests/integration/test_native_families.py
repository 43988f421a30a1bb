"""Phase Control on two more of ComfyUI 0.33's Wan families, built tiny from ComfyUI's own classes.

* InfiniteTalk: a Wan2.1 I2V model with core's InfiniteTalk model patch applied as ``WanInfiniteTalkToVideo`` applies
  it (``MultiTalkModelPatch`` with its audio projection, ``MultiTalkCrossAttnPatch`` as the ``attn2_patch`` after the
  text cross-attention, ``InfiniteTalkOuterSampleWrapper`` keeping the motion frame); Phase Control composes with it.
* Wan2.2 A14B: the high-noise and the low-noise expert, each patched, sampled in turn as the two KSamplerAdvanced of
  core's A14B workflow do.

One transformer block, so a video token depends on the text only through its own cross-attention: "phase k's tokens
change exactly the frames of k's window" is exact for one Euler step (see test_native_phase_comfy.py).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_native_phase_comfy import (  # noqa: E402  (the module skips itself without COMFYUI_DIR)
    BLOCK_IDS, FPS, FRAMES, SPANS, _changed_frames, _inputs, _phased, _sample, _tiny_from_class, _window_frames, comfy)
from actavatar_core import native_phase as N  # noqa: E402
from actavatar_core.phases import PhaseScript  # noqa: E402

pytestmark = pytest.mark.integration

NO_PHASES = N.PhaseSpans(PhaseScript.from_compact("A man talks"), FPS, torch.zeros_like(BLOCK_IDS))
__all__ = ["comfy"]  # the fixture, imported for pytest


def _moved(ctx: torch.Tensor, phase: int) -> torch.Tensor:
    other = ctx.clone()
    other[:, BLOCK_IDS == phase] += 0.5
    return other


# ================================================================================================ InfiniteTalk
@pytest.fixture(scope="module")
def infinitetalk(comfy):
    """(model with core's InfiniteTalk patches, the same model without them, the patch's pieces)."""
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    from comfy.ldm.wan.model_multitalk import (InfiniteTalkOuterSampleWrapper, MultiTalkCrossAttnPatch,
                                               project_audio_features)
    from comfy.patcher_extension import WrappersMP
    from comfy_extras.nodes_model_patch import MultiTalkModelPatch

    # dim 320: InfiniteTalk's audio attention has 40 heads; Wan's own 2 heads of 160
    base = _tiny_from_class(comfy, WanModel, 21, model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=320,
                            ffn_dim=128, freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=1)
    torch.manual_seed(22)
    patch_net = MultiTalkModelPatch(in_dim=320, out_dim=32, intermediate_dim=32, num_layers=1,
                                    operations=comfy.ops.manual_cast)
    with torch.no_grad():
        for p in patch_net.parameters():
            p.copy_(torch.randn_like(p) / max(1.0, p.shape[-1] ** 0.5))
    model_patch = comfy.model_patcher.ModelPatcher(patch_net, torch.device("cpu"), torch.device("cpu"))

    def patched_with(encoded_audio: torch.Tensor):
        m = base.clone()
        embeds = project_audio_features(patch_net.audio_proj, [encoded_audio], 0, 4 * (FRAMES - 1) + 1)
        m.model_options["transformer_options"]["audio_embeds"] = embeds.to(torch.float32)
        g = torch.Generator().manual_seed(23)
        m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "infinite_talk_outer_sample",
                               InfiniteTalkOuterSampleWrapper(torch.randn(1, 16, 1, 4, 4, generator=g), model_patch))
        m.set_model_patch(MultiTalkCrossAttnPatch(model_patch, 1.0), "attn2_patch")
        return m

    audio = torch.randn(4 * (FRAMES - 1) + 1, 12, 768, generator=torch.Generator().manual_seed(24))
    vision = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280,
                                                                         generator=torch.Generator().manual_seed(25)))
    return types.SimpleNamespace(base=base, talk=patched_with(audio), other_audio=patched_with(audio + 1.0),
                                 vision=vision)


def _i2v_conds(it, ctx, neg, spans=None):
    extra = {"clip_vision_output": it.vision}
    pos = [[ctx, {**extra, N.PHASE_SPANS_KEY: spans}]] if spans is not None else [[ctx, dict(extra)]]
    return pos, [[neg, dict(extra)]]


def _it_sample(comfy, m, pos, negative, noise):
    """cfg 1 (core then runs no unconditional pass): InfiniteTalk's audio embeds are per latent frame of one chunk."""
    return _sample(comfy, m, pos, negative, noise, cfg=1.0)


def test_infinitetalk_patch_and_phase_control_compose(comfy, infinitetalk):
    it = infinitetalk
    ctx, neg, _ = _inputs()
    noise = torch.randn(1, 16, FRAMES, 4, 4, generator=torch.Generator().manual_seed(26))
    talk = _it_sample(comfy, it.talk, *_i2v_conds(it, ctx, neg), noise)
    assert not torch.equal(talk, _it_sample(comfy, it.base, *_i2v_conds(it, ctx, neg), noise))  # the audio acts
    phased = comfy.node.apply_phase_control(it.talk, "routed")
    # no phases: InfiniteTalk's own result, bit for bit
    assert torch.equal(_it_sample(comfy, phased, *_i2v_conds(it, ctx, neg, NO_PHASES), noise), talk)
    base = _it_sample(comfy, phased, *_i2v_conds(it, ctx, neg, SPANS), noise)
    assert not torch.equal(base, talk)
    # with phases: phase k's tokens change exactly the frames of k's window
    for phase in (1, 2):
        got = _it_sample(comfy, phased, *_i2v_conds(it, _moved(ctx, phase), neg, SPANS), noise)
        assert _changed_frames(base, got) == _window_frames(phase)
    # and InfiniteTalk's audio attention still runs on the routed pass (after the routed text cross-attention)
    other = comfy.node.apply_phase_control(it.other_audio, "routed")
    assert _changed_frames(base, _it_sample(comfy, other, *_i2v_conds(it, ctx, neg, SPANS), noise)) == set(range(FRAMES))


def test_core_infinitetalk_takes_one_pass_per_call_so_the_workflow_runs_cfg_1(comfy, infinitetalk):
    """Core's InfiniteTalk patch (0.33) fails on a batched cond + uncond call (its audio embeds are for one pass),
    with or without Phase Control: why the shipped InfiniteTalk workflow runs CFG 1 without phase guidance. When a
    ComfyUI fixes this, this test fails: then raise the workflow's cfg."""
    it = infinitetalk
    ctx, neg, _ = _inputs()
    noise = torch.randn(1, 16, FRAMES, 4, 4, generator=torch.Generator().manual_seed(27))
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        _sample(comfy, it.talk, *_i2v_conds(it, ctx, neg), noise, cfg=4.0)


# ================================================================================================ Wan2.2 A14B
@pytest.fixture(scope="module")
def a14b(comfy):
    """The two experts of a tiny Wan2.2 T2V A14B pair (same architecture, different weights)."""
    from comfy.ldm.wan.model import WanModel

    kw = dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=128, freq_dim=256, text_dim=4096,
              out_dim=16, num_heads=2, num_layers=1)
    return _tiny_from_class(comfy, WanModel, 31, **kw), _tiny_from_class(comfy, WanModel, 32, **kw)


def _advanced(comfy, m, positive, negative, noise, latent, start: int, last: int, steps: int = 2):
    """core's KSamplerAdvanced for one expert: steps [start, last) of a shared schedule, noise added only first."""
    return comfy.sample.sample(m, noise, steps, 4.0, "euler", "simple", positive, negative, latent, start_step=start,
                               last_step=last, force_full_denoise=last >= steps, disable_noise=start > 0, seed=0,
                               disable_pbar=True)


def test_both_a14b_experts_are_patched_and_route_by_time(comfy, a14b):
    high, low = a14b
    ctx, neg, _ = _inputs()
    noise = torch.randn(1, 16, FRAMES, 4, 4, generator=torch.Generator().manual_seed(33))
    zero = torch.zeros_like(noise)
    phased = [comfy.node.apply_phase_control(m, "routed") for m in (high, low)]
    for plain, patched in zip((high, low), phased):
        assert patched.get_wrappers("outer_sample", comfy.node.WRAPPER_KEY)
        assert isinstance(patched.object_patches["diffusion_model.blocks.0.cross_attn.forward"],
                          comfy.node.PhasedCrossAttention)
        one = _sample(comfy, plain, [[ctx, {}]], [[neg, {}]], noise)
        assert torch.equal(_sample(comfy, patched, _phased(ctx, NO_PHASES), [[neg, {}]], noise), one)
        base = _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise)
        for phase in (1, 2):
            got = _sample(comfy, patched, _phased(_moved(ctx, phase)), [[neg, {}]], noise)
            assert _changed_frames(base, got) == _window_frames(phase)
    # the pair as core's A14B workflow runs it: the high expert's first step, the low expert's last one
    def pair(models, spans):
        pos = [[ctx, {N.PHASE_SPANS_KEY: spans}]] if spans is not None else [[ctx, {}]]
        mid = _advanced(comfy, models[0], pos, [[neg, {}]], noise, zero, 0, 1)
        return _advanced(comfy, models[1], pos, [[neg, {}]], noise, mid, 1, 2)

    plain = pair((high, low), None)
    assert torch.equal(pair(phased, NO_PHASES), plain)
    routed = pair(phased, SPANS)
    only_high = pair((phased[0], low), SPANS)
    assert not torch.equal(routed, plain) and not torch.equal(routed, only_high)  # the low expert routes too
