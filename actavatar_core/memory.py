"""Memory modes: how the five models sit in device memory while a clip is made.

Why: the 5B transformer is 10 GB in bf16 and umT5-XXL 11 GB, so "everything resident" needs a 24 GB+ card. Each mode
is built from diffusers' own machinery, never a home-made loop:

| mode | transformer | text encoder | VAE decode |
|---|---|---|---|
| ``full`` | resident, compute dtype | resident | streamed per latent frame |
| ``fp8`` | fp8 storage, each layer upcast for its forward (``ModelMixin.enable_layerwise_casting``) | fp8 storage (``apply_layerwise_casting``) | streamed |
| ``offload`` | block-level group offloading, the next block's copy overlapping the current block's compute on a CUDA stream (``enable_group_offload(offload_type="block_level", use_stream=True)``) | on the CPU | streamed and spatially tiled (``AutoencoderKLWan.enable_tiling``) |
| ``fp8-offload`` | fp8 storage and block offloading (half the bytes to move) | on the CPU, fp8 storage | streamed and tiled |

``auto`` picks the first mode whose estimated peak fits the device's free memory. A mode that cannot apply here
(block offloading without CUDA, fp8 on a device with no float8 casts) keeps the models as they are for that part and
says why in the report, instead of failing.

Arithmetic: ``full`` and ``offload`` compute exactly what the plain path computes (same weights, same dtypes); fp8
storage rounds each cast weight to float8_e4m3fn (3 mantissa bits), so its output equals the plain path run with
those rounded weights, and differs from the unrounded one. Spatial tiling blends overlapping tiles (diffusers'
``tiled_decode``), which changes the pixels near tile seams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import ActAvatarError

MEMORY_MODES = ("auto", "full", "fp8", "offload", "fp8-offload")
#: Applied in this order when ``auto`` looks for a mode that fits.
FIT_ORDER = ("full", "fp8", "offload", "fp8-offload")
#: Share of the free device memory a mode may plan to use (the allocator's fragmentation, CUDA context, cuDNN work).
FIT_MARGIN = 0.9


class MemoryModeError(ActAvatarError):
    """An unknown memory mode."""


@dataclass(frozen=True)
class MemoryPlan:
    """What one mode does to each model."""

    transformer_fp8: bool = False
    transformer_offload: bool = False
    text_encoder: str = "device"  # "device", "fp8" (fp8 storage on the device) or "cpu"
    text_encoder_fp8: bool = False
    vae_tiling: bool = False


PLANS: dict[str, MemoryPlan] = {
    "full": MemoryPlan(),
    "fp8": MemoryPlan(transformer_fp8=True, text_encoder="device", text_encoder_fp8=True),
    "offload": MemoryPlan(transformer_offload=True, text_encoder="cpu", vae_tiling=True),
    "fp8-offload": MemoryPlan(transformer_fp8=True, transformer_offload=True, text_encoder="cpu",
                              text_encoder_fp8=True, vae_tiling=True),
}


@dataclass
class MemoryReport:
    """What was asked, what was applied, and why anything asked for was not."""

    requested: str
    mode: str
    applied: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    estimates_gb: dict[str, float] = field(default_factory=dict)
    free_gb: float | None = None

    def lines(self) -> list[str]:
        head = f"memory mode: {self.mode}" + (f" (chosen by auto, {self.free_gb:.1f} GB free)"
                                              if self.requested == "auto" and self.free_gb is not None
                                              else " (auto)" if self.requested == "auto" else "")
        return [head] + [f"  {a}" for a in self.applied] + [f"  fallback: {f}" for f in self.fallbacks]

    def to_json(self) -> dict[str, Any]:
        return {"requested": self.requested, "mode": self.mode, "applied": list(self.applied),
                "fallbacks": list(self.fallbacks), "estimates_gb": dict(self.estimates_gb), "free_gb": self.free_gb}


def check_mode(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise MemoryModeError(f"Unknown memory mode {mode!r}.", f"Use one of {', '.join(MEMORY_MODES)}.")
    return mode


# ---------------------------------------------------------------------------------------------- sizes
def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored now."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def castable_layers(module: torch.nn.Module, skip: tuple[str, ...] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The layers diffusers' layerwise casting stores in fp8: linear and conv layers none of whose names (their own
    or an enclosing module's) matches a skip pattern (``re.search``, diffusers' rule)."""
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    skip = _skip_patterns(module) if skip is None else skip
    found: list[tuple[str, torch.nn.Module]] = []

    def walk(sub: torch.nn.Module, prefix: str) -> None:
        if prefix and any(re.search(p, prefix) for p in skip):
            return
        if isinstance(sub, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            found.append((prefix, sub))
            return
        for name, child in sub.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(module, "")
    return found


def fp8_bytes(module: torch.nn.Module, skip: tuple[str, ...] | None = None) -> int:
    """Bytes of ``module`` with its castable layers stored in fp8 (1 byte per element)."""
    params = [p for _, sub in castable_layers(module, skip) for p in sub.parameters(recurse=False)]
    return module_bytes(module) - sum(p.numel() * (p.element_size() - 1) for p in params)


def _skip_patterns(module: torch.nn.Module) -> tuple[str, ...]:
    """diffusers' skip list for ``module``, as ``ModelMixin.enable_layerwise_casting`` builds it: the default
    patterns (norms, embeddings), the model's ``_keep_in_fp32_modules`` (transformers' T5 keeps ``wo`` there: its
    feed-forward casts activations to ``wo``'s dtype, which must not be fp8) and its own skip patterns."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = list(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += list(getattr(module, "_keep_in_fp32_modules", None) or ())
    patterns += list(getattr(module, "_skip_layerwise_casting_patterns", None) or ())
    return tuple(dict.fromkeys(patterns))


def _block_bytes(transformer: torch.nn.Module) -> tuple[int, int]:
    """(bytes outside the transformer blocks, bytes of the largest block)."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not len(blocks):
        return module_bytes(transformer), 0
    inside = sum(module_bytes(b) for b in blocks)
    return module_bytes(transformer) - inside, max(module_bytes(b) for b in blocks)


def activation_bytes(transformer_config: Any, vae_config: Any, *, width: int, height: int, frames: int,
                     itemsize: int = 2) -> dict[str, int]:
    """Rough peaks above the weights for one clip: a transformer forward (16 hidden states of the video tokens:
    the 5B forward at 704x1280x121 measured 2.3 GB, 14 of them), and the VAE decoder's widest layer at full size
    for one latent frame (4 pixel frames, 4 live tensors), whole or in diffusers' default 256-pixel tiles."""
    p_t, p_h, p_w = transformer_config.patch_size
    stride = int(vae_config.scale_factor_spatial)
    latent_frames = (frames - 1) // 4 + 1
    tokens = latent_frames // p_t * (height // stride // p_h) * (width // stride // p_w)
    dim = int(transformer_config.num_attention_heads) * int(transformer_config.attention_head_dim)
    widest = int(getattr(vae_config, "decoder_base_dim", None) or vae_config.base_dim) * max(vae_config.dim_mult)
    patch = int(vae_config.patch_size or 1)
    pixels = (height // patch) * (width // patch) * 4 * 4  # 4 pixel frames, 4 live tensors
    tile = min(256 // patch, height // patch) * min(256 // patch, width // patch) * 4 * 4
    return {"forward": 16 * tokens * dim * itemsize, "decode": pixels * widest * itemsize // 4,
            "decode_tiled": tile * widest * itemsize // 4}


def estimate_peaks(models: Any, activations: dict[str, int]) -> dict[str, int]:
    """Estimated device peak of each mode: the resident weights plus the larger of a forward and a decode."""
    t, e = models.transformer, models.text_encoder
    rest = module_bytes(models.vae) + module_bytes(models.audio_encoder)
    outside, block = _block_bytes(t)
    t_full, t_fp8 = module_bytes(t), fp8_bytes(t)
    fp8_ratio = t_fp8 / t_full if t_full else 1.0
    e_full, e_fp8 = module_bytes(e), fp8_bytes(e)
    whole = max(activations["forward"], activations["decode"])
    tiled = max(activations["forward"], activations["decode_tiled"])
    streamed = outside + 2 * block  # the current block and the one being copied in
    return {"full": t_full + e_full + rest + whole,
            "fp8": t_fp8 + e_fp8 + rest + whole,
            "offload": streamed + rest + tiled,
            "fp8-offload": int(streamed * fp8_ratio) + rest + tiled}


def free_device_memory(device: Any) -> int | None:
    """Free bytes on a CUDA device (what the driver reports, other processes included); None elsewhere."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


def choose_mode(free: int | None, peaks: dict[str, int]) -> str:
    """The first mode of :data:`FIT_ORDER` whose estimated peak fits ``FIT_MARGIN`` of the free memory; ``full``
    when the free memory is not known (the CPU); the leanest mode when none fits."""
    if free is None:
        return "full"
    for mode in FIT_ORDER:
        if peaks[mode] <= free * FIT_MARGIN:
            return mode
    return FIT_ORDER[-1]


# ---------------------------------------------------------------------------------------------- the parts
def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: group offloading keeps its weights on the CPU between forwards and moves them to
    its onload device, which is then the device to put inputs on."""
    from diffusers.hooks.group_offloading import _get_group_onload_device, _is_group_offload_enabled

    if _is_group_offload_enabled(module):
        return torch.device(_get_group_onload_device(module))
    return next(module.parameters()).device


def fp8_unsupported(device: Any) -> str | None:
    """Why fp8 storage cannot apply on ``device``, or None when it can."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"this torch ({torch.__version__}) has no float8_e4m3fn dtype"
    if torch.device(device).type == "mps":
        return "Apple's MPS backend has no float8 dtype"
    return None


def enable_fp8_storage(module: torch.nn.Module, compute: torch.dtype) -> None:
    """Store ``module``'s linear and conv weights in float8_e4m3fn and upcast each layer to ``compute`` for its
    forward (diffusers' layerwise casting; a diffusers model keeps its own skip list: norms, embeddings, PACA's
    phase embedding)."""
    if compute not in (torch.float32, torch.bfloat16, torch.float16):
        raise MemoryModeError(f"fp8 storage needs a float compute dtype, not {compute}.",
                              "Load the model in fp32, bf16 or fp16.")
    from diffusers import ModelMixin
    from diffusers.hooks import apply_layerwise_casting

    if isinstance(module, ModelMixin):
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    else:
        apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute,
                                skip_modules_pattern=_skip_patterns(module))


def enable_block_offload(transformer: Any, onload: Any, offload: Any = "cpu", *, use_stream: bool | None = None) -> None:
    """diffusers' block-level group offloading: the transformer's blocks live on ``offload`` and move to ``onload``
    one at a time; on CUDA with ``use_stream`` the next block's copy runs on a side stream during the current
    block's compute (pinned memory, non-blocking)."""
    onload, offload = torch.device(onload), torch.device(offload)
    stream = (onload.type == "cuda") if use_stream is None else use_stream
    transformer.to(offload)
    transformer.enable_group_offload(onload_device=onload, offload_device=offload, offload_type="block_level",
                                     num_blocks_per_group=1, use_stream=stream, non_blocking=stream,
                                     record_stream=stream)


def enable_vae_tiling(vae: Any) -> None:
    """diffusers' spatial tiling switch (256-pixel tiles, 192-pixel stride); :func:`actavatar_core.vae.decode_chunks`
    honours it while it streams frame by frame."""
    vae.enable_tiling()


# ---------------------------------------------------------------------------------------------- the mode
def apply_memory_mode(models: Any, mode: str, device: Any, *, activations: dict[str, int] | None = None,
                      log: Callable[[str], None] | None = None) -> MemoryReport:
    """Put ``models`` (an :class:`~actavatar_core.bundle.ActAvatarModels`, on any device) into ``mode`` for
    computing on ``device``. ``activations`` (:func:`activation_bytes`) lets ``auto`` count the clip's own peaks;
    without it only the weights are counted. Returns what was done and every fallback, each also passed to ``log``."""
    from .model import compute_dtype

    check_mode(mode)
    dev = torch.device(device)
    report = MemoryReport(requested=mode, mode=mode)
    acts = activations or {"forward": 0, "decode": 0, "decode_tiled": 0}
    peaks = estimate_peaks(models, acts)
    report.estimates_gb = {k: round(v / 2**30, 3) for k, v in peaks.items()}
    if mode == "auto":
        free = free_device_memory(dev)
        report.free_gb = None if free is None else round(free / 2**30, 3)
        report.mode = choose_mode(free, peaks)
        if free is None:
            report.applied.append(f"{dev.type}: no free-memory figure to fit against, so everything stays resident")
        elif peaks[report.mode] > free * FIT_MARGIN:
            report.fallbacks.append(f"no mode's estimated peak fits {free / 2**30:.1f} GB free (leanest: "
                                    f"{peaks[report.mode] / 2**30:.1f} GB); running {report.mode}, which may run out")
    plan = PLANS[report.mode]
    compute = compute_dtype(models.transformer)
    text_compute = compute_dtype(models.text_encoder)
    fp8_why = fp8_unsupported(dev)

    offload = plan.transformer_offload
    if offload and dev.type != "cuda":
        report.fallbacks.append(f"block offloading moves blocks between the CPU and a CUDA GPU; on {dev} the "
                                "transformer stays whole")
        offload = False
    if plan.transformer_fp8:
        if fp8_why:
            report.fallbacks.append(f"fp8 storage of the transformer does not apply: {fp8_why}; it stays in {compute}")
        else:
            enable_fp8_storage(models.transformer, compute)  # cast where it is, then move 1-byte weights
            models.transformer.to(dev if not offload else "cpu")
            report.applied.append(f"transformer: fp8 storage, {str(compute).removeprefix('torch.')} compute per layer")
    if offload:
        enable_block_offload(models.transformer, dev)
        report.applied.append("transformer: block-level group offloading, one block at a time, copies overlapped "
                              "on a CUDA stream")
    elif not plan.transformer_fp8 or fp8_why:
        models.transformer.to(dev)

    te_device = torch.device("cpu") if plan.text_encoder == "cpu" else dev
    if plan.text_encoder_fp8:
        why = fp8_unsupported(te_device)
        if why:
            report.fallbacks.append(f"fp8 storage of the text encoder does not apply: {why}")
        else:
            enable_fp8_storage(models.text_encoder, text_compute)
            report.applied.append(f"text encoder: fp8 storage, {str(text_compute).removeprefix('torch.')} compute per layer")
    models.text_encoder.to(te_device)
    if plan.text_encoder == "cpu":
        report.applied.append("text encoder: on the CPU (its output moves to the device once per prompt)")
    models.vae.to(dev)
    models.audio_encoder.to(dev)
    if plan.vae_tiling:
        enable_vae_tiling(models.vae)
        report.applied.append("VAE decode: streamed per latent frame and tiled spatially (256-pixel tiles)")
    if log is not None:
        for line in report.lines():
            log(line)
    return report
