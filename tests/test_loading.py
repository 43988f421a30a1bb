"""Loading users' model files: community single files (ComfyUI layouts), diffusers/HF folders, wrong kinds.

Every round trip writes a tiny checkpoint in the exact community layout (``community_checkpoints``), loads it with
``actavatar_core.loading`` and compares against a reference built independently: the writer's own diffusers
names (derived from the model structure, not from the loader's renames), diffusers' ``from_single_file`` with a
local config, or the transformers class loaded with ``load_state_dict``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import community_checkpoints as cc
from actavatar_core import loading as L
from actavatar_core.convert import identify as ident_mod
from actavatar_core.convert import spm as spm_mod
from actavatar_core.convert import wan_transformer as wt
from actavatar_core.convert import wan_vae as vae_conv
from actavatar_core.convert.source import TensorSource
from actavatar_core.errors import WeightsError

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One set of community files shared by the module (written once, ~1 s)."""
    d = tmp_path_factory.mktemp("community")
    return {
        "tr": cc.write_comfy_wan_transformer(d / "wan2.2_ti2v_5B_fp16.safetensors", prefix=False, dtype=torch.float32),
        "tr_prefix": cc.write_comfy_wan_transformer(d / "prefixed.safetensors", prefix=True, seed=1),
        "vae": cc.write_comfy_wan22_vae(d / "wan2.2_vae.safetensors"),
        "vae21": cc.write_comfy_wan21_vae(d / "wan_2.1_vae.safetensors"),
        "umt5": cc.write_comfy_umt5(d / "umt5_xxl_fp16.safetensors"),
        "umt5_fp8": cc.write_comfy_umt5(d / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", fp8_scaled=True),
        "w2v_large": cc.write_comfy_wav2vec2(d / "wav2vec2_large_english_fp16.safetensors", size="large", conv_dim=32,
                                             pos_kernel=16, pos_groups=4),
        "w2v_base": cc.write_comfy_wav2vec2(d / "wav2vec2-chinese-base_fp16.safetensors", size="base", conv_dim=32,
                                            pos_kernel=16, pos_groups=4),
        "dir": d,
    }


def _assert_state(model: torch.nn.Module, reference: dict[str, torch.Tensor], exact: bool = True) -> None:
    sd = model.state_dict()
    missing = set(reference) - set(sd)
    assert not missing, f"loader lost keys: {sorted(missing)[:5]}"
    for k, ref in reference.items():
        got = sd[k].float()
        assert got.shape == ref.shape, k
        if exact:
            assert torch.equal(got, ref.float()), k
        else:
            torch.testing.assert_close(got, ref.float(), rtol=1e-3, atol=1e-3, msg=k)


# ================================================================================================ reading
def test_read_state_dict_safetensors_and_torch_files(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "x.ckpt")
    for name in ("x.safetensors", "x.ckpt"):
        sd = L.read_state_dict(tmp_path / name)
        assert set(sd) == {"a", "b"}
        assert torch.equal(sd["a"], tensors["a"]) and sd["b"].dtype == torch.float16


def test_pickle_payloads_are_refused(tmp_path):
    # A function reference is what malicious pickles use; weights_only must refuse it and we must say why.
    torch.save({"w": torch.ones(2), "hook": os.getcwd}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="pickled"):
        L.read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="pickled"):
        L.load_wan_vae(tmp_path / "evil.pt")


@pytest.mark.parametrize("name,content,pattern", [
    ("model.gguf", b"GGUF....", "GGUF"),
    ("model.onnx", b"\x00\x01", "not a weights format"),
    ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "could not be read as safetensors"),
])
def test_unreadable_or_unsupported_files(tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=pattern) as err:
        L.read_state_dict(tmp_path / name)
    assert err.value.fix  # every refusal says how to fix it


def test_missing_path_says_where(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        L.load_wan_transformer(tmp_path / "nope.safetensors")


# ================================================================================================ identify
@pytest.mark.parametrize("key,kind,layout,words", [
    ("tr", "wan_transformer", "original", "Wan transformer"),
    ("tr_prefix", "wan_transformer", "comfy", "Wan transformer"),
    ("vae", "wan22_vae", "original", "Wan2.2 VAE (48 latent channels)"),
    ("vae21", "wan21_vae", "original", "Wan2.1 VAE (16 latent channels)"),
    ("umt5", "umt5", "comfy", "umT5 text encoder"),
    ("umt5_fp8", "umt5", "comfy", "fp8 scaled"),
    ("w2v_large", "wav2vec2", "comfy", "wav2vec2-large"),
    ("w2v_base", "wav2vec2", "comfy", "wav2vec2-base"),
])
def test_identify_community_files(files, key, kind, layout, words):
    info = L.identify_checkpoint(files[key].path)
    assert (info.kind, info.layout) == (kind, layout)
    assert words in info.description
    assert info.kind in L.KINDS
    # the same verdict from an in-memory state dict
    again = L.identify_checkpoint(L.read_state_dict(files[key].path))
    assert (again.kind, again.description) == (info.kind, info.description)


def test_identify_facts(files):
    tr = L.identify_checkpoint(files["tr_prefix"].path)
    assert tr.prefix == "model.diffusion_model."
    assert tr.facts["dim"] == 256 and tr.facts["num_layers"] == 2 and tr.facts["num_attention_heads"] == 2
    assert tr.facts["ti2v"] is True and tr.dtype == "float16" and not tr.fp8_scaled
    fp8 = L.identify_checkpoint(files["umt5_fp8"].path)
    assert fp8.fp8_scaled and fp8.dtype == "float8_e4m3fn" and fp8.facts["has_tokenizer"]
    assert fp8.facts["num_heads"] == 4 and fp8.facts["d_model"] == 32
    w2v = L.identify_checkpoint(files["w2v_base"].path)
    assert w2v.facts == {"hidden_size": 64, "num_layers": 2, "flavour": "base"}


def test_identify_reads_no_tensor_data(files, monkeypatch):
    def boom(self, key):
        raise AssertionError(f"identify read tensor {key}")

    monkeypatch.setattr(TensorSource, "get", boom)
    assert L.identify_checkpoint(files["tr"].path).kind == "wan_transformer"
    assert L.identify_checkpoint(files["umt5"].path).kind == "umt5"


def _metas(shapes: dict[str, tuple]) -> dict:
    return {k: (tuple(s), torch.float16) for k, s in shapes.items()}


@pytest.mark.parametrize("shapes,kind,words", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
      "conditioner.embedders.1.model.ln_final.weight": (1280,)}, "unknown", "SDXL checkpoint"),
    ({"input_blocks.0.0.weight": (320, 4, 3, 3)}, "unknown", "Stable Diffusion 1.x/2.x UNet"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "unknown", "Flux"),
    ({"lora_unet_blocks_0.lora_down.weight": (8, 64)}, "unknown", "LoRA"),
    ({"encoder.block.0.layer.0.SelfAttention.q.weight": (64, 32), "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 4),
      "encoder.block.1.layer.0.SelfAttention.q.weight": (64, 32), "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (64, 32),
      "shared.weight": (100, 32), "encoder.final_layer_norm.weight": (32,)}, "unknown", "not umT5"),
    ({"model.encoder.embed_positions.weight": (1500, 1280), "model.encoder.conv1.weight": (1280, 128, 3)}, "whisper", "Whisper large-v3"),
    ({"vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14), "vision_model.encoder.layers.0.mlp.fc1.weight": (5120, 1280),
      "vision_model.post_layernorm.weight": (1280,)}, "clip_vision", "clip_vision_h"),
    ({"audio_proj.net.0.weight": (8, 8), "blocks.0.audio_attn.to_q.weight": (8, 8)}, "actavatar", "ActAvatar"),
    ({"decoder.mid.block_1.norm1.weight": (512,), "post_quant_conv.weight": (4, 4, 1, 1)}, "unknown", "image VAE"),
    ({"foo.bar": (3,)}, "unknown", "unrecognised"),
])
def test_identify_other_files(shapes, kind, words):
    info = ident_mod.identify(_metas(shapes))
    assert info.kind == kind and words in info.description


def test_identify_pipeline_folder(tmp_path):
    cc.write_diffusers_pipeline(tmp_path / "pipe")
    info = L.identify_checkpoint(tmp_path / "pipe")
    assert info.kind == "unknown" and "pipeline" in info.description
    assert {"transformer", "vae", "text_encoder"} <= set(info.facts["components"])
    assert L.identify_checkpoint(tmp_path / "pipe" / "vae").kind == "wan22_vae"


# ================================================================================================ transformer
def _wan_inputs(cfg: dict, seed: int = 0, frames: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg["in_channels"], frames, size, size, generator=g)
    ctx = torch.randn(1, 7, cfg["text_dim"], generator=g)
    return x, torch.tensor([637.0]), ctx


def test_transformer_comfy_file_matches_diffusers_from_single_file(files, tmp_path):
    """Ours vs diffusers' own single-file machinery with a local config: same weights, same outputs."""
    from diffusers import WanTransformer3DModel

    w = files["tr_prefix"]
    ours = L.load_wan_transformer(w.path, dtype=torch.float32)
    assert type(ours) is WanTransformer3DModel
    _assert_state(ours, w.reference)
    cfg_dir = tmp_path / "cfg" / "transformer"
    cfg_dir.mkdir(parents=True)
    cfg = {**w.config, "patch_size": list(w.config["patch_size"])}
    (cfg_dir / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **cfg}))
    ref = WanTransformer3DModel.from_single_file(str(w.path), config=str(tmp_path / "cfg"), subfolder="transformer",
                                                 torch_dtype=torch.float32).eval()
    x, t, ctx = _wan_inputs(w.config)
    with torch.no_grad():
        a = ours(x, t, ctx, return_dict=False)[0]
        b = ref(x, t, ctx, return_dict=False)[0]
    assert a.shape == x.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {k: v for k, v in ours.config.items() if k in cfg and k != "patch_size"} == \
        {k: v for k, v in cfg.items() if k != "patch_size"}


def test_transformer_prefix_free_file_and_per_token_timesteps(files):
    from diffusers import WanTransformer3DModel

    w = files["tr"]
    ours = L.load_wan_transformer(w.path, dtype=torch.float32)
    ref = WanTransformer3DModel(**w.config).eval()
    ref.load_state_dict(w.reference, strict=True)
    x, _, ctx = _wan_inputs(w.config)
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    t = torch.linspace(0, 999, tokens)[None]  # TI2V per-token timesteps
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx, return_dict=False)[0], ref(x, t, ctx, return_dict=False)[0])


def test_transformer_reads_each_tensor_once_and_keeps_fp32_modules(files, monkeypatch):
    reads: dict[str, int] = {}
    real_get = TensorSource.get

    def counting(self, key):
        reads[key] = reads.get(key, 0) + 1
        return real_get(self, key)

    monkeypatch.setattr(TensorSource, "get", counting)
    model = L.load_wan_transformer(files["tr"].path, dtype=torch.bfloat16)
    assert reads and max(reads.values()) == 1 and len(reads) == len(files["tr"].stored)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["scale_shift_table"] == torch.float32            # diffusers' _keep_in_fp32_modules
    assert dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert model.rope.freqs_cos.device.type == "cpu" and not model.rope.freqs_cos.is_meta
    # dtype None keeps the file's dtype
    assert next(L.load_wan_transformer(files["tr_prefix"].path).proj_out.parameters()).dtype == torch.float16


def test_transformer_diffusers_folder_sharded_file_and_pipeline_root(tmp_path):
    w = cc.write_diffusers_wan_transformer(tmp_path / "transformer", max_shard_size="200KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    for path in (tmp_path / "transformer", tmp_path):  # the folder, and a pipeline root holding transformer/
        model = L.load_wan_transformer(path, dtype=torch.float32)
        _assert_state(model, w.reference)
        assert model.config.num_attention_heads == w.config["num_attention_heads"]
    # a single file with diffusers keys (no config): heads come from config=
    from safetensors.torch import save_file

    save_file(w.reference, str(tmp_path / "diffusers_keys.safetensors"))
    with pytest.raises(WeightsError, match="not a multiple of 128"):
        L.load_wan_transformer(tmp_path / "diffusers_keys.safetensors")
    model = L.load_wan_transformer(tmp_path / "diffusers_keys.safetensors", dtype=torch.float32,
                                   config={"num_attention_heads": 2})
    assert model.config.attention_head_dim == 32
    _assert_state(model, w.reference)


def test_local_rename_table_agrees_with_diffusers(files):
    keys = [k for k, _, _ in cc.wan_transformer_layout(**cc.TRANSFORMER_DEFAULTS)]
    i2v = keys + ["img_emb.proj.0.weight", "img_emb.proj.1.weight", "img_emb.proj.3.bias", "img_emb.proj.4.weight",
                  "blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.v_img.bias", "blocks.0.cross_attn.norm_k_img.weight"]
    theirs = wt.diffusers_rename_map(i2v)
    assert theirs is not None
    assert {wt.own_rename(k): k for k in i2v} == theirs
    # and the writer's structure-derived names agree with both
    assert {dk: ck for ck, dk, _ in cc.wan_transformer_layout(**cc.TRANSFORMER_DEFAULTS)} == wt.diffusers_rename_map(keys)


def test_full_size_shapes_give_the_ti2v_5b_config():
    from actavatar_core.tiny import TI2V_5B_TRANSFORMER

    rows = cc.wan_transformer_layout(dim=3072, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48, text_dim=4096,
                                     freq_dim=256)
    shapes = {k: s for k, _, s in rows}
    inferred = wt.infer_config(shapes, lambda k: shapes[k], "original")
    full = L.local_config("wan22_ti2v_5b_transformer")
    for k, v in TI2V_5B_TRANSFORMER.items():
        assert L._same(inferred[k], v), k
        assert L._same(full[k], v), k
    assert "TI2V-5B" in wt.describe(inferred, 3072)


class _Extended:
    """Factory for a WanTransformer3DModel subclass with an extra zero-initialised module (like ActAvatar)."""

    @staticmethod
    def make():
        import torch.nn as nn
        from diffusers import WanTransformer3DModel

        class Extended(WanTransformer3DModel):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                dim = self.config.num_attention_heads * self.config.attention_head_dim
                self.extra = nn.Linear(dim, dim)
                nn.init.zeros_(self.extra.weight)

            def materialise_extra_weights(self, device, dtype):
                self.extra = nn.Linear(self.extra.in_features, self.extra.out_features, device=device, dtype=dtype)
                nn.init.zeros_(self.extra.weight)
                nn.init.ones_(self.extra.bias)

        return Extended


def test_transformer_subclass_gets_base_weights_and_initialised_extras(files):
    Extended = _Extended.make()
    model = L.load_wan_transformer(files["tr"].path, dtype=torch.float32, cls=Extended)
    assert isinstance(model, Extended)
    _assert_state(model, files["tr"].reference)
    assert torch.all(model.extra.weight == 0) and torch.all(model.extra.bias == 1)  # the subclass's own hook ran


def test_actavatar_transformer_loads_as_cls(files):
    model_mod = pytest.importorskip("actavatar_core.model", reason="ActAvatarTransformer not available")
    cls = model_mod.ActAvatarTransformer
    model = L.load_wan_transformer(files["tr"].path, dtype=torch.float32, cls=cls,
                                   config=dict(audio_feature_dim=16, audio_num_layers=3, audio_hidden_dim=16,
                                               max_phases=2))
    assert isinstance(model, cls)
    _assert_state(model, files["tr"].reference)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.all(model.blocks[0].audio_attn.to_out[0].weight == 0)  # adapter starts as a no-op


def test_transformer_missing_and_unknown_keys_are_listed(files, tmp_path):
    from safetensors.torch import save_file

    sd = dict(files["tr"].stored)
    del sd["blocks.1.ffn.2.weight"]
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(WeightsError, match=r"missing 1 tensor.*blocks\.1\.ffn\.net\.2\.weight"):
        L.load_wan_transformer(tmp_path / "cut.safetensors")
    sd = dict(files["tr"].stored)
    sd["casual_audio_encoder.encoder.final_linear.weight"] = torch.zeros(4, 4)
    save_file(sd, str(tmp_path / "s2v.safetensors"))
    with pytest.raises(WeightsError, match="S2V"):
        L.load_wan_transformer(tmp_path / "s2v.safetensors")


def test_transformer_wrong_kinds(files, tmp_path):
    with pytest.raises(WeightsError, match=r"looks like a Wan2.2 VAE.*TI2V-5B transformer was expected") as err:
        L.load_wan_transformer(files["vae"].path)
    assert "models/diffusion_models" in str(err.value)
    w = cc.write_comfy_wan_transformer(tmp_path / "wan21_1.3b_like.safetensors", in_dim=16, out_dim=16)
    assert L.load_wan_transformer(w.path, dtype=torch.float32).config.in_channels == 16  # loads in general...
    with pytest.raises(WeightsError, match="48 latent channels"):
        L.load_wan_transformer(w.path, require_ti2v=True)  # ...but not where TI2V is required


def test_transformer_fp8_comfy_quant_metadata(files, tmp_path):
    """The newer ComfyUI quant format: per-layer config in the safetensors metadata + weight_scale tensors."""
    from safetensors.torch import save_file

    stored = {k: v.float() for k, v in files["tr"].stored.items()}
    out, layers, reference = {}, {}, dict(files["tr"].reference)
    names = files["tr"].diffusers_names
    for k, v in stored.items():
        if k.endswith(".weight") and v.ndim == 2 and k.startswith("blocks."):
            q, scale = cc._fp8_quantize(v)
            out[k], out[k[:-7] + ".weight_scale"] = q, scale
            layers[k[:-7]] = {"format": "float8_e4m3fn"}
            reference[names[k]] = q.float() * scale
        else:
            out[k] = v
    save_file(out, str(tmp_path / "fp8.safetensors"), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    info = L.identify_checkpoint(tmp_path / "fp8.safetensors")
    assert info.fp8_scaled and info.kind == "wan_transformer"
    model = L.load_wan_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    _assert_state(model, reference)
    layers[next(iter(layers))] = {"format": "nvfp4"}
    save_file(out, str(tmp_path / "nvfp4.safetensors"), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    with pytest.raises(WeightsError, match="nvfp4"):
        L.load_wan_transformer(tmp_path / "nvfp4.safetensors")


# ================================================================================================ VAE
def _video(seed: int = 0, frames: int = 5, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def test_vae_original_layout_round_trip(files):
    from diffusers import AutoencoderKLWan

    w = files["vae"]
    ours = L.load_wan_vae(w.path)
    _assert_state(ours, w.reference)
    for k in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "temperal_downsample", "patch_size",
              "scale_factor_spatial", "scale_factor_temporal"):
        assert L._same(ours.config[k], w.config[k]), k
    ref = AutoencoderKLWan(**w.config).eval()
    ref.load_state_dict(w.reference, strict=True)
    x = _video()
    with torch.no_grad():
        za, zb = ours.encode(x).latent_dist.mode(), ref.encode(x).latent_dist.mode()
        assert za.shape == (1, 48, 2, 2, 2)
        torch.testing.assert_close(za, zb, rtol=0, atol=0)
        ya, yb = ours.decode(za, return_dict=False)[0], ref.decode(za, return_dict=False)[0]
    assert ya.shape == x.shape
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def test_vae_rename_covers_every_key_and_full_size_config(files):
    rows = cc.wan22_vae_layout(160, 256, 48, (1, 2, 4, 4), 2, (False, True, True))
    for ck, dk, _ in rows:
        assert vae_conv.rename_original22(ck) == dk, ck
    shapes = {dk: s for _, dk, s in rows}
    inferred = vae_conv.infer_config(shapes, lambda k: shapes[k])
    full = L.local_config("wan22_vae")
    for k in ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample",
              "in_channels", "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial"):
        assert L._same(inferred[k], full[k]), k
    assert len(full["latents_mean"]) == len(full["latents_std"]) == 48
    assert vae_conv.rename_original22("decoder.upsamples.0.upsamples.9.unknown.weight") is None


def test_vae_diffusers_folder_and_dtype(tmp_path):
    w = cc.write_diffusers_wan_vae(tmp_path / "vae")
    model = L.load_wan_vae(tmp_path / "vae", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    _assert_state(model, {k: v.to(torch.bfloat16) for k, v in w.reference.items()})
    assert L._same(model.config.latents_std, w.config["latents_std"])


def test_vae_wrong_kinds(files):
    with pytest.raises(WeightsError) as err:
        L.load_wan_vae(files["vae21"].path)
    msg = str(err.value)
    assert "looks like a Wan2.1 VAE (16 latent channels)" in msg and "wan2.2_vae.safetensors" in msg and "models/vae" in msg
    with pytest.raises(WeightsError, match=r"looks like a umT5 text encoder.*Wan2.2 VAE was expected"):
        L.load_wan_vae(files["umt5"].path)


# ================================================================================================ umT5
def _hf_umt5(config: dict, weights: dict[str, torch.Tensor]):
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config(**config)).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) <= {"encoder.embed_tokens.weight"} and not unexpected
    return model


@pytest.mark.parametrize("key", ["umt5", "umt5_fp8"])
def test_umt5_comfy_files_round_trip(files, key):
    import sentencepiece

    w = files[key]
    model, tok = L.load_umt5(w.path, dtype=torch.float32)
    _assert_state(model, w.reference)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    ref = _hf_umt5(w.config, w.reference)
    text = "A man talks to the camera while raising his left hand."
    ids = tok(text, return_tensors="pt").input_ids
    sp = sentencepiece.SentencePieceProcessor(model_proto=cc.tiny_spm_bytes(), add_eos=True)
    assert ids[0].tolist() == sp.encode(text)  # what ComfyUI's SPieceTokenizer produces
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_umt5_fp8_styles_dequantise_identically(files, tmp_path):
    w = cc.write_comfy_umt5(tmp_path / "cq.safetensors", fp8_scaled=True, quant_style="comfy_quant")
    assert "scaled_fp8" not in w.stored and any(k.endswith(".comfy_quant") for k in w.stored)
    a, _ = L.load_umt5(w.path, dtype=torch.float32)
    b, _ = L.load_umt5(files["umt5_fp8"].path, dtype=torch.float32)
    _assert_state(a, b.state_dict())
    q = files["umt5_fp8"].stored
    k = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert q[f"{k}.weight"].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(a.state_dict()[f"{k}.weight"], q[f"{k}.weight"].float() * q[f"{k}.scale_weight"])
    assert next(L.load_umt5(files["umt5_fp8"].path)[0].parameters()).dtype == torch.bfloat16  # fp8 -> bf16


def test_umt5_fp16_keeps_wo_in_fp32(files):
    model, _ = L.load_umt5(files["umt5"].path, dtype=torch.float16)
    dense = model.encoder.block[0].layer[1].DenseReluDense
    assert dense.wo.weight.dtype == torch.float32 and dense.wi_0.weight.dtype == torch.float16


def test_umt5_folders_and_tokenizer_sources(files, tmp_path):
    w = cc.write_hf_umt5(tmp_path / "pipe")
    for path in (tmp_path / "pipe" / "text_encoder", tmp_path / "pipe"):
        model, tok = L.load_umt5(path, dtype=torch.float32)
        _assert_state(model, w.reference)
        assert tok("a man talks").input_ids[-1] == 1
    w2 = cc.write_hf_umt5(tmp_path / "pipe2", tokenizer="spiece")
    model, tok = L.load_umt5(tmp_path / "pipe2", dtype=torch.float32)
    assert tok("smiles").input_ids == files_tok_ids(tok, "smiles")
    # a file without spiece_model and nothing beside it: a precise error ...
    bare = cc.write_comfy_umt5(tmp_path / "bare" / "umt5_no_tok.safetensors", with_tokenizer=False)
    with pytest.raises(WeightsError) as err:
        L.load_umt5(bare.path)
    msg = str(err.value)
    assert "google/umt5-xxl" in msg and "Wan-AI/Wan2.2-TI2V-5B-Diffusers" in msg and str(tmp_path / "bare") in msg
    # ... fixed by spiece.model next to the file, by tokenizer=<path>, or by a tokenizer object
    (tmp_path / "bare" / "spiece.model").write_bytes(cc.tiny_spm_bytes())
    _, tok1 = L.load_umt5(bare.path)
    _, tok2 = L.load_umt5(bare.path, tokenizer=tmp_path / "pipe" / "tokenizer")
    _, tok3 = L.load_umt5(bare.path, tokenizer=tok2)
    assert tok3 is tok2
    text = "The woman smiles, waves and nods."
    assert tok1(text).input_ids == tok2(text).input_ids
    with pytest.raises(WeightsError, match="does not exist"):
        L.load_umt5(bare.path, tokenizer=tmp_path / "nowhere")


def files_tok_ids(tok, text):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=cc.tiny_spm_bytes(), add_eos=True).encode(text)


def test_umt5_wrong_kind_and_mismatched_tokenizer(files, tmp_path):
    with pytest.raises(WeightsError, match=r"looks like a wav2vec2-large audio encoder.*umT5-XXL text encoder was expected"):
        L.load_umt5(files["w2v_large"].path)
    small = cc.write_comfy_umt5(tmp_path / "small_vocab.safetensors", vocab_size=16)
    with pytest.raises(WeightsError, match="do not belong together"):
        L.load_umt5(small.path)


# ================================================================================================ wav2vec2
def _hf_wav2vec2(config: dict, weights: dict[str, torch.Tensor]):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(**config)).eval()
    model.load_state_dict(weights, strict=True)
    return model


@pytest.mark.parametrize("key,normalize", [("w2v_large", True), ("w2v_base", False)])
def test_wav2vec2_comfy_files_round_trip(files, key, normalize):
    w = files[key]
    model, info = L.load_wav2vec2(w.path, dtype=torch.float32)
    assert info == {"do_normalize": normalize, "sample_rate": 16000, "num_layers": 2, "hidden_size": 64}
    _assert_state(model, w.reference)
    assert model.config.do_stable_layer_norm is normalize and model.config.conv_bias is normalize
    ref = _hf_wav2vec2(w.config, w.reference)
    audio = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(audio, output_hidden_states=True)
        b = ref(audio, output_hidden_states=True)
    assert len(a.hidden_states) == 3 and a.last_hidden_state.shape == (1, 49, 64)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y)


def test_wav2vec2_hf_layouts(files, tmp_path):
    from safetensors.torch import save_file

    # "wav2vec2." prefix, a CTC head, legacy weight_g/weight_v names and no masked_spec_embed
    w = files["w2v_large"]
    sd = {f"wav2vec2.{k}": v for k, v in w.stored.items() if k != "masked_spec_embed"}
    g = sd.pop("wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0")
    v = sd.pop("wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    sd["wav2vec2.encoder.pos_conv_embed.conv.weight_g"], sd["wav2vec2.encoder.pos_conv_embed.conv.weight_v"] = g, v
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.zeros(32, 64), torch.zeros(32)
    save_file(sd, str(tmp_path / "hf_ctc.safetensors"))
    info = L.identify_checkpoint(tmp_path / "hf_ctc.safetensors")
    assert info.kind == "wav2vec2" and info.layout == "hf" and info.prefix == "wav2vec2."
    model, _ = L.load_wav2vec2(tmp_path / "hf_ctc.safetensors", dtype=torch.float32)
    _assert_state(model, {k: x for k, x in w.reference.items() if k != "masked_spec_embed"})
    assert torch.all(model.masked_spec_embed == 0)
    # a transformers folder: config.json + preprocessor_config.json decide
    wf = cc.write_hf_wav2vec2(tmp_path / "folder", size="base", ctc_head=True, do_normalize=True)
    model, info = L.load_wav2vec2(tmp_path / "folder", dtype=torch.float32)
    assert info["do_normalize"] is True and info["num_layers"] == wf.config["num_hidden_layers"]
    _assert_state(model, wf.reference)


def test_wav2vec2_full_size_configs():
    for size, name in (("large", "wav2vec2_large"), ("base", "wav2vec2_base")):
        hidden, layers = (1024, 24) if size == "large" else (768, 12)
        rows = cc.wav2vec2_layout(size, hidden, layers)
        shapes = dict(rows)
        from actavatar_core.convert import wav2vec2 as w2v

        inferred = w2v.infer_config(shapes, lambda k: shapes[k])
        full = L.local_config(name)
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                  "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
                  "num_conv_pos_embeddings", "num_conv_pos_embedding_groups"):
            assert L._same(inferred[k], full[k]), (size, k)


def test_wav2vec2_wrong_kinds(files):
    with pytest.raises(WeightsError, match=r"looks like a Wan2.2 VAE.*wav2vec2 audio encoder was expected") as err:
        L.load_wav2vec2(files["vae"].path)
    assert "models/audio_encoders" in str(err.value)


def test_whisper_is_refused_by_the_wav2vec2_loader(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.encoder.embed_positions.weight": torch.zeros(10, 1280), "model.encoder.conv1.weight": torch.zeros(8, 4, 3)},
              str(tmp_path / "whisper.safetensors"))
    with pytest.raises(WeightsError, match="Whisper.*wav2vec2"):
        L.load_wav2vec2(tmp_path / "whisper.safetensors")


# ================================================================================================ tokenizer builder
def test_spm_tokenizer_matches_sentencepiece_on_awkward_text():
    import sentencepiece

    data = cc.tiny_spm_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_proto=data, add_eos=True)
    tok = spm_mod.build_tokenizer(data)
    for text in ["a man talks, smiles   to the xyzzy camera 人", "  leading and trailing  ", "ＦＵＬＬ width ①",
                 "Käse\tand\nnewline", "", "QQQ zzz 123 !?", "un homme parle à la caméra."]:
        assert tok(text).input_ids == sp.encode(text), text
    parsed = spm_mod.parse_spm(data)
    assert (parsed.pad_id, parsed.eos_id, parsed.bos_id, parsed.unk_id) == (0, 1, 2, 3)


def test_spm_extra_ids_and_garbage():
    data = cc.tiny_spm_bytes()
    n = len(spm_mod.parse_spm(data).pieces)
    tok = spm_mod.build_tokenizer(data, extra_ids=5)
    assert len(tok) == n + 5
    assert tok.convert_tokens_to_ids("<extra_id_0>") == n + 4 and tok.convert_tokens_to_ids("<extra_id_4>") == n
    with pytest.raises(WeightsError, match="not a valid SentencePiece model"):
        spm_mod.build_tokenizer(b"\xff\xff\xff garbage")


def test_loaded_community_files_save_as_diffusers_folders(files, tmp_path):
    """A model loaded from a ComfyUI file is an ordinary diffusers model: save_pretrained + reload is lossless."""
    tr = L.load_wan_transformer(files["tr_prefix"].path, dtype=torch.float32)
    tr.save_pretrained(str(tmp_path / "transformer"))
    again = L.load_wan_transformer(tmp_path / "transformer")
    _assert_state(again, tr.state_dict())
    vae = L.load_wan_vae(files["vae"].path)
    vae.save_pretrained(str(tmp_path / "vae"))
    _assert_state(L.load_wan_vae(tmp_path / "vae"), vae.state_dict())
    assert set(L.read_state_dict(tmp_path / "vae")) == set(vae.state_dict())


# ================================================================================================ recorded settings
# Files written by ``actavatar export`` record what shapes cannot tell in their metadata (convert/settings.py).
def _resave(path, tensors, **metadata):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path


def test_recorded_head_split_resolves_a_width_shapes_cannot_tell(tmp_path):
    """Width 128 reads as 1 head of 128 (Wan's convention); the mini model is 4 heads of 32."""
    from diffusers import WanTransformer3DModel

    from actavatar_core.convert.settings import settings_metadata

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=48,
                                  out_channels=48, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1).eval()
    renames = wt.original_rename_map(model.state_dict())
    tensors = {"model.diffusion_model." + renames[k]: v for k, v in model.state_dict().items()}
    bare = _resave(tmp_path / "bare.safetensors", tensors)
    recorded = _resave(tmp_path / "recorded.safetensors", tensors,
                       **settings_metadata(wt.MODEL_CLASS, model.config))
    assert L.identify_checkpoint(bare).facts["num_attention_heads"] == 1
    assert L.identify_checkpoint(recorded).facts["num_attention_heads"] == 4
    guessed, loaded = L.load_wan_transformer(bare), L.load_wan_transformer(recorded)
    assert (guessed.config.num_attention_heads, guessed.config.attention_head_dim) == (1, 128)
    assert (loaded.config.num_attention_heads, loaded.config.attention_head_dim) == (4, 32)
    x, t, ctx = _wan_inputs({"in_channels": 48, "text_dim": 32})
    with torch.no_grad():
        want = model(x, t, ctx, return_dict=False)[0]
        torch.testing.assert_close(loaded(x, t, ctx, return_dict=False)[0], want, rtol=0, atol=0)
        assert (guessed(x, t, ctx, return_dict=False)[0] - want).abs().max() > 1e-3  # wrong heads, other output
    # the caller's config still wins over the file's
    assert L.load_wan_transformer(recorded, config={"num_attention_heads": 2}).config.attention_head_dim == 64


def test_recorded_settings_of_another_class_are_ignored_and_damaged_ones_refused(files, tmp_path):
    from actavatar_core.convert.settings import MODEL_CLASS_KEY, MODEL_CONFIG_KEY

    w = files["tr"]
    other = _resave(tmp_path / "other.safetensors", w.stored, **{MODEL_CLASS_KEY: "SomethingElse",
                                                                 MODEL_CONFIG_KEY: '{"num_attention_heads": 8}'})
    assert L.load_wan_transformer(other).config.num_attention_heads == 2
    damaged = _resave(tmp_path / "damaged.safetensors", w.stored, **{MODEL_CLASS_KEY: wt.MODEL_CLASS,
                                                                     MODEL_CONFIG_KEY: "{not json"})
    assert L.identify_checkpoint(damaged).kind == "wan_transformer"  # identification never fails on metadata
    with pytest.raises(WeightsError, match="damaged 'model_config'"):
        L.load_wan_transformer(damaged)
    wrong = _resave(tmp_path / "wrong.safetensors", w.stored, **{MODEL_CLASS_KEY: wt.MODEL_CLASS,
                                                                 MODEL_CONFIG_KEY: '{"num_attention_heads": 3}'})
    with pytest.raises(WeightsError, match="3 heads"):
        L.load_wan_transformer(wrong)


def test_recorded_latent_stats_are_read_back(files, tmp_path):
    from actavatar_core.convert.settings import settings_metadata

    w = files["vae"]
    mean, std = [0.01 * i for i in range(48)], [0.5 + 0.01 * i for i in range(48)]
    path = _resave(tmp_path / "vae.safetensors", w.stored,
                   **settings_metadata(vae_conv.MODEL_CLASS, {"latents_mean": mean, "latents_std": std, "z_dim": 99}))
    vae = L.load_wan_vae(path)
    assert list(vae.config.latents_mean) == mean and list(vae.config.latents_std) == std
    assert vae.config.z_dim == 48  # z_dim is not a recorded setting: the shapes tell it
    _assert_state(vae, w.reference)
    plain = L.load_wan_vae(w.path)  # without metadata: the old behaviour
    assert set(plain.config.latents_mean) == {0.0} and set(plain.config.latents_std) == {1.0}
    for bad in ({"latents_mean": mean[:16]}, {"latents_std": [0.0] * 48}, {"latents_mean": ["x"] * 48}):
        path = _resave(tmp_path / "bad.safetensors", w.stored, **settings_metadata(vae_conv.MODEL_CLASS, bad))
        with pytest.raises(WeightsError, match="latent channels"):
            L.load_wan_vae(path)


def test_recorded_umt5_settings_are_read_back(files, tmp_path):
    from actavatar_core.convert import umt5 as umt5_conv
    from actavatar_core.convert.settings import settings_metadata

    w = files["umt5"]
    path = _resave(tmp_path / "umt5.safetensors", w.stored,
                   **settings_metadata(umt5_conv.MODEL_CLASS, {**w.config, "relative_attention_max_distance": 16,
                                                                "layer_norm_epsilon": 1e-5}))
    model, _ = L.load_umt5(path)
    assert model.config.relative_attention_max_distance == 16 and model.config.layer_norm_epsilon == 1e-5
    assert L.load_umt5(w.path)[0].config.relative_attention_max_distance == 128


def test_recorded_wav2vec2_heads_and_do_normalize_are_read_back(files, tmp_path):
    from actavatar_core.convert import wav2vec2 as w2v_conv
    from actavatar_core.convert.settings import settings_metadata

    w = files["w2v_large"]  # width 64: one 64-wide head by convention
    assert L.load_wav2vec2(w.path)[0].config.num_attention_heads == 1
    meta = settings_metadata(w2v_conv.MODEL_CLASS, {**w.config, "num_attention_heads": 4})
    path = _resave(tmp_path / "w2v.safetensors", w.stored, **meta, do_normalize="false")
    model, info = L.load_wav2vec2(path, dtype=torch.float32)
    assert model.config.num_attention_heads == 4 and info["do_normalize"] is False
    ref = _hf_wav2vec2({**w.config, "num_attention_heads": 4}, w.reference)
    audio = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(audio).last_hidden_state, ref(audio).last_hidden_state)
    path = _resave(tmp_path / "w2v_bad.safetensors", w.stored, do_normalize="maybe")
    with pytest.raises(WeightsError, match="do_normalize=maybe"):
        L.load_wav2vec2(path)


# ================================================================================================ unloadable files
_LOADERS = {"transformer": L.load_wan_transformer, "vae": L.load_wan_vae, "umt5": L.load_umt5,
            "wav2vec2": L.load_wav2vec2}


def _bad_file(kind: str, path) -> None:
    """A weights file that must never reach a library loader: a pickle with code, a truncated safetensors file,
    something that is not weights at all, a torch file holding no dict of tensors, a safetensors file whose
    header is not JSON."""
    from safetensors.torch import save_file

    if kind == "pickle":
        torch.save({"weight": torch.ones(2), "hook": os.getcwd}, path)
    elif kind == "truncated":
        save_file({"weight": torch.ones(256)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "png":
        from PIL import Image

        Image.new("RGB", (4, 4)).save(path, format="PNG")
    elif kind == "list":
        torch.save([torch.ones(2)], path)
    elif kind == "header":
        path.write_bytes((12).to_bytes(8, "little") + b"not a header")
    else:
        raise AssertionError(kind)


_BAD = [("pickle", ".bin", "pickled"), ("pickle", ".pt", "pickled"), ("truncated", ".safetensors", "safetensors"),
        ("png", ".safetensors", "safetensors"), ("png", ".ckpt", "torch tensors file"), ("list", ".pth", "not a dict"),
        ("header", ".safetensors", "safetensors")]


@pytest.mark.parametrize("loader", sorted(_LOADERS))
@pytest.mark.parametrize("kind, suffix, words", _BAD)
@pytest.mark.parametrize("layout", ["single file", "folder", "pipeline root"])
def test_unloadable_files_are_refused_in_every_layout(tmp_path, loader, kind, suffix, words, layout):
    """ComfyUI single files, diffusers/HF model folders (config.json + weights) and pipeline roots: a pickled,
    truncated or foreign file is a WeightsError with the reason and a fix, never a library's traceback."""
    sub = {"transformer": "transformer", "vae": "vae", "umt5": "text_encoder", "wav2vec2": "audio_encoder"}[loader]
    if layout == "single file":
        target = path = tmp_path / f"model{suffix}"
    else:
        folder = tmp_path / sub if layout == "pipeline root" else tmp_path / "model"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        target = folder / f"diffusion_pytorch_model{suffix}"
        path = tmp_path if layout == "pipeline root" else folder
    _bad_file(kind, target)
    with pytest.raises(WeightsError, match=words) as err:
        _LOADERS[loader](path)
    assert err.value.fix and "Fix:" in str(err.value)


def test_check_model_folder_refuses_unsafe_files_in_both_layouts(tmp_path):
    from actavatar_core.bundle import load_model_folder  # noqa: F401 - the loader the CLI runs after the check

    diffusers = tmp_path / "diffusers_layout"
    for part in L.MODEL_FOLDER_PARTS:
        (diffusers / part).mkdir(parents=True)
        (diffusers / part / "config.json").write_text("{}")
    (diffusers / "actavatar_model.json").write_text(json.dumps({"format": "actavatar-model", "version": 1}))
    _bad_file("pickle", diffusers / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickled"):
        L.check_model_folder(diffusers)
    single = tmp_path / "single_files"
    (single / "comfyui" / "vae").mkdir(parents=True)
    (single / "actavatar_model.json").write_text(json.dumps({"layout": "comfyui-files", "files": "comfyui"}))
    _bad_file("truncated", single / "comfyui" / "vae" / "v.safetensors")
    with pytest.raises(WeightsError, match="safetensors"):
        L.check_model_folder(single)
    (single / "actavatar_model.json").write_text("[1, 2")
    with pytest.raises(WeightsError, match="not valid JSON"):
        L.check_model_folder(single)
    (single / "comfyui" / "vae" / "v.safetensors").unlink()
    (single / "comfyui" / "vae" / "v.pkl").write_bytes(b"\x80\x04N.")
    (single / "actavatar_model.json").write_text(json.dumps({"layout": "comfyui-files", "files": "comfyui"}))
    with pytest.raises(WeightsError, match="pickle"):
        L.check_model_folder(single)
    from actavatar_core.defaults import MINI_MODEL_DIR, mini_model_available

    if mini_model_available():  # the shipped model passes
        assert L.check_model_folder(MINI_MODEL_DIR)["layout"] == "comfyui-files"


@pytest.mark.parametrize("kind, suffix, words", _BAD + [("damaged metadata", ".safetensors", "damaged")])
def test_unloadable_actavatar_weights_are_refused(tmp_path, kind, suffix, words):
    from safetensors.torch import save_file

    from actavatar_core.model import read_actavatar_weights

    path = tmp_path / f"actavatar{suffix}"
    if kind == "damaged metadata":
        save_file({"w": torch.ones(2)}, str(path), metadata={"format": "actavatar", "actavatar_config": "{not json"})
        words = "damaged"
    else:
        _bad_file(kind, path)
        words = "safetensors"  # anything but a readable .safetensors file is refused as such
    with pytest.raises(WeightsError, match=words) as err:
        read_actavatar_weights(path)
    assert err.value.fix


@pytest.mark.parametrize("change", [None, {"num_layers": "many"}, {"patch_size": 7}, {"rope_max_seq_len": -1}])
def test_a_damaged_folder_config_is_a_weights_error(files, tmp_path, change):
    import shutil

    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(files["tr"].path, folder / "model.safetensors")
    config = {**files["tr"].config, **(change or {})}
    (folder / "config.json").write_text("[1, 2]" if change is None else json.dumps(config))
    with pytest.raises(WeightsError, match="holds a JSON list" if change is None else "can be built") as err:
        L.load_wan_transformer(folder)
    assert err.value.fix


def test_actavatar_weights_with_an_adapter_config_that_builds_nothing_are_refused(tiny_models, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from actavatar_core.model import build_from_weights, save_actavatar_weights
    from actavatar_core.tiny import TINY_UMT5, tiny_wan_transformer

    path = save_actavatar_weights(tiny_models.transformer, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["actavatar_config"])
    config["audio_window"] = "eight"
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={**meta, "actavatar_config": json.dumps(config)})
    with pytest.raises(WeightsError, match="cannot be built") as err:
        build_from_weights(tiny_wan_transformer(text_dim=TINY_UMT5["d_model"]), tmp_path / "b.safetensors")
    assert err.value.fix
