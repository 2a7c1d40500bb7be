"""Building blocks shared by the IBE and the AdaX denoiser.

Everything with weights is made of nn.Linear / nn.LayerNorm / nn.Embedding, the layers for which
Opacus computes per-sample gradients; there is no bare nn.Parameter anywhere.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ---------------------------------------------------------------------------------------------

def rope_cos_sin(length: int, dim: int, device: torch.device, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (length, dim) for rotate-half RoPE. Computed on the fly: no buffers to move."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, L, D) queries or keys by their position; q.k then depends on relative position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention from plain nn.Linear layers (self- or cross-attention).

    Self-attention when `context` is None. `mask` (B, S) marks valid context tokens (True = valid);
    a query whose context has no valid token at all receives zero (never NaN).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None,
                 rope: bool = False, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.rope = heads, rope
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        # The DiT cross-attention of the ECGTwin code normalises q and k: sentence embeddings and
        # latent tokens live on very different scales.
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k, v = self._split(self.q_norm(self.q(x))), self._split(self.k_norm(k)), self._split(v)
        if self.rope:
            cos, sin = rope_cos_sin(q.shape[2], q.shape[3], q.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn_mask, keep = None, None
        if mask is not None:
            mask = mask.bool()
            keep = mask.any(dim=1)                               # (B,) any valid token at all
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]  # empty rows: attend anything...
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if keep is not None:
            out = out * keep[:, None, None, None].to(out.dtype)  # ...then zero them
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], q.shape[1] * q.shape[3])
        return self.proj(out)


class Mlp(nn.Module):
    """Two-layer feed-forward network."""

    def __init__(self, dim: int, hidden: int, act: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over valid tokens: (B, S, D), (B, S) -> (B, D); zero where no token is valid."""
    if mask is None:
        return tokens.mean(dim=1)
    w = mask.to(tokens.dtype)[..., None]
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Timestep embedding and learned tokens
# ---------------------------------------------------------------------------------------------

def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps (may be fractional) -> (B, dim) cos|sin features, as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP (DiT)."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.frequency_dim))


class LearnedToken(nn.Module):
    """One learned vector (e.g. a classifier-free-guidance null token), repeated over the batch.

    Kept as an nn.Embedding lookup rather than a bare nn.Parameter so that Opacus can compute
    its per-sample gradient.
    """

    def __init__(self, dim: int, n: int = 1):
        super().__init__()
        self.table = nn.Embedding(n, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, batch: int, device: torch.device) -> Tensor:
        """(batch, n, dim)."""
        idx = torch.arange(self.table.num_embeddings, device=device)
        return self.table(idx.expand(batch, -1).contiguous())  # Opacus ghost clipping views the ids


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine transform of normalised tokens (B, L, D) by (B, D) shift/scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


def condition_tokens(statements: Tensor, patient: Tensor) -> Tensor:
    """Build condition tokens: each statement embedding (B, S, E) concatenated with the normalised
    patient vector [HR, age, sex] (B, 3) -> (B, S, E + 3), as both papers' code does."""
    return torch.cat([statements, patient[:, None, :].expand(-1, statements.shape[1], -1)], dim=-1)
