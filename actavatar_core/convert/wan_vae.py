"""Wan VAE files: the original Wan2.2 layout (ComfyUI's ``wan2.2_vae.safetensors``) -> diffusers, config from shapes.

``AutoencoderKLWan.from_single_file`` only knows the flat Wan2.1 layout; the Wan2.2 VAE nests its residual blocks
(``decoder.upsamples.0.upsamples.0.residual.2.weight``). The rename below follows the rules of ``convert_vae_22``
in diffusers' ``scripts/convert_wan_to_diffusers.py`` (written anew, not copied); it is a pure rename, no tensor
is reshaped. Key names of the original layout are those of ComfyUI's ``comfy/ldm/wan/vae2_2.py:WanVAE``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

ShapeOf = Callable[[str], tuple]

WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"
ORIGINAL_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.conv_in.weight"

_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}

_MIDDLE = re.compile(r"^(encoder|decoder)\.middle\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)$")
_HEAD = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight", "head.2.bias": "conv_out.bias"}
_TOP = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
        "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}

#: The class whose config :mod:`.settings` records in exported files' metadata.
MODEL_CLASS = "AutoencoderKLWan"
#: Config entries the shapes cannot tell: the trained per-channel latent stats (the original layout has no tensor
#: for them). Read from the file's metadata when it records them.
FILE_SETTINGS = ("latents_mean", "latents_std")


def find_prefix(keys: Iterable[str]) -> str | None:
    """The prefix in front of the VAE keys ('' usually; 'first_stage_model.' or 'vae.' in combined files)."""
    best = None
    for k in keys:
        for marker in (ORIGINAL_MARKER, DIFFUSERS_MARKER):
            if k.endswith(marker):
                p = k[: -len(marker)]
                if (p == "" or p.endswith(".")) and (best is None or len(p) < len(best)):
                    best = p
    return best


def layout_of(keys: Iterable[str]) -> str:
    """'wan22_original', 'wan21_original', 'diffusers' for prefix-free VAE keys."""
    keys = set(keys)
    if ORIGINAL_MARKER in keys:
        return "wan22_original" if WAN22_MARKER in keys else "wan21_original"
    return "diffusers"


def rename_original22(key: str) -> str | None:
    """Original Wan2.2 VAE key -> diffusers ``AutoencoderKLWan`` key (None: not a key of that layout)."""
    if key in _TOP:
        return _TOP[key]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    if rest.startswith("conv1."):
        return f"{side}.conv_in.{rest[len('conv1.'):]}"
    if rest in _HEAD:
        return f"{side}.{_HEAD[rest]}"
    m = _MIDDLE.match(key)
    if m:
        index, tail = int(m.group(2)), m.group(3)
        if index == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        if tail in _RESIDUAL:
            return f"{side}.mid_block.resnets.{index // 2}.{_RESIDUAL[tail]}"
        return None
    m = _BLOCK.match(key)
    if m:
        stage, i, j, tail = m.groups()
        blocks = "encoder.down_blocks" if stage.startswith("encoder") else "decoder.up_blocks"
        sampler = "downsampler" if stage.startswith("encoder") else "upsampler"
        if tail in _RESIDUAL:
            return f"{blocks}.{i}.resnets.{j}.{_RESIDUAL[tail]}"
        if tail.startswith(("resample.", "time_conv.")):
            return f"{blocks}.{i}.{sampler}.{tail}"
    return None


def _count(keys: set[str], pattern: str) -> int:
    pat = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def infer_config(keys: Iterable[str], shape_of: ShapeOf) -> dict[str, Any]:
    """The diffusers ``AutoencoderKLWan`` config of a Wan2.2-style (residual) VAE from diffusers keys + shapes."""
    keys = set(keys)
    base_dim, in_channels = shape_of("encoder.conv_in.weight")[:2]
    z_dim = shape_of("post_quant_conv.weight")[0]
    n_down = _count(keys, r"^encoder\.down_blocks\.(\d+)\.")
    dim_mult = [shape_of(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] // base_dim for i in range(n_down)]
    num_res_blocks = _count(keys, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    temporal = [f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in keys for i in range(n_down - 1)]
    decoder_base_dim = shape_of("decoder.norm_out.gamma")[0] // dim_mult[0]
    out_channels = shape_of("decoder.conv_out.weight")[0]
    patch = None
    for p in (1, 2, 4, 8):
        if in_channels == 3 * p * p:
            patch = p if p > 1 else None
            break
    return dict(
        base_dim=int(base_dim),
        decoder_base_dim=int(decoder_base_dim),
        z_dim=int(z_dim),
        dim_mult=[int(m) for m in dim_mult],
        num_res_blocks=int(num_res_blocks),
        attn_scales=[],
        temperal_downsample=temporal,
        dropout=0.0,
        is_residual=True,
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        patch_size=patch,
        scale_factor_temporal=2 ** sum(temporal),
        scale_factor_spatial=(patch or 1) * 2 ** (n_down - 1),
        latents_mean=[0.0] * int(z_dim),
        latents_std=[1.0] * int(z_dim),
    )


def is_residual_diffusers(keys: Iterable[str]) -> bool:
    """Diffusers' Wan2.2 VAE nests resnets in down blocks; the Wan2.1 one is flat."""
    return any(re.match(r"^encoder\.down_blocks\.\d+\.resnets\.", k) for k in keys)


# ---------------------------------------------------------------------------------------------- export (inverse)
_RESIDUAL_BACK = {v: k for k, v in _RESIDUAL.items()}
_HEAD_BACK = {v: k for k, v in _HEAD.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_D_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(attentions|resnets)\.(\d+)\.(.+)$")
_D_RES = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.(.+)$")
_D_SAMPLER = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(?:downsampler|upsampler)\.(.+)$")


def _original22_key(key: str, resnets: dict[tuple[str, int], int]) -> str | None:
    if key in _TOP_BACK:
        return _TOP_BACK[key]
    side, _, rest = key.partition(".")
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.'):]}"
    if rest in _HEAD_BACK:
        return f"{side}.{_HEAD_BACK[rest]}"
    m = _D_MID.match(key)
    if m:
        side, what, index, tail = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if what == "attentions":
            return f"{side}.middle.1.{tail}" if index == 0 else None
        return f"{side}.middle.{2 * index}.{_RESIDUAL_BACK[tail]}" if tail in _RESIDUAL_BACK else None
    m = _D_RES.match(key)
    if m:
        stage, i, j, tail = m.groups()
        outer = "encoder.downsamples" if stage.startswith("encoder") else "decoder.upsamples"
        inner = outer.rpartition(".")[2]
        return f"{outer}.{i}.{inner}.{j}.{_RESIDUAL_BACK[tail]}" if tail in _RESIDUAL_BACK else None
    m = _D_SAMPLER.match(key)
    if m:
        stage, i, tail = m.groups()
        outer = "encoder.downsamples" if stage.startswith("encoder") else "decoder.upsamples"
        inner = outer.rpartition(".")[2]
        # The resampler follows the block's residual blocks in the original nn.Sequential.
        return f"{outer}.{i}.{inner}.{resnets.get((stage, int(i)), 0)}.{tail}"
    return None


def original22_rename_map(keys: Iterable[str]) -> dict[str, str]:
    """{diffusers key: original Wan2.2 key} for writing ``wan2.2_vae.safetensors``-style files, verified by a round
    trip through :func:`rename_original22` (``ValueError`` naming the keys that do not survive)."""
    keys = list(keys)
    resnets: dict[tuple[str, int], int] = {}
    for k in keys:
        m = _D_RES.match(k)
        if m:
            slot = (m.group(1), int(m.group(2)))
            resnets[slot] = max(resnets.get(slot, 0), int(m.group(3)) + 1)
    out: dict[str, str] = {}
    bad: list[str] = []
    for k in keys:
        o = _original22_key(k, resnets)
        if o is None or rename_original22(o) != k:
            bad.append(f"{k} -> {o}")
        else:
            out[k] = o
    if bad:
        raise ValueError(f"{len(bad)} key(s) have no original Wan2.2 VAE name: {', '.join(bad[:3])}")
    if len(set(out.values())) != len(out) or layout_of(out.values()) != "wan22_original":
        raise ValueError("the keys do not form a Wan2.2 VAE in the original layout")
    return out
