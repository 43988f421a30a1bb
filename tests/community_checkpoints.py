"""Writers of tiny checkpoints in exactly the key layouts of the files users download.

Each ``write_comfy_*`` writes a small random checkpoint whose tensor names (and name -> shape structure) are those
of the ComfyUI model class that reads the real file:

| writer | real file | ComfyUI class (ground truth of the layout) |
|---|---|---|
| :func:`write_comfy_wan_transformer` | ``diffusion_models/wan2.2_ti2v_5B_fp16.safetensors`` | ``comfy/ldm/wan/model.py:WanModel`` |
| :func:`write_comfy_wan22_vae` | ``vae/wan2.2_vae.safetensors`` | ``comfy/ldm/wan/vae2_2.py:WanVAE`` |
| :func:`write_comfy_wan21_vae` | ``vae/wan_2.1_vae.safetensors`` (wrong-kind tests) | ``comfy/ldm/wan/vae.py:WanVAE`` |
| :func:`write_comfy_umt5` | ``text_encoders/umt5_xxl_fp16`` / ``_fp8_e4m3fn_scaled.safetensors`` | ``comfy/text_encoders/t5.py:T5`` + ``spiece_model`` |
| :func:`write_comfy_wav2vec2` | ``audio_encoders/wav2vec2_large_english_fp16`` / ``wav2vec2-chinese-base_fp16`` | ``comfy/audio_encoders/wav2vec2.py:Wav2Vec2Model`` |

The structure is written out here from ComfyUI's model code (no ComfyUI import); ``tests/integration/
test_comfy_parity.py`` checks it against ``state_dict()`` of ComfyUI's own classes. The transformer and VAE
writers also return the *diffusers* name of every tensor, derived from the structure (not from the loader's
rename rules), which the round-trip tests compare against.

Folder writers (``write_diffusers_*``, ``write_hf_*``) save real diffusers/transformers models with
``save_pretrained``. The tokenizer is a tiny SentencePiece Unigram model trained in-process with umT5's special
ids (``<pad>`` 0, ``</s>`` 1, ``<s>`` 2, ``<unk>`` 3).

All writers return a :class:`Written` record; sizes default to tiny widths that run in milliseconds on a CPU.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "Written", "tiny_spm_bytes", "write_comfy_wan_transformer", "write_comfy_wan22_vae", "write_comfy_wan21_vae",
    "write_comfy_umt5", "write_comfy_wav2vec2", "write_diffusers_wan_transformer", "write_diffusers_wan_vae",
    "write_hf_umt5", "write_hf_wav2vec2", "write_diffusers_pipeline", "fill_comfy_models_folder",
    "COMFY_FILE_NAMES", "TRANSFORMER_DEFAULTS", "VAE22_DEFAULTS", "UMT5_DEFAULTS", "WAV2VEC2_DEFAULTS",
]

#: Tiny transformer: 2 heads of 128 (Wan's head width, so the head count is readable from the file like for the
#: real models); text width 32 matches the tiny umT5 below.
TRANSFORMER_DEFAULTS = dict(dim=256, ffn_dim=128, num_layers=2, in_dim=48, out_dim=48, text_dim=32, freq_dim=256,
                            patch_size=(1, 2, 2))
VAE22_DEFAULTS = dict(dim=16, dec_dim=16, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                      temperal_downsample=(False, True, True))
#: ComfyUI's T5 always uses 32 buckets / max distance 128, so the tiny model does too.
UMT5_DEFAULTS = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
#: ComfyUI's Wav2Vec2Model fixes conv width 512 and a 128-tap, 16-group positional conv; widths are free.
WAV2VEC2_DEFAULTS = dict(hidden_size=64, num_layers=2, conv_dim=512, pos_kernel=128, pos_groups=16)

#: File names a ComfyUI models folder holds for the real models (what fill_comfy_models_folder writes).
COMFY_FILE_NAMES = {
    "transformer": "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors",
    "vae": "vae/wan2.2_vae.safetensors",
    "text_encoder": "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "text_encoder_fp16": "text_encoders/umt5_xxl_fp16.safetensors",
    "audio_encoder": "audio_encoders/wav2vec2_large_english_fp16.safetensors",
    "audio_encoder_base": "audio_encoders/wav2vec2-chinese-base_fp16.safetensors",
}


@dataclass
class Written:
    """What a writer wrote: the path, the tensors as stored, the float32 weights a correct loader must produce
    (model key -> tensor, dequantised) and the config of the reference model class."""

    path: Path
    stored: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    diffusers_names: dict[str, str] = field(default_factory=dict)   # stored key -> diffusers key (Wan files)


# ---------------------------------------------------------------------------------------------- helpers
def _rand(shape: Sequence[int], key: str, g: torch.Generator, norm: bool) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if norm:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if key.endswith("bias") or len(shape) <= 1:
        return 0.05 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))


def _save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _store(values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------- Wan transformer
def wan_transformer_layout(dim: int, ffn_dim: int, num_layers: int, in_dim: int, out_dim: int, text_dim: int,
                           freq_dim: int, patch_size: Sequence[int] = (1, 2, 2), cross_attn_norm: bool = True
                           ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(ComfyUI/original key, diffusers key, shape) for ComfyUI's ``WanModel(model_type="t2v")``."""
    rows: list[tuple[str, str, tuple[int, ...]]] = []

    def lin(ckey: str, dkey: str, out_f: int, in_f: int) -> None:
        rows.append((f"{ckey}.weight", f"{dkey}.weight", (out_f, in_f)))
        rows.append((f"{ckey}.bias", f"{dkey}.bias", (out_f,)))

    p = tuple(patch_size)
    rows.append(("patch_embedding.weight", "patch_embedding.weight", (dim, in_dim, *p)))
    rows.append(("patch_embedding.bias", "patch_embedding.bias", (dim,)))
    lin("text_embedding.0", "condition_embedder.text_embedder.linear_1", dim, text_dim)
    lin("text_embedding.2", "condition_embedder.text_embedder.linear_2", dim, dim)
    lin("time_embedding.0", "condition_embedder.time_embedder.linear_1", dim, freq_dim)
    lin("time_embedding.2", "condition_embedder.time_embedder.linear_2", dim, dim)
    lin("time_projection.1", "condition_embedder.time_proj", 6 * dim, dim)
    for i in range(num_layers):
        b = f"blocks.{i}"
        for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for c, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
                lin(f"{b}.{ours}.{c}", f"{b}.{theirs}.{d}", dim, dim)
            rows.append((f"{b}.{ours}.norm_q.weight", f"{b}.{theirs}.norm_q.weight", (dim,)))
            rows.append((f"{b}.{ours}.norm_k.weight", f"{b}.{theirs}.norm_k.weight", (dim,)))
        if cross_attn_norm:
            rows.append((f"{b}.norm3.weight", f"{b}.norm2.weight", (dim,)))
            rows.append((f"{b}.norm3.bias", f"{b}.norm2.bias", (dim,)))
        lin(f"{b}.ffn.0", f"{b}.ffn.net.0.proj", ffn_dim, dim)
        lin(f"{b}.ffn.2", f"{b}.ffn.net.2", dim, ffn_dim)
        rows.append((f"{b}.modulation", f"{b}.scale_shift_table", (1, 6, dim)))
    lin("head.head", "proj_out", out_dim * math.prod(p), dim)
    rows.append(("head.modulation", "scale_shift_table", (1, 2, dim)))
    return rows


def write_comfy_wan_transformer(path: str | os.PathLike, *, prefix: bool = False, dtype: torch.dtype = torch.float16,
                                seed: int = 0, **cfg: Any) -> Written:
    """A tiny Wan2.2 TI2V-style transformer in ComfyUI's ``WanModel`` layout (``model.diffusion_model.`` in front
    of every key when ``prefix``). ``cfg`` overrides :data:`TRANSFORMER_DEFAULTS` (dim, ffn_dim, num_layers, in_dim,
    out_dim, text_dim, freq_dim, patch_size). Use text_dim=4096 for a file ComfyUI's own UNETLoader accepts."""
    c = {**TRANSFORMER_DEFAULTS, **cfg}
    g = torch.Generator().manual_seed(seed)
    rows = wan_transformer_layout(**c)
    values = {}
    for ckey, _, shape in rows:
        norm = ".norm" in ckey and ckey.endswith(".weight")
        t = _rand(shape, ckey, g, norm)
        if ckey.endswith("modulation"):
            t = torch.randn(shape, generator=g) / math.sqrt(c["dim"])
        values[ckey] = t
    stored = _store(values, dtype)
    pre = "model.diffusion_model." if prefix else ""
    _save(path, {pre + k: v for k, v in stored.items()})
    dim = c["dim"]
    config = dict(patch_size=tuple(c["patch_size"]), num_attention_heads=dim // 128, attention_head_dim=128,
                  in_channels=c["in_dim"], out_channels=c["out_dim"], text_dim=c["text_dim"], freq_dim=c["freq_dim"],
                  ffn_dim=c["ffn_dim"], num_layers=c["num_layers"], cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    names = {pre + ck: dk for ck, dk, _ in rows}
    reference = {dk: stored[ck].float() for ck, dk, _ in rows}
    return Written(Path(path), {pre + k: v for k, v in stored.items()}, reference, config, names)


# ---------------------------------------------------------------------------------------------- Wan VAEs
_RES = (("residual.0.gamma", "norm1.gamma"), ("residual.2.weight", "conv1.weight"), ("residual.2.bias", "conv1.bias"),
        ("residual.3.gamma", "norm2.gamma"), ("residual.6.weight", "conv2.weight"), ("residual.6.bias", "conv2.bias"))


def _resblock(rows: list, ckey: str, dkey: str, cin: int, cout: int) -> None:
    shapes = {"residual.0.gamma": (cin, 1, 1, 1), "residual.2.weight": (cout, cin, 3, 3, 3), "residual.2.bias": (cout,),
              "residual.3.gamma": (cout, 1, 1, 1), "residual.6.weight": (cout, cout, 3, 3, 3), "residual.6.bias": (cout,)}
    for c, d in _RES:
        rows.append((f"{ckey}.{c}", f"{dkey}.{d}" if dkey else None, shapes[c]))
    if cin != cout:
        rows.append((f"{ckey}.shortcut.weight", f"{dkey}.conv_shortcut.weight" if dkey else None, (cout, cin, 1, 1, 1)))
        rows.append((f"{ckey}.shortcut.bias", f"{dkey}.conv_shortcut.bias" if dkey else None, (cout,)))


def _attn(rows: list, ckey: str, dkey: str | None, dim: int) -> None:
    rows.append((f"{ckey}.norm.gamma", f"{dkey}.norm.gamma" if dkey else None, (dim, 1, 1)))
    rows.append((f"{ckey}.to_qkv.weight", f"{dkey}.to_qkv.weight" if dkey else None, (3 * dim, dim, 1, 1)))
    rows.append((f"{ckey}.to_qkv.bias", f"{dkey}.to_qkv.bias" if dkey else None, (3 * dim,)))
    rows.append((f"{ckey}.proj.weight", f"{dkey}.proj.weight" if dkey else None, (dim, dim, 1, 1)))
    rows.append((f"{ckey}.proj.bias", f"{dkey}.proj.bias" if dkey else None, (dim,)))


def _middle(rows: list, side: str, dim: int, diffusers: bool) -> None:
    d = f"{side}.mid_block" if diffusers else None
    _resblock(rows, f"{side}.middle.0", f"{d}.resnets.0" if d else None, dim, dim)
    _attn(rows, f"{side}.middle.1", f"{d}.attentions.0" if d else None, dim)
    _resblock(rows, f"{side}.middle.2", f"{d}.resnets.1" if d else None, dim, dim)


def _conv(rows: list, ckey: str, dkey: str | None, cout: int, cin: int, kernel: tuple[int, ...]) -> None:
    rows.append((f"{ckey}.weight", f"{dkey}.weight" if dkey else None, (cout, cin, *kernel)))
    rows.append((f"{ckey}.bias", f"{dkey}.bias" if dkey else None, (cout,)))


def wan22_vae_layout(dim: int, dec_dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                     temperal_downsample: Sequence[bool]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(original key, diffusers key, shape) of ComfyUI's ``vae2_2.WanVAE`` (patch 2: 12 image channels)."""
    rows: list = []
    dims = [dim * u for u in [1, *dim_mult]]
    _conv(rows, "encoder.conv1", "encoder.conv_in", dims[0], 12, (3, 3, 3))
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(num_res_blocks):
            _resblock(rows, f"encoder.downsamples.{i}.downsamples.{j}", f"encoder.down_blocks.{i}.resnets.{j}", cin, cout)
            cin = cout
        if i != len(dim_mult) - 1:
            base = f"encoder.downsamples.{i}.downsamples.{num_res_blocks}"
            _conv(rows, f"{base}.resample.1", f"encoder.down_blocks.{i}.downsampler.resample.1", cout, cout, (3, 3))
            if temperal_downsample[i]:
                _conv(rows, f"{base}.time_conv", f"encoder.down_blocks.{i}.downsampler.time_conv", cout, cout, (3, 1, 1))
    out = dims[-1]
    _middle(rows, "encoder", out, True)
    rows.append(("encoder.head.0.gamma", "encoder.norm_out.gamma", (out, 1, 1, 1)))
    _conv(rows, "encoder.head.2", "encoder.conv_out", 2 * z_dim, out, (3, 3, 3))
    _conv(rows, "conv1", "quant_conv", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    _conv(rows, "conv2", "post_quant_conv", z_dim, z_dim, (1, 1, 1))
    ddims = [dec_dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
    temperal_upsample = list(temperal_downsample)[::-1]
    _conv(rows, "decoder.conv1", "decoder.conv_in", ddims[0], z_dim, (3, 3, 3))
    _middle(rows, "decoder", ddims[0], True)
    for i, (cin, cout) in enumerate(zip(ddims[:-1], ddims[1:])):
        for j in range(num_res_blocks + 1):
            _resblock(rows, f"decoder.upsamples.{i}.upsamples.{j}", f"decoder.up_blocks.{i}.resnets.{j}", cin, cout)
            cin = cout
        if i != len(dim_mult) - 1:
            base = f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}"
            _conv(rows, f"{base}.resample.1", f"decoder.up_blocks.{i}.upsampler.resample.1", cout, cout, (3, 3))
            if i < len(temperal_upsample) and temperal_upsample[i]:
                _conv(rows, f"{base}.time_conv", f"decoder.up_blocks.{i}.upsampler.time_conv", 2 * cout, cout, (3, 1, 1))
    rows.append(("decoder.head.0.gamma", "decoder.norm_out.gamma", (ddims[-1], 1, 1, 1)))
    _conv(rows, "decoder.head.2", "decoder.conv_out", 12, ddims[-1], (3, 3, 3))
    return rows


def _write_vae(path: str | os.PathLike, rows: list, dtype: torch.dtype, seed: int, config: dict) -> Written:
    g = torch.Generator().manual_seed(seed)
    values = {ck: _rand(shape, ck, g, ck.endswith("gamma")) for ck, _, shape in rows}
    stored = _store(values, dtype)
    _save(path, stored)
    names = {ck: dk for ck, dk, _ in rows if dk}
    reference = {dk: stored[ck].float() for ck, dk, _ in rows if dk}
    return Written(Path(path), stored, reference, config, names)


def write_comfy_wan22_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                          **cfg: Any) -> Written:
    """A tiny Wan2.2 VAE (48 latent channels) in the original layout of ``wan2.2_vae.safetensors``
    (ComfyUI's ``vae2_2.WanVAE``). ``cfg`` overrides :data:`VAE22_DEFAULTS`."""
    c = {**VAE22_DEFAULTS, **cfg}
    rows = wan22_vae_layout(c["dim"], c["dec_dim"], c["z_dim"], c["dim_mult"], c["num_res_blocks"],
                            c["temperal_downsample"])
    config = dict(base_dim=c["dim"], decoder_base_dim=c["dec_dim"], z_dim=c["z_dim"], dim_mult=list(c["dim_mult"]),
                  num_res_blocks=c["num_res_blocks"], temperal_downsample=list(c["temperal_downsample"]),
                  is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
                  scale_factor_spatial=16, latents_mean=[0.0] * c["z_dim"], latents_std=[1.0] * c["z_dim"])
    return _write_vae(path, rows, dtype, seed, config)


def write_comfy_wan21_vae(path: str | os.PathLike, *, dim: int = 8, z_dim: int = 16, num_res_blocks: int = 1,
                          dim_mult: Sequence[int] = (1, 2, 4, 4), temperal_downsample: Sequence[bool] = (False, True, True),
                          dtype: torch.dtype = torch.float32, seed: int = 0) -> Written:
    """A tiny Wan2.1 VAE (16 latent channels) in the flat original layout of ``wan_2.1_vae.safetensors``
    (ComfyUI's ``vae.WanVAE``) - the file people pick by mistake for the 5B model."""
    rows: list = []
    dims = [dim * u for u in [1, *dim_mult]]
    _conv(rows, "encoder.conv1", None, dims[0], 3, (3, 3, 3))
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            _resblock(rows, f"encoder.downsamples.{n}", None, cin, cout)
            cin, n = cout, n + 1
        if i != len(dim_mult) - 1:
            _conv(rows, f"encoder.downsamples.{n}.resample.1", None, cout, cout, (3, 3))
            if temperal_downsample[i]:
                _conv(rows, f"encoder.downsamples.{n}.time_conv", None, cout, cout, (3, 1, 1))
            n += 1
    _middle(rows, "encoder", dims[-1], False)
    rows.append(("encoder.head.0.gamma", None, (dims[-1], 1, 1, 1)))
    _conv(rows, "encoder.head.2", None, 2 * z_dim, dims[-1], (3, 3, 3))
    _conv(rows, "conv1", None, 2 * z_dim, 2 * z_dim, (1, 1, 1))
    _conv(rows, "conv2", None, z_dim, z_dim, (1, 1, 1))
    ddims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
    up = list(temperal_downsample)[::-1]
    _conv(rows, "decoder.conv1", None, ddims[0], z_dim, (3, 3, 3))
    _middle(rows, "decoder", ddims[0], False)
    n = 0
    for i, (cin, cout) in enumerate(zip(ddims[:-1], ddims[1:])):
        if i in (1, 2, 3):
            cin = cin // 2
        for _ in range(num_res_blocks + 1):
            _resblock(rows, f"decoder.upsamples.{n}", None, cin, cout)
            cin, n = cout, n + 1
        if i != len(dim_mult) - 1:
            _conv(rows, f"decoder.upsamples.{n}.resample.1", None, cout // 2, cout, (3, 3))
            if up[i]:
                _conv(rows, f"decoder.upsamples.{n}.time_conv", None, 2 * cout, cout, (3, 1, 1))
            n += 1
    rows.append(("decoder.head.0.gamma", None, (ddims[-1], 1, 1, 1)))
    _conv(rows, "decoder.head.2", None, 3, ddims[-1], (3, 3, 3))
    return _write_vae(path, rows, dtype, seed, dict(dim=dim, z_dim=z_dim, num_res_blocks=num_res_blocks,
                                                   dim_mult=list(dim_mult), temperal_downsample=list(temperal_downsample)))


# ---------------------------------------------------------------------------------------------- tokenizer
TOKENIZER_SENTENCES = (
    "A man talks to the camera while raising his left hand.",
    "The woman smiles, waves with both hands and nods slowly.",
    "A person in a dark suit speaks calmly in a bright studio.",
    "Then the speaker points to the right and looks back at the camera.",
    "She claps twice, laughs and turns her head to the left.",
    "Ein Mann spricht in die Kamera und hebt die Hand.",
    "Une femme parle à la caméra et sourit.",
    "Un hombre habla y señala hacia la derecha.",
    "一个人对着镜头说话，然后挥手。",
    "blurry, static, distorted, low quality, worst quality, ugly",
)


@functools.lru_cache(maxsize=4)
def tiny_spm_bytes(vocab_size: int = 160) -> bytes:
    """A tiny SentencePiece Unigram model (bytes) with umT5's special ids, trained in-process (~30 ms)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_SENTENCES * 20), model_writer=out, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0,
        hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", minloglevel=2, num_threads=1)
    return out.getvalue()


def tiny_spm_size(data: bytes | None = None) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=data or tiny_spm_bytes()).get_piece_size()


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


# ---------------------------------------------------------------------------------------------- umT5
def umt5_layout(d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int, vocab_size: int,
                buckets: int = 32) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of ComfyUI's ``T5`` built from a umT5 config (identical to transformers' names)."""
    inner = d_kv * num_heads
    rows = [("shared.weight", (vocab_size, d_model))]
    for i in range(num_layers):
        b = f"encoder.block.{i}.layer"
        rows += [(f"{b}.0.SelfAttention.{n}.weight", (inner, d_model)) for n in ("q", "k", "v")]
        rows += [(f"{b}.0.SelfAttention.o.weight", (d_model, inner)),
                 (f"{b}.0.SelfAttention.relative_attention_bias.weight", (buckets, num_heads)),
                 (f"{b}.0.layer_norm.weight", (d_model,)),
                 (f"{b}.1.DenseReluDense.wi_0.weight", (d_ff, d_model)),
                 (f"{b}.1.DenseReluDense.wi_1.weight", (d_ff, d_model)),
                 (f"{b}.1.DenseReluDense.wo.weight", (d_model, d_ff)),
                 (f"{b}.1.layer_norm.weight", (d_model,))]
    rows.append(("encoder.final_layer_norm.weight", (d_model,)))
    return rows


def _fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled e4m3fn, the way ComfyUI makes its fp8_scaled files: scale = amax / 448."""
    scale = (w.abs().amax().float() / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def write_comfy_umt5(path: str | os.PathLike, *, fp8_scaled: bool = False, quant_style: str = "scaled_fp8",
                     dtype: torch.dtype = torch.float16, with_tokenizer: bool = True, seed: int = 0,
                     vocab_size: int | None = None, **cfg: Any) -> Written:
    """A tiny umT5 encoder in the layout of ComfyUI's ``umt5_xxl_fp16.safetensors`` (``fp8_scaled=False``) or
    ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (``fp8_scaled=True``: fp8 linear weights + float32
    ``scale_weight`` + the ``scaled_fp8`` marker; ``quant_style="comfy_quant"`` writes the newer per-layer
    ``comfy_quant`` + ``weight_scale`` form instead). ``with_tokenizer`` stores the ``spiece_model`` tensor.
    ``cfg`` overrides :data:`UMT5_DEFAULTS`."""
    c = {**UMT5_DEFAULTS, **cfg}
    spm_data = tiny_spm_bytes()
    vocab = vocab_size or _round8(tiny_spm_size(spm_data))
    g = torch.Generator().manual_seed(seed)
    rows = umt5_layout(c["d_model"], c["d_kv"], c["d_ff"], c["num_layers"], c["num_heads"], vocab)
    values = {}
    for k, shape in rows:
        if k.endswith("layer_norm.weight"):
            values[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k == "shared.weight" or "relative_attention_bias" in k:
            values[k] = torch.randn(shape, generator=g) * (1.0 if k == "shared.weight" else 0.5)
        else:
            values[k] = _rand(shape, k, g, False)
    stored: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for k, v in values.items():
        linear = any(f".{n}.weight" in k for n in ("q", "k", "v", "o", "wi_0", "wi_1", "wo"))
        if fp8_scaled and linear:
            q, scale = _fp8_quantize(v)
            layer = k[: -len(".weight")]
            stored[k] = q
            if quant_style == "comfy_quant":
                stored[f"{layer}.weight_scale"] = scale
                stored[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                              dtype=torch.uint8)
            else:
                stored[f"{layer}.scale_weight"] = scale
                if k.endswith("SelfAttention.q.weight"):
                    stored[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
            reference[k] = q.float() * scale
        else:
            stored[k] = v.to(dtype)
            reference[k] = stored[k].float()
    if fp8_scaled and quant_style != "comfy_quant":
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if with_tokenizer:
        stored["spiece_model"] = torch.frombuffer(bytearray(spm_data), dtype=torch.uint8)
    _save(path, stored)
    config = dict(vocab_size=vocab, d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"], num_layers=c["num_layers"],
                  num_heads=c["num_heads"], relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                  tie_word_embeddings=False)
    return Written(Path(path), stored, reference, config)


# ---------------------------------------------------------------------------------------------- wav2vec2
def wav2vec2_layout(size: str, hidden_size: int, num_layers: int, conv_dim: int = 512, pos_kernel: int = 128,
                    pos_groups: int = 16, intermediate_size: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of ComfyUI's ``Wav2Vec2Model``: large = layer-norm convs with bias; base = group norm on the
    first conv, no conv bias."""
    large = size == "large"
    kernels = (10, 3, 3, 3, 3, 2, 2)
    rows: list = []
    for i, k in enumerate(kernels):
        cin = 1 if i == 0 else conv_dim
        rows.append((f"feature_extractor.conv_layers.{i}.conv.weight", (conv_dim, cin, k)))
        if large:
            rows.append((f"feature_extractor.conv_layers.{i}.conv.bias", (conv_dim,)))
        if large or i == 0:
            rows.append((f"feature_extractor.conv_layers.{i}.layer_norm.weight", (conv_dim,)))
            rows.append((f"feature_extractor.conv_layers.{i}.layer_norm.bias", (conv_dim,)))
    rows += [("feature_projection.layer_norm.weight", (conv_dim,)), ("feature_projection.layer_norm.bias", (conv_dim,)),
             ("feature_projection.projection.weight", (hidden_size, conv_dim)),
             ("feature_projection.projection.bias", (hidden_size,)), ("masked_spec_embed", (hidden_size,)),
             ("encoder.pos_conv_embed.conv.bias", (hidden_size,)),
             ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", (1, 1, pos_kernel)),
             ("encoder.pos_conv_embed.conv.parametrizations.weight.original1",
              (hidden_size, hidden_size // pos_groups, pos_kernel)),
             ("encoder.layer_norm.weight", (hidden_size,)), ("encoder.layer_norm.bias", (hidden_size,))]
    inter = intermediate_size or 4 * hidden_size
    for i in range(num_layers):
        b = f"encoder.layers.{i}"
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            rows += [(f"{b}.attention.{n}.weight", (hidden_size, hidden_size)), (f"{b}.attention.{n}.bias", (hidden_size,))]
        rows += [(f"{b}.layer_norm.weight", (hidden_size,)), (f"{b}.layer_norm.bias", (hidden_size,)),
                 (f"{b}.feed_forward.intermediate_dense.weight", (inter, hidden_size)),
                 (f"{b}.feed_forward.intermediate_dense.bias", (inter,)),
                 (f"{b}.feed_forward.output_dense.weight", (hidden_size, inter)),
                 (f"{b}.feed_forward.output_dense.bias", (hidden_size,)),
                 (f"{b}.final_layer_norm.weight", (hidden_size,)), (f"{b}.final_layer_norm.bias", (hidden_size,))]
    return rows


def write_comfy_wav2vec2(path: str | os.PathLike, *, size: str = "large", prefix: str = "",
                         dtype: torch.dtype = torch.float16, seed: int = 0, **cfg: Any) -> Written:
    """A wav2vec2 encoder in the layout of ComfyUI's ``audio_encoders`` files: ``size="large"`` like
    ``wav2vec2_large_english_fp16`` (stable layer norm), ``"base"`` like ``wav2vec2-chinese-base_fp16``. Tiny
    widths by default (:data:`WAV2VEC2_DEFAULTS`; ComfyUI's AudioEncoderLoader itself only accepts hidden_size
    1024/768). ``prefix="wav2vec2."`` writes HF-style keys."""
    if size not in ("large", "base"):
        raise ValueError("size must be 'large' or 'base'")
    c = {**WAV2VEC2_DEFAULTS, **cfg}
    rows = wav2vec2_layout(size, c["hidden_size"], c["num_layers"], c["conv_dim"], c["pos_kernel"], c["pos_groups"],
                           c.get("intermediate_size"))
    g = torch.Generator().manual_seed(seed)
    values = {}
    for k, shape in rows:
        norm = ("layer_norm.weight" in k) or k.endswith("original0")
        values[k] = _rand(shape, k, g, norm)
        if k.endswith("original0"):
            values[k] = values[k] * 2.0
    stored = _store(values, dtype)
    _save(path, {prefix + k: v for k, v in stored.items()})
    hidden = c["hidden_size"]
    heads = hidden // 64 if hidden % 64 == 0 else max(1, hidden // 16)
    config = dict(hidden_size=hidden, num_hidden_layers=c["num_layers"], num_attention_heads=heads,
                  intermediate_size=c.get("intermediate_size") or 4 * hidden, conv_dim=(c["conv_dim"],) * 7,
                  conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=size == "large",
                  feat_extract_norm="layer" if size == "large" else "group", do_stable_layer_norm=size == "large",
                  num_conv_pos_embeddings=c["pos_kernel"], num_conv_pos_embedding_groups=c["pos_groups"])
    reference = {k: v.float() for k, v in stored.items()}
    return Written(Path(path), {prefix + k: v for k, v in stored.items()}, reference, config)


# ---------------------------------------------------------------------------------------------- folders
def write_diffusers_wan_transformer(folder: str | os.PathLike, *, max_shard_size: str | None = None, seed: int = 0,
                                    **cfg: Any) -> Written:
    """A diffusers ``WanTransformer3DModel`` folder (``config.json`` + safetensors, sharded with
    ``max_shard_size``). ``cfg`` overrides ``actavatar_core.tiny.TINY_TRANSFORMER``."""
    from actavatar_core.tiny import TINY_TRANSFORMER, tiny_wan_transformer

    model = tiny_wan_transformer(seed=seed, **cfg)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Written(Path(folder), sd, sd, {**TINY_TRANSFORMER, **cfg})


def write_diffusers_wan_vae(folder: str | os.PathLike, *, seed: int = 0, **cfg: Any) -> Written:
    """A diffusers ``AutoencoderKLWan`` (Wan2.2) folder; ``cfg`` overrides ``actavatar_core.tiny.TINY_VAE``."""
    from actavatar_core.tiny import TINY_VAE, tiny_vae

    model = tiny_vae(seed=seed, **cfg)
    model.save_pretrained(str(folder), safe_serialization=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Written(Path(folder), sd, sd, {**TINY_VAE, **cfg})


def write_hf_umt5(folder: str | os.PathLike, *, tokenizer: str = "folder", seed: int = 0, **cfg: Any) -> Written:
    """A diffusers-style text encoder: ``folder/text_encoder`` (UMT5EncoderModel.save_pretrained) and, with
    ``tokenizer="folder"``, ``folder/tokenizer`` (tokenizer.json of the tiny SentencePiece model); ``"spiece"`` puts
    only ``spiece.model`` there; ``"none"`` writes no tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    from actavatar_core.convert.spm import build_tokenizer

    folder = Path(folder)
    c = {**UMT5_DEFAULTS, **cfg}
    spm_data = tiny_spm_bytes()
    vocab = _round8(tiny_spm_size(spm_data))
    config = dict(vocab_size=vocab, d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"], num_layers=c["num_layers"],
                  num_heads=c["num_heads"], feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**config)).eval()
    model.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    tok_dir = folder / "tokenizer"
    if tokenizer == "folder":
        build_tokenizer(spm_data).save_pretrained(str(tok_dir))
    elif tokenizer == "spiece":
        tok_dir.mkdir(parents=True, exist_ok=True)
        (tok_dir / "spiece.model").write_bytes(spm_data)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Written(folder / "text_encoder", sd, sd, config)


def write_hf_wav2vec2(folder: str | os.PathLike, *, size: str = "base", ctc_head: bool = False,
                      do_normalize: bool | None = None, seed: int = 0, **cfg: Any) -> Written:
    """A transformers wav2vec2 folder (config.json + model.safetensors + preprocessor_config.json). With
    ``ctc_head`` the weights are a ``Wav2Vec2ForCTC`` (``wav2vec2.`` prefix + ``lm_head``), like most hub
    checkpoints."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Model

    from actavatar_core.tiny import TINY_WAV2VEC2

    folder = Path(folder)
    large = size == "large"
    config = {**TINY_WAV2VEC2, "do_stable_layer_norm": large, "feat_extract_norm": "layer" if large else "group",
              "conv_bias": large, **cfg}
    torch.manual_seed(seed)
    wcfg = Wav2Vec2Config(**config)
    model = (Wav2Vec2ForCTC(wcfg) if ctc_head else Wav2Vec2Model(wcfg)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    norm = large if do_normalize is None else do_normalize
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": norm, "feature_size": 1, "sampling_rate": 16000, "padding_value": 0.0,
         "return_attention_mask": large, "feature_extractor_type": "Wav2Vec2FeatureExtractor"}), encoding="utf-8")
    base = model.wav2vec2 if ctc_head else model
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    return Written(folder, sd, sd, config)


def write_diffusers_pipeline(root: str | os.PathLike, *, seed: int = 0) -> dict[str, Written]:
    """A minimal offline Wan pipeline folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/."""
    root = Path(root)
    parts = {
        "transformer": write_diffusers_wan_transformer(root / "transformer", seed=seed,
                                                       text_dim=UMT5_DEFAULTS["d_model"]),
        "vae": write_diffusers_wan_vae(root / "vae", seed=seed),
        "text_encoder": write_hf_umt5(root, seed=seed),
    }
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"]}, indent=2), encoding="utf-8")
    return parts


def fill_comfy_models_folder(models: str | os.PathLike, *, seed: int = 0, base_audio: bool = False,
                             umt5_fp16: bool = False) -> dict[str, Written]:
    """Fill a ComfyUI ``models/`` folder with tiny files under the real file names (:data:`COMFY_FILE_NAMES`):
    transformer (with the ``model.diffusion_model.`` prefix), Wan2.2 VAE, fp8-scaled umT5 with its tokenizer,
    wav2vec2-large (and optionally the fp16 umT5 and the chinese-base wav2vec2)."""
    models = Path(models)
    out = {
        "transformer": write_comfy_wan_transformer(models / COMFY_FILE_NAMES["transformer"], prefix=True, seed=seed),
        "vae": write_comfy_wan22_vae(models / COMFY_FILE_NAMES["vae"], seed=seed),
        "text_encoder": write_comfy_umt5(models / COMFY_FILE_NAMES["text_encoder"], fp8_scaled=True, seed=seed),
        "audio_encoder": write_comfy_wav2vec2(models / COMFY_FILE_NAMES["audio_encoder"], size="large", seed=seed),
    }
    if umt5_fp16:
        out["text_encoder_fp16"] = write_comfy_umt5(models / COMFY_FILE_NAMES["text_encoder_fp16"], seed=seed)
    if base_audio:
        out["audio_encoder_base"] = write_comfy_wav2vec2(models / COMFY_FILE_NAMES["audio_encoder_base"], size="base",
                                                         seed=seed)
    return out
