"""ComfyUI's fp8 checkpoint formats, turned back into plain tensors.

Two generations exist (both read by ComfyUI v0.8.0, ``comfy/utils.py:convert_old_quants`` and
``comfy/ops.py:mixed_precision_ops``):

* **scaled fp8** (``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` and most ``*_fp8_scaled`` files): a marker tensor
  ``scaled_fp8`` (optionally behind a model prefix), fp8 ``<layer>.weight`` and a float32 ``<layer>.scale_weight``;
  sometimes ``<layer>.scale_input`` (activation scale, irrelevant once dequantised). The real weight is
  ``weight.float() * scale_weight``.
* **comfy_quant** (ComfyUI >= 0.3.7x): ``<layer>.comfy_quant`` (uint8 JSON such as ``{"format": "float8_e4m3fn"}``)
  or the same per-layer JSON under the safetensors metadata key ``_quantization_metadata``, with
  ``<layer>.weight_scale`` (+ ``input_scale``). fp8 formats dequantise the same way; ``nvfp4`` (block-scaled 4-bit
  in a tensor-core layout) is refused with a clear message.

fp8 tensors without a scale (e.g. a plain ``*_fp8_e4m3fn`` file) are simply cast up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..errors import WeightsError
from .source import FP8_DTYPES

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROP_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


@dataclass
class QuantPlan:
    """What to do with the quantisation side-tensors of one file."""

    scale_keys: dict[str, str] = field(default_factory=dict)   # weight key -> its scale key
    drop: set[str] = field(default_factory=set)                 # keys that are not model tensors
    style: str | None = None                                    # "scaled_fp8", "comfy_quant" or None
    fp8_keys: int = 0

    @property
    def quantized(self) -> bool:
        return self.style is not None or self.fp8_keys > 0


def plan(keys: Iterable[str], dtype_of: Callable[[str], torch.dtype | None], metadata: dict[str, str] | None,
         read: Callable[[str], torch.Tensor], name: str = "the file") -> QuantPlan:
    """Inspect keys (and the few small ``comfy_quant`` tensors) and decide how to dequantise."""
    keys = list(keys)
    keyset = set(keys)
    out = QuantPlan()
    formats: dict[str, dict] = {}
    meta_json = (metadata or {}).get("_quantization_metadata")
    if meta_json:
        try:
            formats.update(json.loads(meta_json).get("layers", {}))
        except (ValueError, AttributeError):
            raise WeightsError(f"{name} has unreadable _quantization_metadata.", "Re-download the file.") from None
        out.style = "comfy_quant"
    for k in keys:
        if k == "scaled_fp8" or k.endswith(".scaled_fp8"):
            out.drop.add(k)
            out.style = out.style or "scaled_fp8"
        elif k.endswith(".comfy_quant"):
            out.drop.add(k)
            out.style = "comfy_quant"
            try:
                formats[k[: -len(".comfy_quant")]] = json.loads(read(k).cpu().numpy().tobytes())
            except (ValueError, UnicodeDecodeError):
                raise WeightsError(f"{name} has an unreadable quantisation entry '{k}'.", "Re-download the file.") from None
        elif k.endswith(DROP_SUFFIXES):
            out.drop.add(k)
    for layer, conf in formats.items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt not in FP8_FORMATS:
            raise WeightsError(
                f"{name} stores layer '{layer}' in the quantisation format '{fmt}', which ActAvatar cannot dequantise "
                "(only fp8 formats are supported).",
                "Use the fp16/bf16 or fp8_scaled release of this model.")
    for k in keys:
        if k in out.drop:
            continue
        if k.endswith(".weight"):
            layer = k[: -len(".weight")]
            for suffix in SCALE_SUFFIXES:
                if layer + suffix in keyset:
                    out.scale_keys[k] = layer + suffix
                    break
        if dtype_of(k) in FP8_DTYPES:
            out.fp8_keys += 1
    if out.scale_keys and out.style is None:
        out.style = "scaled_fp8"
    return out


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` computed in float32, returned in ``dtype``. Scales are per tensor (or per output row)."""
    if scale is None:
        return weight.to(dtype)
    w = weight.to(torch.float32)
    s = scale.to(device=w.device, dtype=torch.float32)
    if s.numel() == 1:
        w.mul_(s.reshape(()))
    elif s.numel() == w.shape[0]:
        w.mul_(s.reshape(-1, *([1] * (w.ndim - 1))))
    else:
        w.mul_(s.reshape(w.shape) if s.numel() == w.numel() else s)
    return w.to(dtype)
