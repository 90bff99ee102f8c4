"""De-focus attention pieces for the holistic embedding module (HOVLE.md, last section).

- `ImageDecayBias`: a learnable per-head decay lambda = -exp(lambda_hat) among image tokens, added to the
  attention logits as lambda * (t - s) before the softmax (a low-pass filter per head).
- `LearnableRotaryEmbedding`: RoPE whose frequencies are parameters, so that together with the decay
  each layer forms its own band-pass. The reused transformers attention applies one (cos, sin) pair to
  all heads of a layer, so the frequencies are learned per layer (the decay is per head).
- `drop_path`: stochastic depth on a whole layer's residual update, with a rate schedule that rises
  linearly over training and is spread linearly over depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ImageDecayBias(nn.Module):
    """Per-head additive attention bias lambda_h * (t - s) between image tokens t >= s.

    Heads start at different decay rates (from 2^-1 to 2^-8 per token) so they cover different bands.
    """

    def __init__(self, num_heads: int):
        super().__init__()
        self.log_rate = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        heads = self.log_rate.numel()
        rates = torch.logspace(-1, -8, heads, base=2.0) if heads > 1 else torch.tensor([0.5**4])
        self.log_rate.copy_(rates.log())

    def forward(self, image_mask: torch.Tensor) -> torch.Tensor:
        """image_mask [b, L] bool -> bias [b, heads, L, L] (zero unless query and key are image tokens)."""
        length = image_mask.shape[1]
        index = torch.arange(length, device=image_mask.device, dtype=torch.float32)
        distance = (index[:, None] - index[None, :]).clamp(min=0)  # t - s, causal part only
        both = (image_mask[:, :, None] & image_mask[:, None, :]).unsqueeze(1)  # [b, 1, L, L]
        decay = -self.log_rate.exp().view(1, -1, 1, 1)  # lambda = -exp(lambda_hat) < 0
        return decay * distance * both


class LearnableRotaryEmbedding(nn.Module):
    """RoPE with learnable inverse frequencies, initialised from `theta` as in standard RoPE."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.log_inv_freq = nn.Parameter(torch.empty(head_dim // 2))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        self.log_inv_freq.copy_(-exponents * math.log(self.theta))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, L] -> (cos, sin) each [b, L, head_dim], in `hidden`'s dtype."""
        freqs = position_ids[..., None].float() * self.log_inv_freq.exp()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(hidden.dtype), emb.sin().to(hidden.dtype)


def drop_path(update: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Drop a layer's residual update [b, ...] per sample with probability `rate`; rescale the rest."""
    if not training or rate <= 0.0:
        return update
    keep = torch.empty(update.shape[0], *([1] * (update.dim() - 1)), device=update.device)
    keep = keep.bernoulli_(1.0 - rate).to(update.dtype)
    return update * keep / (1.0 - rate)


def layer_drop_rates(max_rate: float, num_layers: int) -> list[float]:
    """Rates spread linearly over depth: layer i of N drops with max_rate * (i + 1) / N."""
    return [max_rate * (i + 1) / num_layers for i in range(num_layers)]


def scheduled_rate(start: float, end: float, progress: float) -> float:
    """The de-focus schedule: a rate rising linearly from `start` to `end` as progress goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress
