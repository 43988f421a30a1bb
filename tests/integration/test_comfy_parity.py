"""Parity with ComfyUI's own implementation (ComfyUI 0.33.0 or newer at ``COMFYUI_DIR``).

For each community file kind: the tiny file written by ``community_checkpoints`` has exactly the tensor names and
shapes of ``state_dict()`` of ComfyUI's model class, ComfyUI's class loads it strictly, and our loader's model
(diffusers/transformers classes) computes the same outputs from it. Where ComfyUI's real loader accepts tiny
files (UNETLoader's detection, AudioEncoderLoader at width 768) that path is exercised too.

ComfyUI is imported in-process with the preamble of docs (infra.md section 4): ``--cpu`` in ``sys.argv`` and
``comfy.options.enable_args_parsing()`` before anything imports ``comfy.cli_args``, so nothing probes CUDA.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for community_checkpoints

import community_checkpoints as cc  # noqa: E402
from actavatar_core import loading as L  # noqa: E402
from actavatar_core.errors import WeightsError  # noqa: E402

pytestmark = pytest.mark.integration

COMFY_DIR = os.environ.get("COMFYUI_DIR", "")
if not COMFY_DIR:
    pytest.skip("COMFYUI_DIR is not set: point it at a ComfyUI 0.33.0 or newer checkout "
                "to run the ComfyUI parity tests", allow_module_level=True)
if not (Path(COMFY_DIR) / "comfy" / "ldm" / "wan" / "model.py").is_file():
    pytest.skip(f"COMFYUI_DIR={COMFY_DIR!r} is not a ComfyUI checkout (no comfy/ldm/wan/model.py)",
                allow_module_level=True)

torch.set_num_threads(min(2, torch.get_num_threads()))
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's modules, imported CPU-only. Skips (with the reason) if its requirements are missing."""
    pytest.importorskip("einops", reason="ComfyUI's requirements are not installed in this environment")
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    if COMFY_DIR not in sys.path:
        sys.path.append(COMFY_DIR)
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args

        # A test module that imported comfy_api first (the nodes' tests, at collection) had comfy.cli_args parse
        # no arguments; --cpu must hold before comfy.model_management picks its device (else it probes CUDA).
        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401 - on the CPU, before anything else touches devices
        import comfy.model_patcher  # noqa: F401
        import comfy.ops
        import comfy.sd
        import comfy.utils
        from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model
        from comfy.ldm.wan import vae as vae21
        from comfy.ldm.wan import vae2_2
        from comfy.ldm.wan.model import WanModel
        from comfy.text_encoders.spiece_tokenizer import SPieceTokenizer
        from comfy.text_encoders.t5 import T5
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {COMFY_DIR} could not be imported ({exc}); install its requirements.txt")
    finally:
        sys.argv = argv
    return types.SimpleNamespace(ops=comfy.ops, utils=comfy.utils, sd=comfy.sd, WanModel=WanModel, vae2_2=vae2_2,
                                 vae21=vae21, T5=T5, SPieceTokenizer=SPieceTokenizer, Wav2Vec2Model=Wav2Vec2Model)


def _layout(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _assert_same_layout(comfy_sd: dict, ours: dict, what: str) -> None:
    a, b = _layout(comfy_sd), _layout(ours)
    assert set(a) == set(b), f"{what}: only ComfyUI {sorted(set(a) - set(b))[:5]}, only ours {sorted(set(b) - set(a))[:5]}"
    bad = [k for k in a if a[k] != b[k]]
    assert not bad, f"{what}: shape differs for {bad[:5]}"


# ================================================================================================ transformer
def test_wan_transformer_matches_comfy_wanmodel(comfy, tmp_path):
    w = cc.write_comfy_wan_transformer(tmp_path / "wan.safetensors", prefix=True, dtype=torch.float32)
    c = {**cc.TRANSFORMER_DEFAULTS}
    ref = comfy.WanModel(model_type="t2v", patch_size=tuple(c["patch_size"]), in_dim=c["in_dim"], dim=c["dim"],
                         ffn_dim=c["ffn_dim"], freq_dim=c["freq_dim"], text_dim=c["text_dim"], out_dim=c["out_dim"],
                         num_heads=c["dim"] // 128, num_layers=c["num_layers"], operations=comfy.ops.disable_weight_init,
                         dtype=torch.float32)
    stored = {k[len(PREFIX):]: v for k, v in w.stored.items()}
    _assert_same_layout(ref.state_dict(), stored, "WanModel")
    ref.load_state_dict(stored, strict=True)
    ref.eval()
    ours = L.load_wan_transformer(w.path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 7, c["text_dim"], generator=g)
    tokens = 3 * 4 * 4
    for t in (torch.tensor([500.0]), torch.linspace(0.0, 999.0, tokens)[None]):  # scalar and TI2V per-token t
        with torch.no_grad():
            a = ref(x, t, ctx, transformer_options={})
            b = ours(x, t, ctx, return_dict=False)[0]
        assert a.shape == b.shape == x.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-4)
        assert a.abs().mean() > 0.1  # a real signal, not zeros


def test_comfy_unet_loader_detects_our_file_as_ti2v(comfy, tmp_path):
    """ComfyUI's own UNETLoader path (detection + WAN22 model) on a tiny file with Wan's 4096-wide text input."""
    w = cc.write_comfy_wan_transformer(tmp_path / "wan2.2_ti2v_5B_fp16.safetensors", prefix=True, text_dim=4096)
    patcher = comfy.sd.load_diffusion_model(str(w.path))
    assert type(patcher.model).__name__ == "WAN22" and type(patcher.model.latent_format).__name__ == "Wan22"
    dm = patcher.model.diffusion_model.float()
    ours = L.load_wan_transformer(w.path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 48, 2, 8, 8, generator=g), torch.randn(1, 5, 4096, generator=g)
    with torch.no_grad():
        a = dm(x, torch.tensor([250.0]), ctx, transformer_options={})
        b = ours(x, torch.tensor([250.0]), ctx, return_dict=False)[0]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-4)


# ================================================================================================ VAE
def test_wan22_vae_matches_comfy(comfy, tmp_path):
    w = cc.write_comfy_wan22_vae(tmp_path / "wan2.2_vae.safetensors")
    c = cc.VAE22_DEFAULTS
    ref = comfy.vae2_2.WanVAE(dim=c["dim"], dec_dim=c["dec_dim"], z_dim=c["z_dim"], dim_mult=list(c["dim_mult"]),
                              num_res_blocks=c["num_res_blocks"], temperal_downsample=list(c["temperal_downsample"]))
    _assert_same_layout(ref.state_dict(), w.stored, "vae2_2.WanVAE")
    ref.load_state_dict(w.stored, strict=True)
    ref.eval()
    ours = L.load_wan_vae(w.path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        z_ref = ref.encode(video)
        z = ours.encode(video).latent_dist.mode()
        torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
        y_ref = ref.decode(z_ref)
        y = ours.decode(z_ref, return_dict=False)[0]
    # diffusers clamps decoded pixels to [-1, 1]; ComfyUI clamps later, in VAE.process_output.
    assert y.shape == y_ref.shape == video.shape
    torch.testing.assert_close(y, y_ref.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_wan21_vae_layout_matches_comfy_and_is_refused(comfy, tmp_path):
    w = cc.write_comfy_wan21_vae(tmp_path / "wan_2.1_vae.safetensors")
    ref = comfy.vae21.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                             temperal_downsample=[False, True, True])
    _assert_same_layout(ref.state_dict(), w.stored, "vae.WanVAE (2.1)")
    with pytest.raises(WeightsError, match="Wan2.1 VAE"):
        L.load_wan_vae(w.path)


# ================================================================================================ umT5
def _comfy_t5(comfy, config: dict, ops):
    cfg = dict(num_layers=config["num_layers"], d_model=config["d_model"], d_kv=config["d_kv"],
               num_heads=config["num_heads"], d_ff=config["d_ff"], dense_act_fn="gelu_pytorch_tanh", is_gated_act=True,
               model_type="umt5", vocab_size=config["vocab_size"])
    return comfy.T5(cfg, torch.float32, "cpu", ops)


def test_umt5_and_tokenizer_match_comfy(comfy, tmp_path):
    w = cc.write_comfy_umt5(tmp_path / "umt5_xxl_fp16.safetensors")
    ref = _comfy_t5(comfy, w.config, comfy.ops.manual_cast)
    stored = {k: v for k, v in w.stored.items() if k != "spiece_model"}
    _assert_same_layout(ref.state_dict(), stored, "T5 (umt5)")
    ref.load_state_dict({k: v.float() for k, v in stored.items()}, strict=True)
    ours, tok = L.load_umt5(w.path, dtype=torch.float32)
    comfy_tok = comfy.SPieceTokenizer(w.stored["spiece_model"])  # what ComfyUI builds from the same tensor
    texts = ["A man talks to the camera while raising his left hand.", "Ein Mann spricht,  一个人 xyzzy!"]
    for text in texts:
        assert tok(text).input_ids == comfy_tok(text)["input_ids"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch.attention_mask.sum() < batch.attention_mask.numel()  # padding is exercised
    with torch.no_grad():
        a = ref(batch.input_ids, attention_mask=batch.attention_mask)[0]
        b = ours(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(b[valid], a[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", ["scaled_fp8", "comfy_quant"])
def test_umt5_fp8_matches_comfy_dequantisation(comfy, tmp_path, style):
    """ComfyUI's own path for fp8 files: convert_old_quants + mixed-precision ops. Its dequantised weights must be
    exactly ours, and so must the outputs."""
    w = cc.write_comfy_umt5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", fp8_scaled=True, quant_style=style)
    sd, meta = comfy.utils.load_torch_file(str(w.path), safe_load=True, return_metadata=True)
    sd, meta = comfy.utils.convert_old_quants(sd, "", metadata=meta)
    sd.pop("spiece_model")
    ref = _comfy_t5(comfy, w.config, comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32,
                                                                    full_precision_mm=True))
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    ours, _ = L.load_umt5(w.path, dtype=torch.float32)
    ours_sd = ours.state_dict()
    checked = 0
    for name, module in ref.named_modules():
        weight = getattr(module, "weight", None)
        if name and hasattr(module, "convert_weight") and isinstance(weight, torch.Tensor):
            deq = module.convert_weight(weight)
            deq = deq.dequantize() if hasattr(deq, "dequantize") else deq
            assert torch.equal(deq.float(), ours_sd[f"{name}.weight"]), name
            checked += 1
    assert checked >= 7 * w.config["num_layers"]
    ids = torch.tensor([[5, 9, 14, 3, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, ref(ids, attention_mask=None)[0], rtol=1e-4, atol=1e-4)


# ================================================================================================ wav2vec2
@pytest.mark.parametrize("size", ["large", "base"])
def test_wav2vec2_matches_comfy(comfy, tmp_path, size):
    w = cc.write_comfy_wav2vec2(tmp_path / f"wav2vec2_{size}.safetensors", size=size, hidden_size=128)
    large = size == "large"
    ref = comfy.Wav2Vec2Model(embed_dim=128, num_heads=2, num_layers=2, conv_norm=large, conv_bias=large,
                              do_normalize=large, do_stable_layer_norm=large, dtype=torch.float32, device="cpu",
                              operations=comfy.ops.manual_cast)
    _assert_same_layout(ref.state_dict(), w.stored, f"Wav2Vec2Model ({size})")
    ref.load_state_dict({k: v.float() for k, v in w.stored.items()}, strict=True)
    ref.eval()
    ours, info = L.load_wav2vec2(w.path, dtype=torch.float32)
    assert info["do_normalize"] is large and ours.config.num_attention_heads == 2
    audio = 0.3 * torch.randn(1, 1, 16000, generator=torch.Generator().manual_seed(0))  # ComfyUI: (B, C, T)
    x = audio.mean(1)
    if info["do_normalize"]:  # ComfyUI normalises inside the model; transformers leaves it to the caller
        x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)
    with torch.no_grad():
        last, all_layers = ref(audio)
        out = ours(x, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, last, rtol=1e-4, atol=1e-4)
    assert len(out.hidden_states) == len(all_layers) == 3
    for a, b in zip(out.hidden_states[:-1], all_layers[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # ComfyUI's last "all layers" entry is the encoder output (after the final layer norm of the large model);
    # transformers 5 records the last block's output there, before that norm.
    final = ours.encoder.layer_norm(out.hidden_states[-1]) if large else out.hidden_states[-1]
    torch.testing.assert_close(final, all_layers[-1], rtol=1e-4, atol=1e-4)
    # the engine's feature extraction gives exactly ComfyUI's AUDIO_ENCODER_OUTPUT layers
    from actavatar_core.audio import Waveform, wav2vec2_hidden_states

    feats = wav2vec2_hidden_states(ours, Waveform(audio[0, 0], 16000), do_normalize=info["do_normalize"])
    torch.testing.assert_close(feats, torch.stack([layer[0] for layer in all_layers], dim=1), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_comfy_audio_encoder_loader_reads_our_base_file(comfy, tmp_path):
    """ComfyUI's AudioEncoderLoader path only accepts widths 768/1024: a base-size (~95 M parameter) random file."""
    from comfy.audio_encoders.audio_encoders import load_audio_encoder_from_sd

    w = cc.write_comfy_wav2vec2(tmp_path / "wav2vec2-chinese-base_fp16.safetensors", size="base", hidden_size=768,
                                num_layers=12)
    encoder = load_audio_encoder_from_sd(comfy.utils.load_torch_file(str(w.path)))
    ours, info = L.load_wav2vec2(w.path, dtype=torch.float32)
    assert info == {"do_normalize": False, "sample_rate": 16000, "num_layers": 12, "hidden_size": 768}
    assert ours.config.num_attention_heads == 12
    audio = 0.3 * torch.randn(1, 1, 8000, generator=torch.Generator().manual_seed(0))
    result = encoder.encode_audio(audio, 16000)
    with torch.no_grad():
        out = ours(audio.mean(1))
    torch.testing.assert_close(out.last_hidden_state, result["encoded_audio"].float(), rtol=1e-3, atol=1e-3)
