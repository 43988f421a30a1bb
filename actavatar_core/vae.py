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
    latents = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode().float()
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
    """Float (1, 3, t, H, W) chunks in [-1, 1]; concatenated they equal ``vae.decode`` of the whole latent."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    param = next(vae.parameters())
    mean, std = latent_stats(vae, param.device)
    z = latents.to(param.device, torch.float32) * std + mean
    z = z.to(param.dtype)
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


def decode_latents(vae: Any, latents: torch.Tensor, chunk_latent_frames: int = 4,
                   check_cancel: Callable[[], None] | None = None) -> np.ndarray:
    """All frames as one uint8 (T, H, W, 3) array (decoded in chunks)."""
    return np.concatenate(list(decode_stream(vae, latents, chunk_latent_frames, check_cancel)), axis=0)
