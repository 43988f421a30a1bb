"""Wan2.2 VAE helpers on diffusers' ``AutoencoderKLWan``: reference-image encoding and streamed decoding.

Latents are kept normalised, ``(z - latents_mean) / latents_std``, as Wan's pipelines feed the transformer.
Streamed decoding runs the decoder latent frame by latent frame with the VAE's own causal feature cache, exactly
like ``AutoencoderKLWan.decode``, but hands every chunk of frames back as uint8 on the CPU at once, so device
memory stays bounded by one chunk and long clips can be written to disk while they decode.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import SizeError
from .video import fit_image

#: Pixels per transformer token along each side: VAE stride 16 times patch 2.
SIZE_STEP = 32


def check_size(width: int, height: int, step: int = SIZE_STEP) -> None:
    """Refuse sizes the VAE and patch strides cannot represent, naming the nearest valid ones."""
    bad = [(name, v) for name, v in (("width", width), ("height", height)) if v < step or v % step]
    if bad:
        fixes = []
        for name, v in bad:
            lower = max(step, v - v % step)
            upper = lower + step if v % step else lower
            fixes.append(f"{name} {lower}" + (f" or {upper}" if upper != lower else ""))
        raise SizeError(
            f"{' and '.join(f'{n} {v}' for n, v in bad)} is not a multiple of {step} (the Wan2.2 VAE stride 16 x patch 2).",
            f"Use {', '.join(fixes)}.",
        )


def latent_stats(vae: Any, device: Any = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=dtype, device=device).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=dtype, device=device).view(1, z, 1, 1, 1)
    return mean, std


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (1, 3, 1, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (1, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(frames, dtype=np.uint8, copy=True)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (B=1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3) on the CPU."""
    x = ((video[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def encode_video(vae: Any, video: torch.Tensor) -> torch.Tensor:
    """Normalised latents of a (1, 3, T, H, W) [-1, 1] video (the distribution's mode, as Wan's pipelines use)."""
    param = next(vae.parameters())
    tiling = getattr(vae, "use_tiling", False)
    vae.use_tiling = False  # the reference is one frame: encoded whole, so a tiled-decode memory mode keeps its latent
    try:
        latents = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode().float()
    finally:
        vae.use_tiling = tiling
    mean, std = latent_stats(vae, latents.device)
    return (latents - mean) / std


def encode_reference(vae: Any, image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """The reference image, fitted to (height, width), as the clean first latent frame (1, C, 1, h, w)."""
    check_size(width, height, min(SIZE_STEP, int(vae.config.scale_factor_spatial)))
    return encode_video(vae, image_to_tensor(fit_image(image, width, height)))


def decode_stream(vae: Any, latents: torch.Tensor, chunk_latent_frames: int = 4,
                  check_cancel: Callable[[], None] | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 (t, H, W, 3) frame chunks of the decoded video, ``chunk_latent_frames`` latent frames at a time
    (1 latent frame -> 1 pixel frame for the first, 4 after)."""
    for chunk in decode_chunks(vae, latents, chunk_latent_frames, check_cancel):
        yield tensor_to_frames(chunk)


@torch.no_grad()
def decode_chunks(vae: Any, latents: torch.Tensor, chunk_latent_frames: int = 4,
                  check_cancel: Callable[[], None] | None = None) -> Iterator[torch.Tensor]:
    """Float (1, 3, t, H, W) chunks in [-1, 1]; concatenated they equal ``vae.decode`` of the whole latent (with
    diffusers' tiling switched on, ``vae.enable_tiling()``, they equal its ``tiled_decode``)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    param = next(vae.parameters())
    mean, std = latent_stats(vae, param.device)
    z = latents.to(param.device, torch.float32) * std + mean
    z = z.to(param.dtype)
    if _tiles(vae, z) is not None:
        yield from _decode_chunks_tiled(vae, z, chunk_latent_frames, check_cancel)
        return
    vae.clear_cache()
    try:
        pending: list[torch.Tensor] = []
        for i in range(z.shape[2]):
            if check_cancel is not None:
                check_cancel()
            x = vae.post_quant_conv(z[:, :, i : i + 1])
            vae._conv_idx = [0]
            kwargs = {"first_chunk": True} if i == 0 else {}
            out = vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kwargs)
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            pending.append(out.clamp(-1.0, 1.0))
            if len(pending) >= chunk_latent_frames or i == z.shape[2] - 1:
                yield torch.cat(pending, dim=2)
                pending = []
    finally:
        vae.clear_cache()


def _tiles(vae: Any, z: torch.Tensor) -> dict[str, int] | None:
    """diffusers' tile geometry for ``z`` (latent and pixel strides, blend widths), or None when
    ``AutoencoderKLWan._decode`` would not tile: tiling off, or a latent no larger than one tile."""
    height, width = z.shape[-2:]
    ratio = vae.spatial_compression_ratio
    if not getattr(vae, "use_tiling", False) or (width <= vae.tile_sample_min_width // ratio
                                                 and height <= vae.tile_sample_min_height // ratio):
        return None
    patch = vae.config.patch_size or 1
    stride_h, stride_w = vae.tile_sample_stride_height // patch, vae.tile_sample_stride_width // patch
    return {"lat_h": vae.tile_sample_min_height // ratio, "lat_w": vae.tile_sample_min_width // ratio,
            "lat_stride_h": vae.tile_sample_stride_height // ratio, "lat_stride_w": vae.tile_sample_stride_width // ratio,
            "stride_h": stride_h, "stride_w": stride_w, "blend_h": vae.tile_sample_min_height // patch - stride_h,
            "blend_w": vae.tile_sample_min_width // patch - stride_w,
            "height": height * ratio // patch, "width": width * ratio // patch}


def _decode_chunks_tiled(vae: Any, z: torch.Tensor, chunk_latent_frames: int,
                         check_cancel: Callable[[], None] | None) -> Iterator[torch.Tensor]:
    """``AutoencoderKLWan.tiled_decode`` streamed in time: each spatial tile keeps its own causal feature cache
    across chunks, and every chunk's tiles are blended and cropped exactly as ``tiled_decode`` does for the whole
    clip (its blends are per frame), so device memory holds one tile's activations and one chunk of frames."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    g = _tiles(vae, z)
    assert g is not None
    height, width = z.shape[-2:]
    origins = [(i, j) for i in range(0, height, g["lat_stride_h"]) for j in range(0, width, g["lat_stride_w"])]
    caches: dict[tuple[int, int], list] = {}
    try:
        for first in range(0, z.shape[2], chunk_latent_frames):
            if check_cancel is not None:
                check_cancel()
            decoded: dict[tuple[int, int], torch.Tensor] = {}
            for i, j in origins:
                vae.clear_cache()
                vae._feat_map = caches.setdefault((i, j), vae._feat_map)
                frames = []
                for k in range(first, min(first + chunk_latent_frames, z.shape[2])):
                    vae._conv_idx = [0]
                    tile = vae.post_quant_conv(z[:, :, k: k + 1, i: i + g["lat_h"], j: j + g["lat_w"]])
                    frames.append(vae.decoder(tile, feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                              first_chunk=(k == 0)))
                decoded[(i, j)] = torch.cat(frames, dim=2)
            rows_i = sorted({i for i, _ in origins})
            cols_j = sorted({j for _, j in origins})
            rows = [[decoded[(i, j)] for j in cols_j] for i in rows_i]
            result_rows = []
            for r, row in enumerate(rows):
                result_row = []
                for c, tile in enumerate(row):
                    if r > 0:
                        tile = vae.blend_v(rows[r - 1][c], tile, g["blend_h"])
                    if c > 0:
                        tile = vae.blend_h(row[c - 1], tile, g["blend_w"])
                    result_row.append(tile[:, :, :, :g["stride_h"], :g["stride_w"]])
                result_rows.append(torch.cat(result_row, dim=-1))
            out = torch.cat(result_rows, dim=3)[:, :, :, :g["height"], :g["width"]]
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            yield out.clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()


def decode_latents(vae: Any, latents: torch.Tensor, chunk_latent_frames: int = 4,
                   check_cancel: Callable[[], None] | None = None) -> np.ndarray:
    """All frames as one uint8 (T, H, W, 3) array (decoded in chunks)."""
    return np.concatenate(list(decode_stream(vae, latents, chunk_latent_frames, check_cancel)), axis=0)
