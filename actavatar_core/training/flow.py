"""The flow-matching objective (rectified flow), with the same timestep shift and TI2V first-frame rule as sampling.

x_t = (1 - s) x_0 + s n,  target v = n - x_0,  s = shift * u / (1 + (shift - 1) u),  u ~ U(0, 1).

The first latent frame stays clean (it is the reference image at inference), its tokens get timestep 0, and it is
left out of the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def shifted_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(batch, generator=generator)
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(model: Any, latents: torch.Tensor, text: torch.Tensor, *, phase_ids: torch.Tensor | None,
                       audio: torch.Tensor | None, shift: float, generator: torch.Generator, paca_mode: str = "learned",
                       patch_size: tuple[int, int, int] = (1, 2, 2)) -> torch.Tensor:
    """Mean squared error of the predicted velocity on every latent frame but the first."""
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
                 return_dict=False)[0]
    return F.mse_loss(pred[:, :, 1:].float(), target[:, :, 1:].float())
