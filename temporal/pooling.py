"""Pooling over frames: ``[B,T,D]`` + mask -> ``[B,D]``, L2-normalised in the joint space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mean_pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean over frames, L2-normalised. ``mask[b, t]`` is True for real (non-padding) frames."""
    if mask is None:
        return F.normalize(x.mean(1), dim=-1)
    w = mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
    return F.normalize((x * w).sum(1) / w.sum(1).clamp_min(1), dim=-1)


def time_features(times_s: torch.Tensor, dim: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sinusoidal features ``[B,T,dim]`` of each frame's time relative to its segment's start and length
    (padding, where ``mask`` is False, is left out of the length)."""
    rel = times_s - times_s[:, :1]
    span = (rel if mask is None else rel.masked_fill(~mask, 0)).amax(dim=1, keepdim=True).clamp_min(1e-6)
    pos = torch.stack([rel / span, rel], dim=-1)  # [B, T, 2]: fraction of the segment, seconds
    freqs = torch.exp(torch.arange(dim // 4, dtype=times_s.dtype) * (-math.log(100.0) / max(dim // 4, 1)))
    angles = pos.unsqueeze(-1) * freqs * math.pi  # [B, T, 2, dim/4]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)


class AttentionPooling(nn.Module):
    """A pre-LN transformer over time-embedded frames, then a learned-query attention pooler, added as a
    zero-initialised residual to the mean: untrained, it is exactly mean pooling.

    The transformer sees each frame's deviation from the segment mean, layer-normalised: consecutive frame
    embeddings of a video agree to ~0.999 cosine, so what happens over time lives in small differences that
    would otherwise be drowned by the shared content."""

    def __init__(self, dim: int, *, heads: int = 4, layers: int = 1, queries: int = 1):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.ln_in = nn.LayerNorm(dim)
        self.time_proj = nn.Linear(4 * (dim // 4), dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(queries, dim) * dim ** -0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q, self.ln_k = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.out = nn.Linear(queries * dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, times_s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Frames ``[B,T,D]``, their times ``[B,T]`` in seconds, mask ``[B,T]`` -> ``[B,D]`` normalised."""
        mean = mean_pool(x, mask)
        pad = None if mask is None else ~mask
        w = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
        centre = (x * w[..., None]).sum(1, keepdim=True) / w.sum(1).clamp_min(1)[:, None, None]  # unnormalised mean
        tokens = self.ln_in(x - centre) + self.time_proj(time_features(times_s, x.shape[-1], mask))
        h = self.blocks(tokens, src_key_padding_mask=pad)
        q = self.ln_q(self.query).expand(x.shape[0], -1, -1)
        pooled, _ = self.attn(q, self.ln_k(h), self.ln_k(h), key_padding_mask=pad, need_weights=False)
        return F.normalize(mean + self.out(pooled.flatten(1)), dim=-1)


def build_pooler(kind: str, dim: int) -> nn.Module | None:
    """``mean`` -> None (use :func:`mean_pool`); ``attention`` -> an :class:`AttentionPooling`."""
    match kind:
        case "mean":
            return None
        case "attention":
            return AttentionPooling(dim)
    raise ValueError(f"unknown temporal pooling {kind!r}; expected mean or attention")
