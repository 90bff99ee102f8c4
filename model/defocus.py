"""De-focus attention for the holistic embedding module (HOVLE.md, last section): a learnable per-head decay
among image tokens (`ImageDecayBias`) and RoPE with learnable frequencies per KV-head group
(`LearnableRotaryEmbedding`), so that each head forms its own band-pass; drop path on each residual branch,
its rate rising over training and spread over depth. transformers' attention applies one (cos, sin) to all
heads, hence `decoder_layer_forward`: a Llama decoder layer's step on its own submodules (same weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half


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
    """RoPE with learnable inverse frequencies per KV-head group, initialised from `theta` as standard RoPE.

    `log_inv_freq` is [num_groups, head_dim / 2]; group g serves KV head g and the query heads that read it.
    """

    def __init__(self, head_dim: int, theta: float, num_groups: int = 1):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.log_inv_freq = nn.Parameter(torch.empty(num_groups, head_dim // 2))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        self.log_inv_freq.copy_((-exponents * math.log(self.theta)).expand_as(self.log_inv_freq))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, L] -> (cos, sin) each [b, groups, L, head_dim], in `hidden`'s dtype."""
        inv_freq = self.log_inv_freq.float().exp()  # [groups, head_dim / 2]
        freqs = position_ids[:, None, :, None].float() * inv_freq[None, :, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(hidden.dtype), emb.sin().to(hidden.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, heads, L, d] by cos/sin [b, L, d] (one set for all heads) or [b, groups, L, d]
    (one set per KV-head group; head h uses group h // (heads / groups))."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    elif cos.shape[1] != x.shape[1]:
        repeat = x.shape[1] // cos.shape[1]
        cos, sin = cos.repeat_interleave(repeat, dim=1), sin.repeat_interleave(repeat, dim=1)
    return x * cos + rotate_half(x) * sin


def decoder_layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache=None,
    drop_rate: float = 0.0,
    **kwargs,
) -> torch.Tensor:
    """A `LlamaDecoderLayer` step on its own submodules: hidden [b, L, hidden] -> [b, L, hidden].

    Mirrors `LlamaDecoderLayer.forward` + `LlamaAttention.forward` (transformers 5.24), except that the
    rotary (`apply_rotary`) may differ per head and each residual branch (attention, MLP) is dropped with
    `drop_rate` in training. `attention_mask` is the additive or boolean 4D mask (with any per-head bias).
    """
    if layer.gradient_checkpointing and layer.training:
        # as GradientCheckpointingLayer does: recompute in backward, and no cache writes to replay
        def step(hidden: torch.Tensor) -> torch.Tensor:
            return _layer_step(layer, hidden, attention_mask, position_embeddings, None, drop_rate, **kwargs)

        return layer._gradient_checkpointing_func(step, hidden)
    return _layer_step(layer, hidden, attention_mask, position_embeddings, cache, drop_rate, **kwargs)


def _layer_step(layer, hidden, attention_mask, position_embeddings, cache, drop_rate, **kwargs):
    attn = layer.self_attn
    residual = hidden
    states = layer.input_layernorm(hidden)
    shape = (*states.shape[:-1], -1, attn.head_dim)
    query = attn.q_proj(states).view(shape).transpose(1, 2)
    key = attn.k_proj(states).view(shape).transpose(1, 2)
    value = attn.v_proj(states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, eager_attention_forward
    )
    dropout = attn.attention_dropout if attn.training else 0.0
    out, _ = attention(
        attn, query, key, value, attention_mask, dropout=dropout, scaling=attn.scaling, **kwargs
    )
    out = attn.o_proj(out.reshape(*states.shape[:-1], -1).contiguous())
    hidden = residual + drop_path(out, drop_rate, layer.training)
    out = layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden + drop_path(out, drop_rate, layer.training)


def drop_path(update: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Drop a residual branch's output [b, ...] per sample with probability `rate`; rescale the rest."""
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
