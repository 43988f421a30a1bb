"""ActAvatar Phase Control on ComfyUI's own Wan model (ComfyUI 0.33.0 at ``COMFYUI_DIR``), through core's sampler.

A tiny Wan2.2 TI2V file (written like the parity tests' files) loads through core's ``load_diffusion_model``; the
node's function patches a clone and ``comfy.sample.sample`` runs it. With one transformer block, a video token's
output depends on the text only through its own cross-attention (self-attention runs before it, FFN and head are
per token), so "phase k's tokens change exactly the frames of k's window" is an exact property of one Euler step.

ComfyUI is imported in-process with the preamble of infra.md section 4. The pack's ``nodes`` package would clash
with ComfyUI's ``nodes`` module, so the node module is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # community_checkpoints

import community_checkpoints as cc  # noqa: E402
from actavatar_core import native_phase as N  # noqa: E402
from actavatar_core.errors import ActAvatarError, PhaseScriptError  # noqa: E402
from actavatar_core.phases import PhaseScript  # noqa: E402

pytestmark = pytest.mark.integration

COMFY_DIR = os.environ.get("COMFYUI_DIR", "")
if not COMFY_DIR:
    pytest.skip("COMFYUI_DIR is not set: point it at a copy of ComfyUI 0.33.0 (e.g. COMFYUI_DIR=/tmp/comfy) to run "
                "the native phase control tests", allow_module_level=True)
if not (Path(COMFY_DIR) / "comfy" / "ldm" / "wan" / "model.py").is_file():
    pytest.skip(f"COMFYUI_DIR={COMFY_DIR!r} is not a ComfyUI checkout (no comfy/ldm/wan/model.py)",
                allow_module_level=True)

torch.set_num_threads(min(2, torch.get_num_threads()))
FPS = 16.0
FRAMES = 9  # latent frames: 33 video frames, 2.06 s at 16 fps
SCRIPT = PhaseScript.from_compact("A man talks | 0-1s: waves | 1-2s: points")
BLOCK_IDS = torch.tensor([0] * 6 + [1] * 4 + [2] * 4 + [0] * 2)
SPANS = N.PhaseSpans(SCRIPT, FPS, BLOCK_IDS)


@pytest.fixture(scope="module")
def comfy():
    pytest.importorskip("einops", reason="ComfyUI's requirements are not installed in this environment")
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    if COMFY_DIR not in sys.path:
        sys.path.append(COMFY_DIR)
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # another test module may have imported comfy_api (and the args) first
        import comfy.model_management  # noqa: F401 - CPU before anything else touches devices
        import comfy.model_patcher
        import comfy.sample
        import comfy.sd
        from comfy_extras.nodes_context_windows import WanContextWindowsManualNode
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {COMFY_DIR} could not be imported ({exc}); install its requirements.txt")
    finally:
        sys.argv = argv
    spec = importlib.util.spec_from_file_location("actavatar_native_phase_nodes", ROOT / "nodes" / "native_phase.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    return types.SimpleNamespace(sd=comfy.sd, sample=comfy.sample, model_patcher=comfy.model_patcher, node=node,
                                 windows=WanContextWindowsManualNode)


@pytest.fixture(scope="module")
def model(comfy, tmp_path_factory):
    """Core's ModelPatcher of a tiny one-block Wan2.2 TI2V model (UNETLoader's detection, fp32)."""
    path = tmp_path_factory.mktemp("wan") / "wan2.2_ti2v_5B_fp16.safetensors"
    cc.write_comfy_wan_transformer(path, prefix=True, text_dim=4096, num_layers=1, dtype=torch.float32)
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    assert type(patcher.model).__name__ == "WAN22"
    return patcher


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, BLOCK_IDS.numel(), 4096, generator=g)
    ctx[:, 14:] = 0  # padding is zeroed, as umT5's conditioning is
    neg = torch.randn(1, BLOCK_IDS.numel(), 4096, generator=g)
    noise = torch.randn(1, 48, FRAMES, 4, 4, generator=g)
    return ctx, neg, noise


def _sample(comfy, m, positive, negative, noise, steps: int = 1, cfg: float = 4.0):
    return comfy.sample.sample(m, noise, steps, cfg, "euler", "simple", positive, negative, torch.zeros_like(noise),
                               seed=0, disable_pbar=True)


def _phased(ctx, spans=SPANS):
    return [[ctx, {N.PHASE_SPANS_KEY: spans}]]


def _changed_frames(a, b) -> set[int]:
    diff = (a - b).abs().amax(dim=(0, 1, 3, 4))
    return {j for j in range(diff.numel()) if diff[j] > 0}


def _window_frames(phase: int) -> set[int]:
    return {j for j, a in enumerate(SCRIPT.active_phases(FRAMES, FPS)) if phase in a}


@pytest.mark.parametrize("mode", ["routed", "relay"])
def test_no_phases_or_one_whole_clip_phase_equals_the_unpatched_model_bit_for_bit(comfy, model, mode):
    ctx, neg, noise = _inputs()
    plain = _sample(comfy, model, [[ctx, {}]], [[neg, {}]], noise, steps=2)
    patched = comfy.node.apply_phase_control(model, mode)
    none = N.PhaseSpans(PhaseScript.from_compact("A man talks"), FPS, torch.zeros_like(BLOCK_IDS))
    whole = N.PhaseSpans(PhaseScript.from_compact("A man talks | 0-2.06s: waves"), FPS, (BLOCK_IDS > 0).long())
    for spans in (none, whole):
        assert torch.equal(_sample(comfy, patched, _phased(ctx, spans), [[neg, {}]], noise, steps=2), plain)
    routed = _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise, steps=2)
    assert (routed - plain).abs().max() > 1e-3  # the two-phase script does change the result
    # the loaded model was never changed: the unpatched model gives the same result after the patched one ran
    assert torch.equal(_sample(comfy, model, [[ctx, {}]], [[neg, {}]], noise, steps=2), plain)
    assert "forward" not in vars(model.model.diffusion_model.blocks[0].cross_attn) or \
        not isinstance(vars(model.model.diffusion_model.blocks[0].cross_attn)["forward"], comfy.node.PhasedCrossAttention)


@pytest.mark.parametrize("mode", ["routed", "feathered"])
def test_phase_tokens_change_only_the_frames_of_their_window(comfy, model, mode):
    ctx, neg, noise = _inputs()
    patched = comfy.node.apply_phase_control(model, mode, 1.0)
    base = _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise)
    for phase in (1, 2):
        other = ctx.clone()
        other[:, BLOCK_IDS == phase] += 0.5
        changed = _changed_frames(base, _sample(comfy, patched, _phased(other), [[neg, {}]], noise))
        window = _window_frames(phase)
        if mode == "routed":
            assert changed == window
        else:  # a 1-frame ramp reaches one frame past each boundary inside the clip
            assert window <= changed and len(changed - window) <= 1


def test_relay_mode_is_soft_and_narrows_to_routed(comfy, model):
    ctx, neg, noise = _inputs()
    routed = _sample(comfy, comfy.node.apply_phase_control(model, "routed"), _phased(ctx), [[neg, {}]], noise)
    relay = comfy.node.apply_phase_control(model, "relay", relay_width=1.0)
    base = _sample(comfy, relay, _phased(ctx), [[neg, {}]], noise)
    assert (base - routed).abs().max() > 1e-4
    other = ctx.clone()
    other[:, BLOCK_IDS == 2] += 0.5
    changed = (_sample(comfy, relay, _phased(other), [[neg, {}]], noise) - base).abs().amax(dim=(0, 1, 3, 4))
    inside = sorted(_window_frames(2))
    assert inside == [5, 6, 7, 8]
    assert bool((changed > 0).all())  # soft: every frame feels phase 2's tokens
    assert changed[:3].max() < 0.2 * changed[inside].min()  # 3+ latent frames away: logits down by 4.5 or more
    narrow = comfy.node.apply_phase_control(model, "relay", relay_width=0.05)
    torch.testing.assert_close(_sample(comfy, narrow, _phased(ctx), [[neg, {}]], noise), routed, rtol=1e-4, atol=1e-4)


def test_the_unconditional_pass_is_untouched(comfy, model):
    ctx, neg, noise = _inputs()
    seen: dict[str, dict[int, torch.Tensor]] = {}

    def recorder(name):
        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            for chunk, kind in zip(out.chunk(len(args["cond_or_uncond"])), args["cond_or_uncond"]):
                seen[name].setdefault(kind, chunk.clone())
            return out
        seen[name] = {}
        return wrapper

    plain = model.clone()
    plain.set_model_unet_function_wrapper(recorder("plain"))
    patched = comfy.node.apply_phase_control(model, "routed")
    patched.set_model_unet_function_wrapper(recorder("patched"))
    _sample(comfy, plain, [[ctx, {}]], [[neg, {}]], noise)
    _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise)
    assert set(seen["patched"]) == {0, 1}  # cond and uncond ran
    assert torch.equal(seen["patched"][1], seen["plain"][1])
    assert not torch.equal(seen["patched"][0], seen["plain"][0])


def test_context_windows_route_by_the_clips_absolute_time(comfy, model):
    ctx, neg, noise = _inputs()
    patched = comfy.node.apply_phase_control(model, "routed")
    # windows of 5 latent frames (17 video frames) overlapping by 2: the later windows start inside the clip
    (windowed,) = comfy.windows.execute(patched, 17, 8, "standard_static", 1, False, "pyramid", False).args
    base = _sample(comfy, windowed, _phased(ctx), [[neg, {}]], noise)
    assert not torch.equal(base, _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise))  # windows did run
    for phase in (1, 2):
        other = ctx.clone()
        other[:, BLOCK_IDS == phase] += 0.5
        assert _changed_frames(base, _sample(comfy, windowed, _phased(other), [[neg, {}]], noise)) == _window_frames(phase)


def test_composes_with_an_attn2_patch_and_lora_weight_patches(comfy, model):
    ctx, neg, noise = _inputs()

    def attn2_patch(kwargs):  # InfiniteTalk adds its audio attention the same way, after the text cross-attention
        return kwargs["x"] * 1.5

    plain = model.clone()
    plain.set_model_patch(attn2_patch, "attn2_patch")
    patched = comfy.node.apply_phase_control(plain, "routed")
    none = N.PhaseSpans(PhaseScript.from_compact("A man talks"), FPS, torch.zeros_like(BLOCK_IDS))
    with_patch = _sample(comfy, plain, [[ctx, {}]], [[neg, {}]], noise)
    assert not torch.equal(with_patch, _sample(comfy, model, [[ctx, {}]], [[neg, {}]], noise))
    assert torch.equal(_sample(comfy, patched, _phased(ctx, none), [[neg, {}]], noise), with_patch)
    # a LoRA-style weight patch on the text key projection reaches the routed path
    routed = _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise)
    lora = patched.clone()
    weight = model.model.diffusion_model.blocks[0].cross_attn.k.weight
    lora.add_patches({"diffusion_model.blocks.0.cross_attn.k.weight": (torch.randn_like(weight) * 0.1,)}, 1.0)
    assert not torch.equal(_sample(comfy, lora, _phased(ctx), [[neg, {}]], noise), routed)
    assert torch.equal(_sample(comfy, patched, _phased(ctx), [[neg, {}]], noise), routed)  # and went away again


def test_bad_input_is_refused_with_a_fix(comfy, model):
    ctx, neg, noise = _inputs()
    patched = comfy.node.apply_phase_control(model, "routed")
    with pytest.raises(ActAvatarError, match="no conditioning carries phase spans.*Fix:"):
        _sample(comfy, patched, [[ctx, {}]], [[neg, {}]], noise)
    with pytest.raises(PhaseScriptError, match="ends after the clip"):
        _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise[:, :, :5])
    with pytest.raises(ActAvatarError, match="already has ActAvatar Phase Control"):
        comfy.node.apply_phase_control(patched, "routed")
    foreign = model.clone()
    foreign.add_object_patch("diffusion_model.blocks.0.cross_attn.forward", lambda *a, **k: None)
    with pytest.raises(ActAvatarError, match="Another node already replaced the text cross-attention of block 0"):
        comfy.node.apply_phase_control(foreign, "routed")
    other = comfy.model_patcher.ModelPatcher(types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)),
                                             torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ActAvatarError, match="works on ComfyUI's Wan models; this model is a Linear"):
        comfy.node.apply_phase_control(other, "routed")


@pytest.fixture(scope="module")
def i2v_model(comfy):
    """Core's ModelPatcher of a tiny one-block Wan2.1 I2V model (CLIP-vision image branch), built from ComfyUI's class."""
    from comfy.ldm.wan.model import WanModel
    import comfy.ops

    g = torch.Generator().manual_seed(3)
    net = WanModel(model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=256, ffn_dim=128, freq_dim=256,
                   text_dim=4096, out_dim=16, num_heads=2, num_layers=1, operations=comfy.ops.disable_weight_init,
                   dtype=torch.float32)
    sd = {}
    for key, value in net.state_dict().items():
        if key.endswith("modulation"):
            sd[key] = torch.randn(value.shape, generator=g) / 16
        elif ".norm" in key and key.endswith(".weight"):
            sd[key] = 1 + 0.1 * torch.randn(value.shape, generator=g)
        else:
            sd[key] = torch.randn(value.shape, generator=g) / max(1.0, value.shape[-1] ** 0.5)
    patcher = comfy.sd.load_diffusion_model_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()},
                                                       model_options={"dtype": torch.float32})
    assert type(patcher.model.diffusion_model.blocks[0].cross_attn).__name__ == "WanI2VCrossAttention"
    return patcher


def test_i2v_image_branch_is_kept_and_text_is_routed(comfy, i2v_model):
    ctx, neg, _ = _inputs()
    noise = torch.randn(1, 16, FRAMES, 4, 4, generator=torch.Generator().manual_seed(5))
    vision = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(6)))

    def pos(c, spans=None):
        extra = {"clip_vision_output": vision}
        return [[c, {**extra, N.PHASE_SPANS_KEY: spans}]] if spans is not None else [[c, extra]]

    negative = [[neg, {"clip_vision_output": vision}]]
    plain = _sample(comfy, i2v_model, pos(ctx), negative, noise)
    patched = comfy.node.apply_phase_control(i2v_model, "routed")
    none = N.PhaseSpans(PhaseScript.from_compact("A man talks"), FPS, torch.zeros_like(BLOCK_IDS))
    assert torch.equal(_sample(comfy, patched, pos(ctx, none), negative, noise), plain)
    base = _sample(comfy, patched, pos(ctx, SPANS), negative, noise)
    assert not torch.equal(base, plain)
    for phase in (1, 2):
        other = ctx.clone()
        other[:, BLOCK_IDS == phase] += 0.5
        assert _changed_frames(base, _sample(comfy, patched, pos(other, SPANS), negative, noise)) == _window_frames(phase)
    # the image branch still reaches every frame of the routed pass
    other_vision = types.SimpleNamespace(penultimate_hidden_states=vision.penultimate_hidden_states + 0.5)
    changed = _sample(comfy, patched, [[ctx, {"clip_vision_output": other_vision, N.PHASE_SPANS_KEY: SPANS}]],
                      negative, noise)
    assert _changed_frames(base, changed) == set(range(FRAMES))


# ================================================================================================ text encoding
@pytest.fixture(scope="module")
def tiny_clip(comfy, tmp_path_factory):
    """Core's CLIP object (comfy.sd.CLIP) with Wan's tokenizer class and a tiny umT5 (4096 wide, as Wan reads it)
    built from ComfyUI's T5 class through the config hook of SDClipModel; weights from a tiny umt5 file."""
    import comfy.sd1_clip
    import comfy.text_encoders.t5
    import comfy.text_encoders.wan as wan_te
    import comfy.utils

    w = cc.write_comfy_umt5(tmp_path_factory.mktemp("te") / "umt5_xxl_fp16.safetensors", dtype=torch.float32,
                            d_model=4096, num_layers=1)
    c = w.config
    config = dict(d_ff=c["d_ff"], d_kv=c["d_kv"], d_model=c["d_model"], num_heads=c["num_heads"],
                  num_layers=c["num_layers"], vocab_size=c["vocab_size"], dense_act_fn="gelu_pytorch_tanh",
                  is_gated_act=True, model_type="umt5", layer_norm_epsilon=1e-6, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128)

    class TinyUMT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=config,
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyWanTE(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="umt5xxl",
                             clip_model=TinyUMT5)

    sd = comfy.utils.load_torch_file(str(w.path))
    spm = sd.pop("spiece_model")
    target = types.SimpleNamespace(clip=TinyWanTE, tokenizer=wan_te.WanT5Tokenizer, params={})
    clip = comfy.sd.CLIP(target=target, tokenizer_data={"spiece_model": spm}, model_options={"dtype": torch.float32})
    missing, unexpected = clip.load_sd(sd)
    assert not unexpected
    return types.SimpleNamespace(clip=clip, file=w.path)


def test_phase_text_encode_keeps_exact_block_spans_and_matches_the_engine_encoder(comfy, tiny_clip):
    from actavatar_core import loading as L
    from actavatar_core.text import encode_script, phase_block_text

    script = PhaseScript.from_compact("A man talks to the camera | 0-1s: raises his left hand | 1-2s: points down")
    prompt = types.SimpleNamespace(script=script, fps=FPS)
    positive, negative = comfy.node.encode_phase_prompt(tiny_clip.clip, prompt)
    (cond, extra), = positive
    spans = extra[N.PHASE_SPANS_KEY]
    assert cond.shape[1] == spans.block_ids.numel() == 512
    # each phase's span holds exactly the tokens of its own block text
    sp = tiny_clip.clip.tokenizer.clip_umt5xxl.tokenizer.tokenizer
    ids = [t for t, _ in tiny_clip.clip.tokenize("x")["umt5xxl"][0]]  # core's own tokenizer runs on this CLIP
    assert ids[-1] == 0 and 1 in ids
    for k, phase in enumerate(script.phases, start=1):
        first, end = spans.token_spans()[k - 1]
        assert end - first == len(sp.encode(phase_block_text(k, phase), add_bos=False, add_eos=False))
    # the same tokens through the engine's own umT5 (transformers) give the same hidden states
    ours, tok = L.load_umt5(tiny_clip.file, dtype=torch.float32)
    ref = encode_script(ours, tok, script, dtype=torch.float32)
    assert torch.equal(ref.block_ids.reshape(-1), spans.block_ids)
    torch.testing.assert_close(cond[0, : ref.length].float(), ref.embeds[0, : ref.length], rtol=1e-4, atol=1e-4)
    assert cond[0, ref.length:].abs().max() == 0  # zero past the prompt, as Wan reads it
    (neg_cond, neg_extra), = negative
    assert N.PHASE_SPANS_KEY not in neg_extra and neg_cond.shape == cond.shape


def test_encoded_phase_conditioning_drives_phase_control_through_core_sampling(comfy, tiny_clip, model):
    script = PhaseScript.from_compact("A man talks | 0-1s: raises his left hand | 1-2s: points down")
    positive, negative = comfy.node.encode_phase_prompt(tiny_clip.clip, types.SimpleNamespace(script=script, fps=FPS))
    noise = _inputs()[2]
    plain = _sample(comfy, model, positive, negative, noise)  # core's sampler takes it as a normal conditioning
    routed = _sample(comfy, comfy.node.apply_phase_control(model, "routed"), positive, negative, noise)
    assert plain.shape == routed.shape and not torch.equal(plain, routed)
    # one phase over the whole clip, encoded the same way: the patched model is the plain one, bit for bit
    whole = PhaseScript.from_compact("A man talks | 0-2.06s: raises his left hand")
    positive, negative = comfy.node.encode_phase_prompt(tiny_clip.clip, types.SimpleNamespace(script=whole, fps=FPS))
    assert positive[0][1][N.PHASE_SPANS_KEY].num_phases == 1
    assert torch.equal(_sample(comfy, comfy.node.apply_phase_control(model, "routed"), positive, negative, noise),
                       _sample(comfy, model, positive, negative, noise))


def test_phase_text_encode_refuses_bad_input(comfy, tiny_clip):
    long_text = "waves the left hand high above the head and then slowly lowers it down again " * 3
    script = PhaseScript.from_json({"version": 1, "base": "A man talks",
                                    "phases": [{"start": i * 0.25, "end": (i + 1) * 0.25, "text": long_text[:290]}
                                               for i in range(8)]})
    with pytest.raises(PhaseScriptError, match="tokens long.*Fix:"):
        comfy.node.encode_phase_prompt(tiny_clip.clip, types.SimpleNamespace(script=script, fps=FPS))
    with pytest.raises(ActAvatarError, match="not Wan's umT5.*CLIPLoader"):
        comfy.node.encode_phase_prompt(types.SimpleNamespace(tokenizer=None),
                                       types.SimpleNamespace(script=SCRIPT, fps=FPS))


def test_an_extension_routes_by_its_start_second(comfy, model):
    """A sampling that continues a clip (S2V Extend, InfiniteTalk's next chunk) routes by the clip's time: the
    extension's frames 0-4 starting at 1 s are the clip's latent frames 4-8."""
    ctx, neg, noise = _inputs()
    later = comfy.node.apply_phase_control(model, "routed", start_seconds=1.0)
    base = _sample(comfy, later, _phased(ctx), [[neg, {}]], noise[:, :, :5])
    for phase in (1, 2):
        other = ctx.clone()
        other[:, BLOCK_IDS == phase] += 0.5
        changed = _changed_frames(base, _sample(comfy, later, _phased(other), [[neg, {}]], noise[:, :, :5]))
        assert changed == {j - 4 for j in _window_frames(phase) if j >= 4}
    # the first 5 frames of the clip end at 1.06 s, before phase 2 does: refused unless the clip's length is given
    with pytest.raises(PhaseScriptError, match="ends after the clip"):
        _sample(comfy, comfy.node.apply_phase_control(model, "routed"), _phased(ctx), [[neg, {}]], noise[:, :, :5])
    first = comfy.node.apply_phase_control(model, "routed", clip_seconds=2.06)
    assert _sample(comfy, first, _phased(ctx), [[neg, {}]], noise[:, :, :5]).shape[2] == 5


def _guide(comfy, guider, noise, steps: int = 1):
    """Run a guider the way SamplerCustomAdvanced does; returns (result, the denoised prediction of each step)."""
    import comfy.samplers as samplers

    seen = []
    sigmas = samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "simple", steps)
    sampler = samplers.sampler_object("euler")
    out = guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=0, disable_pbar=True,
                        callback=lambda step, x0, x, total: seen.append(x0.clone()))
    return out, seen


def test_phase_guider_adds_the_phase_term_with_one_extra_pass(comfy, model):
    ctx, neg, noise = _inputs()
    chunks: list = []

    def recorder(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        chunks.append(dict(zip(args["c"]["transformer_options"]["uuids"], out.chunk(len(args["cond_or_uncond"])))))
        return out

    patched = comfy.node.apply_phase_control(model, "routed")
    patched.set_model_unet_function_wrapper(recorder)
    import comfy.samplers as samplers

    plain = samplers.CFGGuider(patched)
    plain.set_conds(_phased(ctx), [[neg, {}]])
    plain.set_cfg(4.0)
    expected, _ = _guide(comfy, plain, noise)
    chunks.clear()
    off, _ = _guide(comfy, comfy.node.make_phase_guider(patched, _phased(ctx), [[neg, {}]], 4.0, 0.0), noise)
    assert torch.equal(off, expected) and sum(len(c) for c in chunks) == 2  # phase_cfg 0: plain CFG, no extra pass
    chunks.clear()
    guider = comfy.node.make_phase_guider(patched, _phased(ctx), [[neg, {}]], 4.0, 2.0)
    out, (x0,) = _guide(comfy, guider, noise)
    (step,) = chunks
    assert len(step) == 3
    full, = [step[c["uuid"]] for c in guider.original_conds["positive"]]
    uncond, = [step[c["uuid"]] for c in guider.original_conds["negative"]]
    hidden, = [step[c["uuid"]] for c in guider.original_conds["phase_base"]]
    assert not torch.equal(full, hidden)
    # core's model calls return denoised predictions and the sampler's x0 is the guider's combination of them
    torch.testing.assert_close(x0, uncond + (full - uncond) * 4.0 + 2.0 * (full - hidden), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x0, uncond + (full - uncond) * 4.0)
    with pytest.raises(ActAvatarError, match="needs a model patched by ActAvatar Phase Control"):
        comfy.node.make_phase_guider(model, _phased(ctx), [[neg, {}]], 4.0, 2.0)


@pytest.mark.slow
def test_composes_with_core_torch_compile(comfy, model):
    """Core's TorchCompileModel wrapper (APPLY_MODEL, compiling diffusion_model) over Phase Control, eager backend."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    ctx, neg, noise = _inputs()
    patched = comfy.node.apply_phase_control(model, "routed")
    expected = _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise)
    compiled = patched.clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    torch._dynamo.reset()
    try:
        got = _sample(comfy, compiled, _phased(ctx), [[neg, {}]], noise)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - _sample(comfy, model, [[ctx, {}]], [[neg, {}]], noise)).abs().max() > 1e-3  # routing stayed on


@pytest.mark.parametrize("mode", ["routed", "feathered", "relay"])
def test_parity_with_the_engines_routed_processor(comfy, tmp_path, mode):
    """The same tiny TI2V weights (two blocks) through the engine (diffusers ActAvatarTransformer, PACA with its
    untrained zero phase embedding) and through core's WanModel with Phase Control agree within 1e-4 in fp32."""
    from actavatar_core.attention import RelayRouting
    from actavatar_core.loading import load_wan_transformer
    from actavatar_core.model import ActAvatarTransformer
    from actavatar_core.sampling import build_routing

    path = tmp_path / "wan2.2_ti2v_5B_fp16.safetensors"
    cc.write_comfy_wan_transformer(path, prefix=True, text_dim=4096, num_layers=2, dtype=torch.float32, seed=7)
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    ours = load_wan_transformer(path, dtype=torch.float32, cls=ActAvatarTransformer).eval()
    assert not ours.phase_embedding.weight.any()
    ctx, _, noise = _inputs(seed=11)
    t = torch.tensor([600.0])
    settings = N.PhaseControlSettings(mode, feather=2.0, relay_width=1.5)
    routing = build_routing(SCRIPT, BLOCK_IDS[None], FRAMES, FPS, feather=2.0 if mode == "feathered" else 0.0)
    engine_mode = "relay" if mode == "relay" else "routed"
    if mode == "relay":
        routing = RelayRouting(routing, 1.5)
    with torch.no_grad():
        expected = ours(noise, t, ctx, phase_ids=BLOCK_IDS[None], routing=routing, paca_mode=engine_mode,
                        return_dict=False)[0]
        plain = ours(noise, t, ctx, return_dict=False)[0]
    patched = comfy.node.apply_phase_control(patcher, mode, 2.0, 1.5)
    options = {"wrappers": patched.wrappers, N.SPECS_KEY: {"u": SPANS}, comfy.node.WRAPPER_KEY: settings,
               N.FRAMES_KEY: FRAMES, "uuids": ["u"], "cond_or_uncond": [0]}
    patched.patch_model()
    try:
        with torch.no_grad():
            got = patched.model.diffusion_model(noise, t, ctx, transformer_options=options)
    finally:
        patched.unpatch_model()
    assert (expected - plain).abs().max() > 1e-2  # the routing matters at this size
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _tiny_from_class(comfy, cls, seed: int, **kw):
    """Core's ModelPatcher of a tiny model of one of ComfyUI's Wan classes, loaded through core's state-dict loader."""
    import comfy.ops

    g = torch.Generator().manual_seed(seed)
    net = cls(operations=comfy.ops.disable_weight_init, dtype=torch.float32, **kw)
    sd = {}
    for key, value in net.state_dict().items():
        if ".norm" in key and key.endswith(".weight"):
            sd[key] = 1 + 0.1 * torch.randn(value.shape, generator=g)
        else:
            sd[key] = torch.randn(value.shape, generator=g) / max(1.0, value.shape[-1] ** 0.5)
    patcher = comfy.sd.load_diffusion_model_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()},
                                                       model_options={"dtype": torch.float32})
    assert type(patcher.model.diffusion_model) is cls
    return patcher


def _assert_reference_model_routes_by_time(comfy, model, seed: int) -> None:
    """For a Wan model with a reference latent appended after the video: bit-exact without phases, phases change the
    sample, and phase k's tokens change exactly the frames of its window."""
    ctx, neg, _ = _inputs()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, FRAMES, 4, 4, generator=g)
    ref = {"reference_latents": [torch.randn(1, 16, 1, 4, 4, generator=g)]}
    negative = [[neg, dict(ref)]]

    def pos(c, spans):
        return [[c, {**ref, N.PHASE_SPANS_KEY: spans}]]

    plain = _sample(comfy, model, [[ctx, dict(ref)]], negative, noise)
    patched = comfy.node.apply_phase_control(model, "routed")
    none = N.PhaseSpans(PhaseScript.from_compact("A man talks"), FPS, torch.zeros_like(BLOCK_IDS))
    assert torch.equal(_sample(comfy, patched, pos(ctx, none), negative, noise), plain)
    base = _sample(comfy, patched, pos(ctx, SPANS), negative, noise)
    assert not torch.equal(base, plain)
    for phase in (1, 2):
        other = ctx.clone()
        other[:, BLOCK_IDS == phase] += 0.5
        assert _changed_frames(base, _sample(comfy, patched, pos(other, SPANS), negative, noise)) == _window_frames(phase)


def test_humo_routes_its_video_frames_by_time(comfy):
    """HuMo (its blocks add an audio cross-attention beside the text one; reference latent appended after the video)."""
    from comfy.ldm.wan.model import HumoWanModel

    model = _tiny_from_class(comfy, HumoWanModel, 9, dim=256, ffn_dim=128, num_heads=2, num_layers=1, text_dim=4096,
                             in_dim=36, out_dim=16)
    _assert_reference_model_routes_by_time(comfy, model, 10)


@pytest.fixture(scope="module")
def s2v_model(comfy):
    """A tiny one-block Wan2.2 S2V model (ComfyUI's WanModel_S2V)."""
    from comfy.ldm.wan.model import WanModel_S2V

    return _tiny_from_class(comfy, WanModel_S2V, 4, dim=256, ffn_dim=128, num_heads=2, num_layers=1, text_dim=4096,
                            in_dim=16, out_dim=16, audio_inject_layers=[0])


def test_s2v_routes_its_video_frames_by_time(comfy, s2v_model):
    """S2V (no grid in the transformer options; the reference image's tokens appended after the video's, unrouted):
    bit-exact without phases, and phase k's tokens change exactly the frames of its window."""
    _assert_reference_model_routes_by_time(comfy, s2v_model, 8)


def test_the_node_classes_run_their_functions(comfy, tiny_clip, model):
    """The V3 nodes' execute (what ComfyUI calls) chain: Phase Text Encode -> Phase Control -> Phase Guider."""
    node = comfy.node
    prompt = types.SimpleNamespace(script=SCRIPT, fps=FPS)
    positive, negative = node.ActAvatarPhaseTextEncode.execute(tiny_clip.clip, prompt, "").args
    assert positive[0][1][N.PHASE_SPANS_KEY].num_phases == 2 and N.PHASE_SPANS_KEY not in negative[0][1]
    (patched,) = node.ActAvatarPhaseControl.execute(model, "relay", 2.0, 3.0, 0.5, 0.0).args
    assert patched is not model and patched.get_wrappers("outer_sample", node.WRAPPER_KEY)
    assert patched.get_wrappers("outer_sample", node.WRAPPER_KEY)[0].settings == N.PhaseControlSettings(
        "relay", 2.0, 3.0, 0.5, 0.0)
    (guider,) = node.ActAvatarPhaseGuider.execute(patched, positive, negative, 4.0, 1.5).args
    assert (guider.cfg, guider.phase_cfg) == (4.0, 1.5) and set(guider.original_conds) == {"positive", "negative",
                                                                                          "phase_base"}
    for cls in node.NODES:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("ActAvatar") and schema.category == "ActAvatar/native"


@pytest.mark.parametrize("mode", ["routed", "relay"])
def test_routed_runs_go_through_comfyuis_attention(comfy, model, mode):
    """The routed runs (index-selected keys) and relay's biased call go through ComfyUI's attention function, so an
    attention override (and the backend ComfyUI picked: sage, flash, ...) applies to them too; same result."""
    ctx, neg, noise = _inputs()
    patched = comfy.node.apply_phase_control(model, mode)
    expected = _sample(comfy, patched, _phased(ctx), [[neg, {}]], noise)
    calls: list[dict] = []

    def override(func, *args, **kwargs):
        calls.append({"skip_reshape": kwargs.get("skip_reshape", False), "mask": kwargs.get("mask") is not None
                      or len(args) > 4 and args[4] is not None})
        return func(*args, **kwargs)

    seen = patched.clone()
    seen.model_options["transformer_options"]["optimized_attention_override"] = override
    assert torch.equal(_sample(comfy, seen, _phased(ctx), [[neg, {}]], noise), expected)
    routed_calls = [c for c in calls if c["skip_reshape"]]  # only the routed path hands over per-head tensors
    assert routed_calls
    assert all(c["mask"] for c in routed_calls) == (mode == "relay")  # relay's bias rides along as a float mask

    def scaled(func, *args, **kwargs):  # the override really produces the routed attention's output
        out = func(*args, **kwargs)
        return out * 0.5 if kwargs.get("skip_reshape") else out

    halved = patched.clone()
    halved.model_options["transformer_options"]["optimized_attention_override"] = scaled
    assert not torch.equal(_sample(comfy, halved, _phased(ctx), [[neg, {}]], noise), expected)
