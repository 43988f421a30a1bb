"""Test-only ComfyUI pack (never shipped): tiny stand-ins for core's CLIPLoader, VAELoader, CLIPVisionLoader and
AudioEncoderLoader.

Core's CLIPLoader (type wan), VAELoader (Wan2.2), CLIPVisionLoader (ViT-H) and AudioEncoderLoader (wav2vec2) build
the full-size umT5-XXL, Wan2.2 VAE, ViT-H and wav2vec2 whatever the file holds, so a real-server run of the native workflows on CPU loads tiny files
through these nodes instead. They build core's own objects (``comfy.sd.CLIP`` with Wan's tokenizer and ComfyUI's T5
class, ``comfy.sd.VAE`` with ComfyUI's Wan2.2 ``WanVAE``, core's ``ClipVisionModel``, core's ``AudioEncoderModel`` with its ``Wav2Vec2Model``) with
the sizes read from the file, so every node downstream sees what it sees with the real files.
"""

from __future__ import annotations

import contextlib
import re
import types

import torch


def _umt5_config(sd: dict) -> dict:
    """ComfyUI's T5 config of a umT5 state dict (widths, depth and heads read from the tensors)."""
    vocab, d_model = sd["shared.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    return dict(d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0], d_kv=inner // heads,
                d_model=d_model, num_heads=heads, num_layers=layers, vocab_size=vocab,
                dense_act_fn="gelu_pytorch_tanh", is_gated_act=True, model_type="umt5", layer_norm_epsilon=1e-6,
                relative_attention_num_buckets=32, relative_attention_max_distance=128)


def load_tiny_wan_clip(path: str) -> object:
    """core's CLIP object for a tiny umT5 file (with its ``spiece_model``), as CLIPLoader type wan makes it."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.t5
    import comfy.text_encoders.wan as wan_te
    import comfy.utils

    sd = comfy.utils.load_torch_file(path)
    spm = sd.pop("spiece_model")
    config = _umt5_config(sd)

    class TinyUMT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=config,
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyWanTE(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="umt5xxl",
                             clip_model=TinyUMT5)

    target = types.SimpleNamespace(clip=TinyWanTE, tokenizer=wan_te.WanT5Tokenizer, params={})
    clip = comfy.sd.CLIP(target=target, tokenizer_data={"spiece_model": spm}, model_options={"dtype": torch.float32})
    missing, unexpected = clip.load_sd(sd)
    if unexpected:
        raise ValueError(f"tiny umT5 {path}: unexpected keys {unexpected[:5]}")
    return clip


def load_tiny_wan22_vae(path: str) -> object:
    """core's VAE object for a tiny Wan2.2 VAE file: core's detection and WanVAE class, the widths from the file."""
    import comfy.ldm.wan.vae2_2 as vae2_2
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(path)
    dim = sd["encoder.conv1.weight"].shape[0]
    dec_dim = sd["decoder.head.0.gamma"].shape[0] if "decoder.head.0.gamma" in sd else dim
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual", k))}
    original = vae2_2.WanVAE

    def tiny(**cfg):  # core fixes the full-size widths; this file's go in instead
        return original(**{**cfg, "dim": dim, "dec_dim": dec_dim, "num_res_blocks": len(blocks)})

    with contextlib.ExitStack() as stack:
        vae2_2.WanVAE = tiny
        stack.callback(setattr, vae2_2, "WanVAE", original)
        vae = comfy.sd.VAE(sd=sd)
    vae.throw_exception_if_invalid()
    return vae


def load_tiny_wav2vec2(path: str) -> object:
    """core's audio encoder object for a tiny wav2vec2 file (wav2vec2-large's layout; width and depth from the file)."""
    import comfy.audio_encoders.audio_encoders as ae
    import comfy.audio_encoders.wav2vec2 as w2v
    import comfy.utils

    sd = comfy.utils.load_torch_file(path)
    width = sd["encoder.layer_norm.bias"].shape[0]
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    ffn = sd.get("encoder.layers.0.feed_forward.intermediate_dense.weight")
    original = w2v.TransformerEncoder

    def tiny(*args, **cfg):  # core fixes the feed-forward at 4x the width; this file's goes in instead
        return original(*args, **{**cfg, "mlp_ratio": ffn.shape[0] / width if ffn is not None else 4.0})

    large = width == 1024  # as core's loader: wav2vec2-large's layout, else the chinese base model's
    with contextlib.ExitStack() as stack:
        w2v.TransformerEncoder = tiny
        stack.callback(setattr, w2v, "TransformerEncoder", original)
        encoder = ae.AudioEncoderModel({"model_type": "wav2vec2", "embed_dim": width, "num_heads": max(1, width // 64),
                                        "num_layers": layers, "conv_norm": large, "conv_bias": large,
                                        "do_normalize": large, "do_stable_layer_norm": large})
    missing, unexpected = encoder.load_sd(sd)
    if missing or unexpected:
        raise ValueError(f"tiny wav2vec2 {path}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return encoder


def load_tiny_clip_vision(path: str) -> object:
    """core's CLIP vision object for a tiny ViT file (ViT-H's layout: 1280 wide as Wan reads it; depth and
    feed-forward width from the file)."""
    import comfy.clip_vision
    import comfy.utils

    sd = comfy.utils.load_torch_file(path)
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))})
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "image_size": 224,
              "hidden_size": sd["vision_model.post_layernorm.weight"].shape[0],
              "intermediate_size": sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
              "num_channels": 3, "num_hidden_layers": layers, "patch_size": 14,
              "projection_dim": sd["visual_projection.weight"].shape[0]}
    model = comfy.clip_vision.ClipVisionModel(config)
    missing, _ = model.load_sd(sd)
    if missing:
        raise ValueError(f"tiny CLIP vision {path}: missing {list(missing)[:5]}")
    return model


class ActAvatarTestTinyCLIPVisionLoader:
    CATEGORY = "ActAvatar/test"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    def load(self, clip_name):
        import folder_paths

        return (load_tiny_clip_vision(folder_paths.get_full_path_or_raise("clip_vision", clip_name)),)


class ActAvatarTestTinyAudioEncoderLoader:
    CATEGORY = "ActAvatar/test"
    RETURN_TYPES = ("AUDIO_ENCODER",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"audio_encoder_name": (folder_paths.get_filename_list("audio_encoders"),)}}

    def load(self, audio_encoder_name):
        import folder_paths

        return (load_tiny_wav2vec2(folder_paths.get_full_path_or_raise("audio_encoders", audio_encoder_name)),)


class ActAvatarTestTinyWanCLIPLoader:
    CATEGORY = "ActAvatar/test"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    def load(self, clip_name):
        import folder_paths

        return (load_tiny_wan_clip(folder_paths.get_full_path_or_raise("text_encoders", clip_name)),)


class ActAvatarTestTinyWanVAELoader:
    CATEGORY = "ActAvatar/test"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),)}}

    def load(self, vae_name):
        import folder_paths

        return (load_tiny_wan22_vae(folder_paths.get_full_path_or_raise("vae", vae_name)),)


NODE_CLASS_MAPPINGS = {"ActAvatarTestTinyWanCLIPLoader": ActAvatarTestTinyWanCLIPLoader,
                       "ActAvatarTestTinyWanVAELoader": ActAvatarTestTinyWanVAELoader,
                       "ActAvatarTestTinyAudioEncoderLoader": ActAvatarTestTinyAudioEncoderLoader,
                       "ActAvatarTestTinyCLIPVisionLoader": ActAvatarTestTinyCLIPVisionLoader}
