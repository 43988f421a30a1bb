"""``actavatar_core.bundle``'s single-file export and ``actavatar export``: a trained model written as the five
ComfyUI files and loaded back with the community-file loaders must be the same model (same forward passes, same tokens, same generated frames).

The models are the tiny random ones with what training changes made non-trivial, so that losing any of it in the
files would show: a SentencePiece tokenizer (as the training recipe builds it), non-zero adapter weights, trained
VAE latent stats, and ``do_normalize`` off. The tiny widths also break the conventions the loaders infer configs
from (2 heads of 32 in the transformer, umT5's relative-position range 32), so the metadata is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import community_checkpoints as cc
from actavatar_core import bundle
from actavatar_core import loading as L
from actavatar_core.convert import wan_transformer as wt
from actavatar_core.convert import wan_vae as vae_conv
from actavatar_core.errors import OutputPathError, WeightsError
from actavatar_core.model import is_adapter_key
from actavatar_core.pipeline import ActAvatarPipeline, GenerationRequest
from actavatar_core.sampling import SamplingOptions

torch.set_num_threads(min(2, torch.get_num_threads()))

SCRIPT = "A man talks | 0-0.6s: raises the left hand | 0.6-1.2s: waves the right hand"


def _trained_tiny_models():
    """tiny_models() made to look trained (see the module docstring)."""
    from actavatar_core.convert.spm import build_tokenizer
    from actavatar_core.phases import PhaseScript
    from actavatar_core.bundle import tiny_models
    from actavatar_core.text import DEFAULT_NEGATIVE, assemble_prompt
    from actavatar_core.tiny import tiny_text_encoder
    from actavatar_lab.recipe import train_sentencepiece

    models = tiny_models(seed=0)
    corpus = ["".join(assemble_prompt(PhaseScript.parse(SCRIPT))), DEFAULT_NEGATIVE,
              "A person talks to the camera and raises the left hand."]
    spm = train_sentencepiece(corpus, vocab_size=90)
    models.tokenizer = build_tokenizer(spm, extra_ids=0, model_max_length=128)  # as the recipe does
    models.text_encoder = tiny_text_encoder(len(models.tokenizer), seed=0)
    models.info["spiece_model"] = spm
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for k, p in models.transformer.named_parameters():
            if is_adapter_key(k):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    z = models.vae.config.z_dim
    models.vae.register_to_config(latents_mean=(0.1 * torch.randn(z, generator=g)).tolist(),
                                  latents_std=(0.5 + torch.rand(z, generator=g)).tolist())
    models.audio_config = {"do_normalize": False}
    return models


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(original models, written paths, models loaded back from them): exported once for the module."""
    models = _trained_tiny_models()
    folder = tmp_path_factory.mktemp("comfy_models")
    paths = bundle.export_comfyui_files(models, folder, name="mini_test", dtype=None)
    return models, paths, bundle.load_comfyui_files(paths)


def _request(portrait, speech) -> GenerationRequest:
    """A short clip (1 s at 9 fps = 9 frames, 3 latent frames) so two generations stay cheap on a CPU."""
    audio = {"waveform": torch.from_numpy(speech(1.0, 22050))[None], "sample_rate": 22050}
    return GenerationRequest(image=portrait, audio=audio, phases="A man talks | 0-0.5s: raises the left hand | "
                             "0.5-1s: waves the right hand", width=64, height=64, fps=9,
                             options=SamplingOptions(steps=2, seed=1, paca_mode="routed"))


# ================================================================================================ the files
@pytest.mark.parametrize("part, kind, layout", [
    ("transformer", "wan_transformer", "comfy"), ("vae", "wan22_vae", "original"), ("text_encoder", "umt5", "comfy"),
    ("audio_encoder", "wav2vec2", "comfy"), ("actavatar", "actavatar", "diffusers"),
])
def test_each_file_is_identified_as_its_community_layout(exported, part, kind, layout):
    _, paths, _ = exported
    folder = {"transformer": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders",
              "audio_encoder": "audio_encoders", "actavatar": "actavatar"}[part]
    assert paths[part].parent.name == folder and paths[part].name.startswith("mini_test")
    info = L.identify_checkpoint(paths[part])
    assert (info.kind, info.layout) == (kind, layout), info.description
    if part == "transformer":
        assert info.prefix == "model.diffusion_model."
        # width 64 = 2 heads of 32: only the metadata can tell (shapes alone cannot, Wan's heads are 128 wide)
        assert info.facts["num_attention_heads"] == 2
    if part == "text_encoder":
        assert info.facts["has_tokenizer"]


def test_transformer_file_holds_the_base_weights_in_original_keys(exported):
    models, paths, _ = exported
    with safe_open(str(paths["transformer"]), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.diffusion_model.blocks.1.self_attn.q.weight")
        head = f.get_tensor("model.diffusion_model.head.modulation")
    base = {k for k in models.transformer.state_dict() if not is_adapter_key(k)}
    assert len(keys) == len(base) and all(k.startswith("model.diffusion_model.") for k in keys)
    assert not any(is_adapter_key(k[len("model.diffusion_model."):]) for k in keys)
    assert not any(".attn1." in k or "condition_embedder" in k for k in keys)  # no diffusers names left
    assert torch.equal(q, models.transformer.blocks[1].attn1.to_q.weight.detach())
    assert torch.equal(head, models.transformer.scale_shift_table.detach())


def test_umt5_file_carries_the_sentencepiece_model(exported):
    models, paths, _ = exported
    with safe_open(str(paths["text_encoder"]), "pt") as f:
        spiece = f.get_tensor("spiece_model")
        keys = set(f.keys())
    assert spiece.dtype == torch.uint8 and spiece.numpy().tobytes() == models.info["spiece_model"]
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys  # ComfyUI's T5 has no tied copy


# ================================================================================================ same model back
def test_transformer_forward_is_unchanged(exported):
    models, _, loaded = exported
    a, b = models.transformer, loaded.transformer
    assert type(a) is type(b) and b.config.num_attention_heads == 2 and b.config.attention_head_dim == 32
    assert b.adapter_config() == a.adapter_config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 3, 4, 4, generator=g)
    text = torch.randn(1, 12, a.config.text_dim, generator=g)
    ids = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4])
    audio = torch.randn(1, 3, a.config.audio_window, a.config.audio_num_layers, a.config.audio_feature_dim, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        want = a(x, t, text, phase_ids=ids, audio_features=audio).sample
        got = b(x, t, text, phase_ids=ids, audio_features=audio).sample
        silent = b(x, t, text, phase_ids=ids, audio_features=audio, audio_strength=0.0).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # bit for bit
    assert (silent - want).abs().max() > 1e-4  # the adapter weights matter, so the comparison above could fail


def test_vae_decode_and_latent_stats_are_unchanged(exported):
    models, _, loaded = exported
    assert list(loaded.vae.config.latents_mean) == list(models.vae.config.latents_mean)
    assert list(loaded.vae.config.latents_std) == list(models.vae.config.latents_std)
    z = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(z).sample, models.vae.decode(z).sample, rtol=0, atol=0)


def test_umt5_tokens_and_hidden_states_are_unchanged(exported):
    from actavatar_core.phases import PhaseScript
    from actavatar_core.text import encode_script, tokenize_script

    models, _, loaded = exported
    assert loaded.text_encoder.config.relative_attention_max_distance == 32  # from the metadata (shapes say 128)
    script = PhaseScript.parse(SCRIPT)
    want, got = tokenize_script(models.tokenizer, script), tokenize_script(loaded.tokenizer, script)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.block_ids, want.block_ids)
    assert want.length > 10 and (want.input_ids[0, :want.length] == 3).sum() == 0  # real pieces, no <unk>
    a = encode_script(models.text_encoder, models.tokenizer, script)
    b = encode_script(loaded.text_encoder, loaded.tokenizer, script)
    torch.testing.assert_close(b.embeds, a.embeds, rtol=0, atol=0)  # bit for bit


def test_wav2vec2_features_and_do_normalize_are_unchanged(exported, speech):
    from actavatar_core.audio import encode_audio

    models, _, loaded = exported
    assert loaded.audio_config["do_normalize"] is False  # from the metadata (the layout would say True)
    audio = {"waveform": torch.from_numpy(speech(0.6, 16000))[None], "sample_rate": 16000}
    a = encode_audio(models.audio_encoder, audio, fps=25, do_normalize=False)
    b = encode_audio(loaded.audio_encoder, audio, fps=25, do_normalize=loaded.audio_config["do_normalize"])
    torch.testing.assert_close(b.features, a.features, rtol=0, atol=0)  # bit for bit


def test_generation_is_identical(exported, portrait, speech):
    models, _, loaded = exported
    want = ActAvatarPipeline(models).generate(_request(portrait, speech)).frames
    got = ActAvatarPipeline(loaded).generate(_request(portrait, speech)).frames
    assert want.shape == (9, 64, 64, 3)
    assert np.array_equal(got, want)


# ================================================================================================ precision, CLI
def test_fp16_export_is_half_and_close(exported, tmp_path):
    models, _, _ = exported
    paths = bundle.export_comfyui_files(models, tmp_path, name="half")  # default: fp16, like ComfyUI's releases
    for part in ("transformer", "vae", "text_encoder", "audio_encoder"):
        assert L.identify_checkpoint(paths[part]).dtype == "float16", part
    loaded = bundle.load_comfyui_files(tmp_path, name="half", dtype=torch.float32)
    x = torch.randn(1, 48, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 6, models.transformer.config.text_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = models.transformer(x, torch.tensor([300.0]), text).sample
        got = loaded.transformer(x, torch.tensor([300.0]), text).sample
    assert not torch.equal(got, want)  # really rounded ...
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)  # ... and still the same model


def test_cli_exports_a_model_folder(exported, tmp_path, capsys):
    """The model folder the training recipe writes has the SentencePiece model only as tokenizer/spiece.model."""
    from actavatar_core.cli import main
    from actavatar_core.training.runs import export_model

    models, _, _ = exported
    export_model(models, tmp_path / "model", info={"name": "cli test"})
    rc = main(["export", "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--name", "cli",
               "--dtype", "fp32"])
    assert rc == 0, capsys.readouterr().err
    assert "diffusion_models" in capsys.readouterr().out
    loaded = bundle.load_comfyui_files(tmp_path / "out", name="cli")
    assert loaded.info["spiece_model"] == models.info["spiece_model"]
    assert L.identify_checkpoint(tmp_path / "out" / "vae" / "cli_vae.safetensors").dtype == "float32"
    assert main(["export", "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--name", "cli"]) == 2
    assert "already exists" in capsys.readouterr().err


# ================================================================================================ refusals
def test_refusals_leave_nothing_behind(exported, tmp_path):
    models, _, _ = exported
    info = dict(models.info)
    try:
        models.info.pop("spiece_model")
        with pytest.raises(WeightsError, match="SentencePiece"):
            bundle.export_comfyui_files(models, tmp_path / "a", dtype=None)
        models.info["spiece_model"] = cc.tiny_spm_bytes()  # a different SentencePiece model
        with pytest.raises(WeightsError, match="does not tokenize like"):
            bundle.export_comfyui_files(models, tmp_path / "a", dtype=None)
    finally:
        models.info.clear()
        models.info.update(info)
    assert not (tmp_path / "a").exists()
    with pytest.raises(OutputPathError, match="file name"):
        bundle.export_comfyui_files(models, tmp_path / "b", name="../escape")
    target = tmp_path / "c" / "vae" / "mini_vae.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="already exists"):
        bundle.export_comfyui_files(models, tmp_path / "c", name="mini")
    assert target.read_bytes() == b"keep me" and not (tmp_path / "c" / "diffusion_models").exists()


# ================================================================================================ inverse renames
def test_inverse_renames_match_comfyui_layouts(tmp_path):
    """The writers' names come from ComfyUI's model classes (parity-tested), not from our rename rules."""
    tr = cc.write_comfy_wan_transformer(tmp_path / "t.safetensors", num_layers=2)
    want = {d: o for o, d in tr.diffusers_names.items()}
    assert wt.original_rename_map(want) == want
    vae = cc.write_comfy_wan22_vae(tmp_path / "v.safetensors", num_res_blocks=2)
    want = {d: o for o, d in vae.diffusers_names.items()}
    assert vae_conv.original22_rename_map(want) == want
    with pytest.raises(ValueError, match="round trip"):
        wt.original_rename_map(["blocks.0.attn1.to_q.weight", "blocks.0.self_attn.k.weight"])  # already original


def test_a_half_precision_model_folder_trains_and_scores_in_float32(exported, tmp_path):
    """The bundled mini model is stored in fp16: fine-tuning from it must keep float32 parameters (AdamW's small
    updates vanish in half precision), and the default loader computes in float32."""
    from types import SimpleNamespace

    from actavatar_core.cli import main
    from actavatar_core.training.runs import export_model, load_models

    models, _, _ = exported
    export_model(models, tmp_path / "model", info={"name": "half test"})
    assert main(["export", "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "half" / "comfyui"),
                 "--name", "half", "--dtype", "fp16", "--index"]) == 0
    assert L.identify_checkpoint(tmp_path / "half" / "comfyui" / "diffusion_models" / "half_transformer.safetensors").dtype == "float16"
    assert bundle.load_model_folder(tmp_path / "half").transformer.patch_embedding.weight.dtype == torch.float16  # as stored
    loaded, transformer = load_models(SimpleNamespace(models={"init": "folder", "folder": str(tmp_path / "half")}))
    for module in (transformer, loaded.vae, loaded.text_encoder, loaded.audio_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
