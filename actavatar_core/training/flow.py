"""The flow-matching objective (rectified flow), with the same timestep shift and TI2V first-frame rule as sampling.

x_t = (1 - s) x_0 + s n,  target v = n - x_0,  s = shift * u / (1 + (shift - 1) u),  u ~ U(0, 1).

The first latent frame stays clean (it is the reference image at inference), its tokens get timestep 0, and it is
left out of the loss.

With ``motion_weight`` w > 0 each latent position's error is weighted by 1 + w * m / mean(m), where m is how far the
clean latent there strays from its own temporal mean. A talking avatar is mostly static (background, body, the
reference colours); the mouth and the actions, which carry the audio and the phase prompts, are a small moving part
of the frame that a plain mean lets the model neglect. The weights come from the clip itself, no masks needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..attention import BatchRouting


def shifted_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(batch, generator=generator)
    return shift * u / (1 + (shift - 1) * u)


def motion_weights(clean: torch.Tensor, weight: float, frame_dim: int = 2) -> torch.Tensor:
    """Per-position loss weights 1 + weight * m / mean(m) of a clip (B, C, F, H, W) with m the channel-mean distance
    from the temporal mean; shape (B, 1, F, H, W), mean 1 + weight per clip (a static clip gets all ones)."""
    m = (clean - clean.mean(dim=frame_dim, keepdim=True)).abs().mean(dim=1, keepdim=True)
    scale = m.mean(dim=tuple(range(2, m.dim())), keepdim=True)
    return 1.0 + weight * m / scale.clamp_min(1e-6) * (scale > 1e-6)


def weighted_mean(err: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``err`` under ``weights`` (normalised, so the loss keeps the scale of a plain mean)."""
    if weights is None:
        return err.mean()
    weights = weights.expand_as(err)
    return (err * weights).sum() / weights.sum()


def flow_matching_loss(model: Any, latents: torch.Tensor, text: torch.Tensor, *, phase_ids: torch.Tensor | None,
                       audio: torch.Tensor | None, shift: float, generator: torch.Generator, paca_mode: str = "learned",
                       patch_size: tuple[int, int, int] = (1, 2, 2), motion_weight: float = 0.0,
                       routing: "BatchRouting | None" = None) -> torch.Tensor:
    """Mean squared error of the predicted velocity on every latent frame but the first (motion-weighted if asked).
    ``routing`` (a :class:`~actavatar_core.attention.BatchRouting`) is what ``routed`` mode attends through."""
    b, _, f, h, w = latents.shape
    device = latents.device
    sigma = shifted_sigmas(b, shift, generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    s = sigma.view(b, 1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    noisy[:, :, 0] = latents[:, :, 0]
    target = noise - latents
    _, p_h, p_w = patch_size
    per_frame = (h // p_h) * (w // p_w)
    timestep = (sigma * 1000.0)[:, None].repeat(1, f * per_frame)
    timestep[:, :per_frame] = 0.0
    pred = model(noisy, timestep, text, phase_ids=phase_ids, audio_features=audio, paca_mode=paca_mode,
                 routing=routing, return_dict=False)[0]
    err = (pred[:, :, 1:].float() - target[:, :, 1:].float()).square()
    weights = motion_weights(latents[:, :, 1:].float(), motion_weight) if motion_weight > 0 else None
    return weighted_mean(err, weights)
