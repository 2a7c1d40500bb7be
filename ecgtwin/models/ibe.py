"""Individual Base Extractor (ECGTwin, stage 2).

A small transformer over the 128 latent tokens of a reference ECG. Each layer self-attends (RoPE),
then cross-attends to the condition tokens of that ECG (report statements + [HR, age, sex]) and
SUBTRACTS the result through a ReLU, so that what the condition explains is removed and what is
left describes the person. Mean pooling gives the individual base vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import Attention, Mlp


@dataclass
class IBEConfig:
    latent_channels: int = 4
    n_tokens: int = 128
    width: int = 256
    depth: int = 3
    heads: int = 8
    mlp_ratio: float = 4.0
    cond_dim: int = 384 + 3          # statement embedding (all-MiniLM-L6-v2) + [HR, age, sex]
    base_dim: int = 256


class IBELayer(nn.Module):
    """Pre-norm layer: x += SelfAttn(x); x -= ReLU(CrossAttn(x, cond)); x += MLP(x)."""

    def __init__(self, cfg: IBEConfig):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w)
        self.self_attn = Attention(w, cfg.heads, rope=True)
        self.norm2 = nn.LayerNorm(w)
        self.cond_norm = nn.LayerNorm(w)
        self.cross_attn = Attention(w, cfg.heads)
        self.norm3 = nn.LayerNorm(w)
        self.mlp = Mlp(w, int(w * cfg.mlp_ratio), act=nn.ReLU)

    def subtract_condition(self, x: Tensor, cond: Tensor, cond_mask: Tensor | None) -> Tensor:
        """Remove the part of each token that the condition explains (only ever subtracts)."""
        return x - F.relu(self.cross_attn(self.norm2(x), self.cond_norm(cond), cond_mask))

    def forward(self, x: Tensor, cond: Tensor, cond_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = self.subtract_condition(x, cond, cond_mask)
        return x + self.mlp(self.norm3(x))


class IndividualBaseExtractor(nn.Module):
    """latent (B, 4, 128), condition tokens (B, S, cond_dim), mask (B, S) -> base vector (B, base_dim)."""

    # What `trainable: condition` fine-tunes: the path by which the condition is subtracted (its embedder,
    # the cross-attention and their norms), so that a site's conditions are removed from its base vectors.
    CONDITION_PATHWAY = ("cond_embed", "cross_attn", "cond_norm", "norm2")

    def __init__(self, cfg: IBEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or IBEConfig()
        self.x_embed = nn.Linear(cfg.latent_channels, cfg.width)
        self.cond_embed = nn.Linear(cfg.cond_dim, cfg.width)
        self.layers = nn.ModuleList([IBELayer(cfg) for _ in range(cfg.depth)])
        self.head = nn.Linear(cfg.width, cfg.base_dim) if cfg.base_dim != cfg.width else nn.Identity()

    def tokens(self, latent: Tensor, cond: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        """Per-token person features (B, n_tokens, width) before pooling."""
        x = self.x_embed(latent.transpose(1, 2))
        c = self.cond_embed(cond)
        for layer in self.layers:
            x = layer(x, c, cond_mask)
        return x

    def forward(self, latent: Tensor, cond: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        return self.head(self.tokens(latent, cond, cond_mask).mean(dim=1))


def info_nce(reference: Tensor, target: Tensor, temperature: float | Tensor = 0.07) -> Tensor:
    """ECGTwin's symmetric InfoNCE over in-batch pairs (CLIP-style): row i of `reference` (earlier
    ECG) and of `target` (later ECG) belong to the same patient, every other row is a negative.

    NOT decomposable per patient (each term depends on the whole batch), so it must not be used
    under DP-SGD; it is the objective of the non-private, centralised baseline.
    """
    ref = F.normalize(reference, dim=-1)
    tgt = F.normalize(target, dim=-1)
    logits = ref @ tgt.t() / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def public_negative_nce(reference: Tensor, target: Tensor, negatives: Tensor,
                        temperature: float | Tensor = 0.07) -> Tensor:
    """The IBE's DP objective: per-patient loss [B] whose gradient depends only on that patient.

    Row i of `reference` and `target` are two ECGs of patient i; `negatives[i]` (M, D) are base
    vectors of PUBLIC ECGs (the built-in simulator, not patient data), computed in patient i's own
    forward pass. Patient i's loss contrasts its own pair against those negatives only, never against
    another patient, so per-patient clipping bounds what patient i contributes (docs/privacy.md).
    """
    ref = F.normalize(reference, dim=-1)
    tgt = F.normalize(target, dim=-1)
    neg = F.normalize(negatives, dim=-1)
    positive = (ref * tgt).sum(-1, keepdim=True)  # (B, 1)
    from_ref = torch.cat([positive, torch.einsum("bd,bmd->bm", ref, neg)], dim=1) / temperature
    from_tgt = torch.cat([positive, torch.einsum("bd,bmd->bm", tgt, neg)], dim=1) / temperature
    zero = torch.zeros(len(ref), dtype=torch.long, device=ref.device)
    return 0.5 * (F.cross_entropy(from_ref, zero, reduction="none") + F.cross_entropy(from_tgt, zero, reduction="none"))
