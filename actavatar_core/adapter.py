"""The audio adapter: wav2vec2 windows -> per-latent-frame audio tokens, and the depth schedule of the audio
cross-attention residuals (progressive audio-visual alignment).

The audio cross-attention itself is a diffusers ``WanAttention`` per block (see ``model.py``) driven by
:class:`~actavatar_core.attention.FrameAudioProcessor`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

AUDIO_SCHEDULES = ("progressive", "uniform", "custom")


def audio_scales(num_layers: int, schedule: str = "progressive", gamma: float = 1.5,
                 values: Sequence[float] | None = None) -> list[float]:
    """Residual scale of the audio cross-attention of each block, 1-based: f(l) = (l / L) ** gamma.

    ``uniform`` gives 1 everywhere; ``custom`` takes one value per block.
    """
    if schedule == "progressive":
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"audio gamma must be a positive number, got {gamma!r}")
        return [(layer / num_layers) ** gamma for layer in range(1, num_layers + 1)]
    if schedule == "uniform":
        return [1.0] * num_layers
    if schedule == "custom":
        if values is None or len(values) != num_layers:
            raise ValueError(f"a custom audio schedule needs {num_layers} values (one per block), got {0 if values is None else len(values)}")
        return [float(v) for v in values]
    raise ValueError(f"unknown audio schedule {schedule!r}; choose one of {', '.join(AUDIO_SCHEDULES)}")


class AudioProjection(nn.Module):
    """Windows of wav2vec2 features -> ``num_tokens`` audio tokens of width ``dim`` per latent frame.

    Input (B, F, W, L, C): for each of F latent frames, W video-rate audio frames around it, L encoder layers
    (the embedding output plus every transformer layer), C channels. The layers are mixed by learned softmax
    weights (starting from the mean), the window is flattened and an MLP maps it to the tokens.
    """

    def __init__(self, feature_dim: int, num_layers: int, window: int, dim: int, num_tokens: int = 4,
                 hidden_dim: int = 512, eps: float = 1e-6):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.layer_weights = nn.Parameter(torch.zeros(num_layers))
        self.proj_in = nn.Linear(window * feature_dim, hidden_dim)
        self.act = nn.GELU()
        self.proj_mid = nn.Linear(hidden_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, num_tokens * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.layer_weights.float(), dim=0).to(features.dtype)
        mixed = torch.einsum("bfwlc,l->bfwc", features, weights)  # (B, F, W, C)
        x = self.act(self.proj_in(mixed.flatten(2)))
        x = self.act(self.proj_mid(x))
        tokens = self.proj_out(x).unflatten(-1, (self.num_tokens, self.dim))  # (B, F, T, D)
        return self.norm(tokens)
