"""Wan transformer files: original/ComfyUI keys <-> diffusers keys, and the diffusers config from shapes.

Layouts seen in the wild:

* **original** Wan keys (``patch_embedding``, ``blocks.N.self_attn.q``, ``head.head`` ...), the layout of the
  official ``.pth``/safetensors releases and of ComfyUI's ``wan2.2_ti2v_5B_fp16.safetensors`` (ComfyUI's
  ``comfy/ldm/wan/model.py:WanModel`` has exactly these parameter names);
* the same behind ``model.diffusion_model.`` (files saved from a whole ComfyUI model);
* **diffusers** keys (``condition_embedder.*``, ``blocks.N.attn1.to_q`` ...), single file or folder.

The rename itself is diffusers' own (``convert_wan_transformer_to_diffusers``) when importable; a local table with
the same rules is the fallback and is tested to agree with it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable

ShapeOf = Callable[[str], tuple]

#: Wan's convention: every released Wan transformer (1.3B, 5B, 14B) uses 128-wide attention heads.
WAN_HEAD_DIM = 128

#: Keys that mark Wan variants diffusers' WanTransformer3DModel cannot hold (checked after prefix stripping).
VARIANT_MARKERS: tuple[tuple[str, str], ...] = (
    ("casual_audio_encoder.", "a Wan2.2 S2V (speech-to-video) transformer"),
    ("audio_injector.", "a Wan2.2 S2V (speech-to-video) transformer"),
    ("vace_blocks.", "a Wan VACE transformer"),
    ("vace_patch_embedding.", "a Wan VACE transformer"),
    ("motion_encoder.", "a Wan2.2 Animate transformer"),
    ("face_adapter.", "a Wan2.2 Animate transformer"),
    ("pose_patch_embedding.", "a Wan2.2 Animate transformer"),
    ("control_adapter.", "a Wan camera-control (Fun) transformer"),
    ("audio_proj.", "a Wan HuMo (audio) transformer"),
    ("ref_conv.", "a Wan Fun-control transformer (reference-image conv)"),
)

ORIGINAL_MARKER = "patch_embedding.weight"

#: The class whose config :mod:`.settings` records in exported files' metadata.
MODEL_CLASS = "WanTransformer3DModel"
#: Config entries the shapes cannot tell (the head split of the width, epsilon, RoPE table length): read from the
#: file's metadata when it records them (see :mod:`.settings`).
FILE_SETTINGS = ("num_attention_heads", "attention_head_dim", "eps", "rope_max_seq_len")


def find_prefix(keys: Iterable[str]) -> str | None:
    """The prefix in front of the transformer keys ('' for none, 'model.diffusion_model.' for ComfyUI saves)."""
    keys = list(keys)
    best = None
    for k in keys:
        if k.endswith(ORIGINAL_MARKER):
            p = k[: -len(ORIGINAL_MARKER)]
            if (p == "" or p.endswith(".")) and (best is None or len(p) < len(best)):
                best = p
    if best is None:
        return None
    return best if any(k.startswith(best + "blocks.0.") for k in keys) else None


def layout_of(keys: Iterable[str]) -> str:
    """'diffusers' or 'original' for prefix-free keys."""
    keys = set(keys)
    if "condition_embedder.time_embedder.linear_1.weight" in keys or "blocks.0.attn1.to_q.weight" in keys:
        return "diffusers"
    return "original"


def variant_of(keys: Iterable[str]) -> str | None:
    """Words for a Wan variant that diffusers' plain ``WanTransformer3DModel`` cannot hold, or None."""
    for k in keys:
        for marker, description in VARIANT_MARKERS:
            if k.startswith(marker):
                return description
    return None


def num_blocks(keys: Iterable[str], prefix: str = "blocks.") -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pat.match(k))]
    return max(found) + 1 if found else 0


# ---------------------------------------------------------------------------------------------- config
def infer_config(keys: Iterable[str], shape_of: ShapeOf, layout: str) -> dict[str, Any]:
    """The diffusers ``WanTransformer3DModel`` config from prefix-free keys and their shapes.

    ``num_attention_heads`` is ``dim // 128`` (Wan's convention); for a width that is not a multiple of 128 it is
    left ``None`` and the caller must supply it.
    """
    keys = set(keys)
    pe = shape_of("patch_embedding.weight")
    dim, in_channels, patch = pe[0], pe[1], tuple(int(x) for x in pe[2:])
    if layout == "diffusers":
        ffn = shape_of("blocks.0.ffn.net.0.proj.weight")[0]
        text_dim = shape_of("condition_embedder.text_embedder.linear_1.weight")[1]
        freq_dim = shape_of("condition_embedder.time_embedder.linear_1.weight")[1]
        out_flat = shape_of("proj_out.weight")[0]
        cross_attn_norm = "blocks.0.norm2.weight" in keys
        qk_norm = "blocks.0.attn1.norm_q.weight" in keys
        image_dim = shape_of("condition_embedder.image_embedder.norm1.weight")[0] \
            if "condition_embedder.image_embedder.norm1.weight" in keys else None
        added_kv = shape_of("blocks.0.attn2.add_k_proj.weight")[1] if "blocks.0.attn2.add_k_proj.weight" in keys else None
        pos_embed = shape_of("condition_embedder.image_embedder.pos_embed")[1] \
            if "condition_embedder.image_embedder.pos_embed" in keys else None
    else:
        ffn = shape_of("blocks.0.ffn.0.weight")[0]
        text_dim = shape_of("text_embedding.0.weight")[1]
        freq_dim = shape_of("time_embedding.0.weight")[1]
        out_flat = shape_of("head.head.weight")[0]
        cross_attn_norm = "blocks.0.norm3.weight" in keys
        qk_norm = "blocks.0.self_attn.norm_q.weight" in keys
        image_dim = shape_of("img_emb.proj.0.weight")[0] if "img_emb.proj.0.weight" in keys else None
        added_kv = shape_of("blocks.0.cross_attn.k_img.weight")[1] if "blocks.0.cross_attn.k_img.weight" in keys else None
        pos_embed = shape_of("img_emb.emb_pos")[1] if "img_emb.emb_pos" in keys else None
    heads = dim // WAN_HEAD_DIM if dim % WAN_HEAD_DIM == 0 else None
    return dict(
        patch_size=patch,
        num_attention_heads=heads,
        attention_head_dim=WAN_HEAD_DIM if heads else None,
        in_channels=int(in_channels),
        out_channels=int(out_flat // math.prod(patch)),
        text_dim=int(text_dim),
        freq_dim=int(freq_dim),
        ffn_dim=int(ffn),
        num_layers=num_blocks(keys),
        cross_attn_norm=bool(cross_attn_norm),
        qk_norm="rms_norm_across_heads" if qk_norm else None,
        eps=1e-6,
        image_dim=int(image_dim) if image_dim else None,
        added_kv_proj_dim=int(added_kv) if added_kv else None,
        rope_max_seq_len=1024,
        pos_embed_seq_len=int(pos_embed) if pos_embed else None,
    )


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any] | None, dim: int) -> dict[str, Any]:
    """Merge caller overrides; keep heads x head_dim equal to the width found in the file."""
    config = dict(config)
    overrides = dict(overrides or {})
    for k, v in overrides.items():
        if k.startswith("_"):
            continue
        config[k] = tuple(v) if k == "patch_size" else v
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if "num_attention_heads" in overrides and "attention_head_dim" not in overrides and heads:
        config["attention_head_dim"] = dim // int(heads)
    elif "attention_head_dim" in overrides and "num_attention_heads" not in overrides and head_dim:
        config["num_attention_heads"] = dim // int(head_dim)
    return config


# ---------------------------------------------------------------------------------------------- renames
_OWN_RULES: tuple[tuple[str, str], ...] = (
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^(blocks\.\d+)\.self_attn\.", r"\1.attn1."),
    (r"^(blocks\.\d+)\.cross_attn\.", r"\1.attn2."),
    (r"^(blocks\.\d+\.attn[12])\.q\.", r"\1.to_q."),
    (r"^(blocks\.\d+\.attn[12])\.k\.", r"\1.to_k."),
    (r"^(blocks\.\d+\.attn[12])\.v\.", r"\1.to_v."),
    (r"^(blocks\.\d+\.attn[12])\.o\.", r"\1.to_out.0."),
    (r"^(blocks\.\d+\.attn2)\.k_img\.", r"\1.add_k_proj."),
    (r"^(blocks\.\d+\.attn2)\.v_img\.", r"\1.add_v_proj."),
    (r"^(blocks\.\d+\.attn2)\.norm_k_img\.", r"\1.norm_added_k."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),   # original norm3 (cross-attn, affine) is diffusers' norm2
    (r"^(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"^(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
)
_OWN_COMPILED = tuple((re.compile(a), b) for a, b in _OWN_RULES)


def own_rename(key: str) -> str:
    """The local original -> diffusers rename (fallback for diffusers' converter)."""
    for pat, rep in _OWN_COMPILED:
        key = pat.sub(rep, key)
    return key


def diffusers_rename_map(keys: Iterable[str]) -> dict[str, str] | None:
    """{diffusers key: original key} computed by diffusers' own converter, or None when it is not available.

    The converter only renames plain Wan keys (it touches tensor values only for Animate keys, which are refused
    before this point), so it is run on a dict whose values are the old key names.
    """
    try:
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    except Exception:  # noqa: BLE001 - older/newer diffusers without it: use the local table
        return None
    keys = list(keys)
    try:
        converted = convert_wan_transformer_to_diffusers({k: k for k in keys})
    except Exception:  # noqa: BLE001
        return None
    if not all(isinstance(v, str) for v in converted.values()) or len(converted) != len(keys):
        return None
    return dict(converted)


def rename_map(keys: Iterable[str], layout: str, prefix: str = "") -> dict[str, str]:
    """{diffusers key: key in the file} for all model keys of a (possibly prefixed) Wan transformer file."""
    keys = [k for k in keys if k.startswith(prefix)]
    bare = {k[len(prefix):]: k for k in keys}
    if layout == "diffusers":
        return dict(bare)
    theirs = diffusers_rename_map(bare)
    if theirs is not None:
        return {new: bare[old] for new, old in theirs.items()}
    return {own_rename(k): full for k, full in bare.items()}


def describe(config: dict[str, Any], dim: int) -> str:
    """Words for a plain Wan transformer of this config (``dim``: the width found in the file)."""
    layers, cin = config["num_layers"], config["in_channels"]
    if config.get("image_dim"):
        kind = "image-to-video (with CLIP image branch)"
    elif cin == 36:
        kind = "image-to-video"
    else:
        kind = None
    if dim == 3072 and layers == 30 and cin == 48:
        return "a Wan2.2 TI2V-5B transformer (48 latent channels)"
    if dim == 1536 and layers == 30:
        return f"a Wan2.1 1.3B transformer ({cin} latent channels)"
    if dim == 5120 and layers == 40:
        what = kind or "text-to-video"
        return f"a Wan 14B {what} transformer ({cin} input channels; Wan2.1 14B or a Wan2.2 A14B expert)"
    return f"a Wan transformer (width {dim}, {layers} layers, {cin} input channels)"


# ---------------------------------------------------------------------------------------------- export (inverse)
#: diffusers -> original rules, the inverse of :data:`_OWN_RULES` (applied in order, each at most once).
_INVERSE_RULES: tuple[tuple[str, str], ...] = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
    (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_q\.", r"\1.q."),
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_k\.", r"\1.k."),
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_v\.", r"\1.v."),
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.to_out\.0\.", r"\1.o."),
    (r"^(blocks\.\d+\.cross_attn)\.add_k_proj\.", r"\1.k_img."),
    (r"^(blocks\.\d+\.cross_attn)\.add_v_proj\.", r"\1.v_img."),
    (r"^(blocks\.\d+\.cross_attn)\.norm_added_k\.", r"\1.norm_k_img."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
)
_INVERSE_COMPILED = tuple((re.compile(a), b) for a, b in _INVERSE_RULES)


def original_key(key: str) -> str:
    """A diffusers ``WanTransformer3DModel`` key -> its original Wan/ComfyUI name (unverified; see
    :func:`original_rename_map`)."""
    for pat, rep in _INVERSE_COMPILED:
        key = pat.sub(rep, key)
    return key


def original_rename_map(keys: Iterable[str]) -> dict[str, str]:
    """{diffusers key: original key} for writing a file in the original layout, verified by a round trip.

    Why verified: the loader's direction is diffusers' own converter (:func:`rename_map`); the inverse is only
    right if that converter maps every written name back to the key it came from, so this checks exactly that and
    raises ``ValueError`` naming the keys that do not survive (e.g. a module the original layout has no name for).
    """
    keys = list(keys)
    forward = {k: original_key(k) for k in keys}
    originals = list(forward.values())
    if len(set(originals)) != len(originals):
        raise ValueError("two diffusers keys map to the same original Wan key")
    back = {old: new for new, old in rename_map(originals, "original").items()}
    bad = [f"{k} -> {o} -> {back.get(o)}" for k, o in forward.items() if back.get(o) != k]
    if bad:
        raise ValueError(f"{len(bad)} key(s) do not survive the original-layout round trip: {', '.join(bad[:3])}")
    return forward
