"""What a weights file looks like, from its key names and shapes alone (no tensor data is read).

Used two ways: the loaders refuse a file of the wrong kind with a message that names what the file *is*
("this file looks like a Wan2.1 VAE (16 latent channels)"), and the nodes/CLI can describe a user's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import umt5 as umt5_conv
from . import wan_transformer as wt
from . import wan_vae as vae_conv
from . import wav2vec2 as w2v_conv
from .settings import read_settings
from .source import FP8_DTYPES

KINDS = ("wan_transformer", "wan22_vae", "wan21_vae", "umt5", "wav2vec2", "whisper", "actavatar", "clip_vision",
         "unknown")

Metas = dict[str, tuple[tuple[int, ...], "torch.dtype | None"]]


@dataclass
class CheckpointInfo:
    """The verdict on one file: its kind, key layout, a human description and the facts read from shapes."""

    kind: str
    layout: str | None
    description: str
    facts: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    fp8_scaled: bool = False
    prefix: str = ""
    config: dict[str, Any] | None = None
    path: str | None = None

    def __str__(self) -> str:
        return self.description


def dominant_dtype(metas: Metas) -> str | None:
    """The floating dtype holding most elements (fp8 files report their fp8 dtype)."""
    counts: dict[torch.dtype, int] = {}
    for shape, dtype in metas.values():
        if dtype is not None and (dtype.is_floating_point or dtype in FP8_DTYPES):
            counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    if not counts:
        return None
    return str(max(counts, key=counts.get)).replace("torch.", "")


def _has(keys: set[str], *needles: str) -> bool:
    return any(any(n in k for n in needles) for k in keys)


def identify(metas: Metas, metadata: dict[str, str] | None = None, *, quant_style: str | None = None) -> CheckpointInfo:
    """Classify a file from ``metas`` (name -> (shape, dtype)) and its safetensors metadata."""
    keys = set(metas)
    metadata = metadata or {}
    shape_of: Callable[[str], tuple] = lambda k: metas[k][0]  # noqa: E731
    dtype = dominant_dtype({k: v for k, v in metas.items() if k != umt5_conv.TOKENIZER_KEY})
    common = dict(dtype=dtype, fp8_scaled=quant_style is not None)

    def info(kind: str, layout: str | None, description: str, prefix: str = "", **facts: Any) -> CheckpointInfo:
        config = facts.pop("config", None)
        return CheckpointInfo(kind, layout, description, facts, prefix=prefix, config=config, **common)

    # ActAvatar weights (model.py writes format=actavatar in the metadata; keys are diffusers-style)
    if metadata.get("format") == "actavatar" or _has(keys, ".audio_attn.", ".norm_audio.") or any(
            k.startswith("phase_embedding.") for k in keys):
        contents = metadata.get("contents", "adapter")
        return info("actavatar", "diffusers", f"an ActAvatar weights file ({contents})", contents=contents)

    # Wan transformer (original/ComfyUI or diffusers keys)
    prefix = wt.find_prefix(keys)
    if prefix is not None:
        bare = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        bare_metas = {k[len(prefix):]: v for k, v in metas.items() if k.startswith(prefix)}
        layout = wt.layout_of(bare)
        variant = wt.variant_of(bare)
        file_layout = "diffusers" if layout == "diffusers" else ("comfy" if prefix else "original")
        try:
            config = wt.infer_config(bare, lambda k: bare_metas[k][0], layout)
        except KeyError as exc:
            return info("wan_transformer", file_layout, f"an incomplete Wan transformer (no {exc})", prefix,
                        variant=variant)
        # An exported file records the head split its width cannot tell (e.g. 4 heads of 32 in width 128).
        config.update(read_settings(metadata, wt.MODEL_CLASS, wt.FILE_SETTINGS, strict=False))
        dim = int(bare_metas["patch_embedding.weight"][0][0])
        description = variant or wt.describe(config, dim)
        return info("wan_transformer", file_layout, description, prefix, variant=variant, dim=dim,
                    num_layers=config["num_layers"], ffn_dim=config["ffn_dim"], in_channels=config["in_channels"],
                    out_channels=config["out_channels"], text_dim=config["text_dim"], freq_dim=config["freq_dim"],
                    patch_size=config["patch_size"], num_attention_heads=config["num_attention_heads"],
                    ti2v=config["in_channels"] == 48 and config["out_channels"] == 48, config=config)

    # Wan VAE (and other VAEs, for the message)
    prefix = vae_conv.find_prefix(keys)
    if prefix is not None:
        bare_metas = {k[len(prefix):]: v for k, v in metas.items() if k.startswith(prefix)}
        bare = set(bare_metas)
        layout = vae_conv.layout_of(bare)
        gamma = any(k.endswith(".gamma") for k in bare)
        if layout != "diffusers" or gamma:
            z_key = "conv2.weight" if layout.endswith("original") else "post_quant_conv.weight"
            z = int(bare_metas[z_key][0][0]) if z_key in bare_metas else None
            wan22 = layout == "wan22_original" or (layout == "diffusers" and vae_conv.is_residual_diffusers(bare))
            file_layout = "original" if layout.endswith("original") else "diffusers"
            if wan22 and z != 16:
                config = None
                if file_layout == "diffusers":
                    try:
                        config = vae_conv.infer_config(bare, lambda k: bare_metas[k][0])
                    except KeyError:
                        config = None
                return info("wan22_vae", file_layout, f"a Wan2.2 VAE ({z} latent channels)", prefix, z_dim=z,
                            config=config)
            return info("wan21_vae", file_layout, f"a Wan2.1 VAE ({z} latent channels)", prefix, z_dim=z)
    if _has(keys, "decoder.mid.block_1.norm1.weight", "decoder.mid_block.resnets.0.norm1.weight"):
        z_keys = [k for k in keys if k.endswith(("post_quant_conv.weight",))]
        z = metas[z_keys[0]][0][0] if z_keys else None
        return info("unknown", None, f"an image VAE (SD/SDXL/Flux style{f', {z} latent channels' if z else ''}), "
                    "not a Wan video VAE")

    # umT5 / T5
    prefix = umt5_conv.find_prefix(keys)
    if prefix is not None and f"{prefix}encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        bare_metas = {k[len(prefix):]: v for k, v in metas.items() if k.startswith(prefix)}
        bare = set(bare_metas)
        try:
            config = umt5_conv.infer_config(bare, lambda k: bare_metas[k][0])
        except KeyError as exc:
            return info("unknown", None, f"an incomplete T5-family text encoder (no {exc})")
        if not umt5_conv.is_umt5(bare):
            return info("unknown", "hf", f"a T5 text encoder ({config['num_layers']} layers, width "
                        f"{config['d_model']}; t5xxl as used by Flux/SD3/LTX), not umT5", prefix)
        has_tok = umt5_conv.TOKENIZER_KEY in keys
        file_layout = "comfy" if has_tok or quant_style else "hf"
        size = "umT5-XXL" if config["d_model"] == 4096 and config["num_layers"] == 24 else "umT5"
        quant = " (fp8 scaled)" if quant_style else ""
        return info("umt5", file_layout, f"a {size} text encoder{quant} ({config['num_layers']} layers, width "
                    f"{config['d_model']})", prefix, d_model=config["d_model"], num_layers=config["num_layers"],
                    num_heads=config["num_heads"], d_ff=config["d_ff"], vocab_size=config["vocab_size"],
                    has_tokenizer=has_tok, config=config)

    # wav2vec2
    prefix = w2v_conv.find_prefix(keys)
    if prefix is not None:
        bare_metas = {}
        for k, v in metas.items():
            if k.startswith(prefix):
                mk = w2v_conv.model_key(k[len(prefix):])
                if mk is not None:
                    bare_metas[mk] = v
        try:
            config = w2v_conv.infer_config(set(bare_metas), lambda k: bare_metas[k][0])
        except KeyError as exc:
            return info("unknown", None, f"an incomplete wav2vec2-style audio encoder (no {exc})")
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        flavour = "large" if config["do_stable_layer_norm"] else "base"
        file_layout = "hf" if prefix or _has(keys, "lm_head.", "quantizer.") else "comfy"
        return info("wav2vec2", file_layout, f"a wav2vec2-{flavour} audio encoder ({layers} layers, width {hidden})",
                    prefix, hidden_size=hidden, num_layers=layers, flavour=flavour, config=config)

    # Whisper (HuMo's audio encoder)
    if any(k.endswith("encoder.embed_positions.weight") for k in keys) and any(
            k.endswith("encoder.conv1.weight") for k in keys):
        width = next(metas[k][0][-1] for k in keys if k.endswith("encoder.embed_positions.weight"))
        size = "large-v3 " if width == 1280 else ""
        return info("whisper", "hf", f"a Whisper {size}audio encoder (as used by Wan HuMo)", width=width)

    # CLIP vision
    if _has(keys, "vision_model.encoder.layers.0.", "visual.transformer.resblocks.0.") or any(
            k.endswith("vision_model.embeddings.patch_embedding.weight") for k in keys):
        widths = [metas[k][0][0] for k in keys if k.endswith(("post_layernorm.weight", "visual.ln_post.weight"))]
        name = {1280: " ViT-H (clip_vision_h)", 1024: " ViT-L", 1664: " ViT-bigG"}.get(widths[0] if widths else 0, "")
        return info("clip_vision", "hf", f"a CLIP vision encoder{name}", width=widths[0] if widths else None)

    # Everything else, named as well as we can so the error message helps.
    return info("unknown", None, _describe_other(keys, metas))


def _describe_other(keys: set[str], metas: Metas) -> str:
    if _has(keys, "lora_A", "lora_B", "lora_down", "lora_up", ".lora."):
        return "a LoRA"
    if _has(keys, "double_blocks.0.img_attn.qkv.weight"):
        return "a Flux transformer"
    if _has(keys, "joint_blocks.0.x_block.attn.qkv.weight"):
        return "an SD3 transformer"
    if _has(keys, "input_blocks.0.0.weight"):
        sdxl = _has(keys, "label_emb.0.0.weight", "conditioner.embedders.1")
        full = _has(keys, "cond_stage_model.", "conditioner.embedders", "first_stage_model.")
        arch = "SDXL" if sdxl else "Stable Diffusion 1.x/2.x"
        return f"an {arch} checkpoint" if full else f"an {arch} UNet"
    if _has(keys, "transformer_blocks.0.attn.to_q.weight") and _has(keys, "scale_shift_table"):
        return "a PixArt/LTX-style diffusion transformer"
    if _has(keys, "text_model.encoder.layers.0.", "transformer.resblocks.0.", "text_projection"):
        return "a CLIP text encoder"
    if _has(keys, "model.layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.weight"):
        return "a language-model text encoder (Llama/Qwen/Gemma style)"
    first = ", ".join(sorted(keys)[:3])
    return f"an unrecognised weights file ({len(keys)} tensors, e.g. {first})"
