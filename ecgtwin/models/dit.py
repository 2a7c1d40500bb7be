"""AdaX denoiser (ECGTwin, stage 3): a DiT over the 128 latent tokens with the AdaX Condition
Injector, plus the two ablations of the paper.

  injector="adax"  (a) adaLN-Zero from timestep + projected base vector (global: who),
                   (b) cross-attention to the condition tokens in every block (local: what).
  injector="adaln" everything through adaLN: the masked mean of the condition tokens is added
                   to the timestep + base input; no cross-attention.
  injector="cross" everything through cross-attention: the projected base vector is one more
                   context token; adaLN sees the timestep only.

Classifier-free guidance: a learned null base vector and a learned null condition token replace
the real ones where `drop_base` / `drop_cond` is True (training dropout, unconditional passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from .layers import Attention, LearnedToken, Mlp, TimestepEmbedder, masked_mean, modulate
from ecgtwin.errors import UserError

INJECTORS = ("adax", "adaln", "cross")


@dataclass
class DiTConfig:
    latent_channels: int = 4
    n_tokens: int = 128
    width: int = 256
    depth: int = 7
    heads: int = 8
    mlp_ratio: float = 4.0
    base_dim: int = 256
    cond_dim: int = 384 + 3          # statement embedding + [HR, age, sex]
    max_cond_tokens: int = 64        # size of the learned position table of the condition tokens
    injector: str = "adax"

    def __post_init__(self) -> None:
        if self.injector not in INJECTORS:
            raise UserError(f"injector must be one of {INJECTORS}, got {self.injector!r}")

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_channels, self.n_tokens)


class AdaXBlock(nn.Module):
    """adaLN-Zero self-attention -> (optional) cross-attention to the condition -> adaLN-Zero MLP."""

    def __init__(self, cfg: DiTConfig, cross_attention: bool):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(w, cfg.heads, rope=True)
        if cross_attention:
            self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
            self.cond_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
            self.cross_attn = Attention(w, cfg.heads, qk_norm=True)
        else:
            self.cross_attn = None
        self.norm3 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(w, int(w * cfg.mlp_ratio), act=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor | None, ctx_mask: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), self.cond_norm(ctx), ctx_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map back to latent channels (DiT)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class AdaXDenoiser(nn.Module):
    """eps-prediction network: (z_t, t, base, cond, cond_mask) -> eps, all latents (B, 4, 128)."""

    # What `trainable: condition` fine-tunes: the AdaX Condition Injector's two paths (cross-attention to the
    # condition, adaLN modulation from timestep + person) and the condition and base-vector embedders.
    CONDITION_PATHWAY = ("cross_attn", "adaLN_modulation", "cond_proj", "cond_pos", "null_cond", "base_proj",
                         "null_base")

    def __init__(self, cfg: DiTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DiTConfig()
        w = cfg.width
        self.x_embed = nn.Linear(cfg.latent_channels, w)
        self.t_embed = TimestepEmbedder(w)
        self.base_proj = nn.Linear(cfg.base_dim, w)
        self.cond_proj = nn.Linear(cfg.cond_dim, w)
        self.cond_pos = nn.Embedding(cfg.max_cond_tokens, w)   # the authors' learned statement positions
        self.null_base = LearnedToken(cfg.base_dim)
        self.null_cond = LearnedToken(w)
        self.blocks = nn.ModuleList([AdaXBlock(cfg, cross_attention=cfg.injector != "adaln")
                                     for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(w, cfg.latent_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, then zero every adaLN modulation and the output
        layer so that each block starts as the identity and the network predicts eps = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cond_pos.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_condition(self, cond: Tensor, cond_mask: Tensor | None,
                        drop_cond: Tensor) -> tuple[Tensor, Tensor]:
        """Project the condition tokens to width and add their learned positions; where
        drop_cond is True the row becomes [null, pad, pad, ...] (sequence length unchanged)."""
        b, s, _ = cond.shape
        if s > self.cfg.max_cond_tokens:
            raise ValueError(f"{s} condition tokens, at most {self.cfg.max_cond_tokens} supported")
        mask = cond.new_ones(b, s, dtype=torch.bool) if cond_mask is None else cond_mask.bool()
        if s == 0:   # an empty report is the null condition
            cond, mask, s = cond.new_zeros(b, 1, cond.shape[-1]), mask.new_zeros(b, 1), 1
            drop_cond = mask.new_ones(b)
        tokens = self.cond_proj(cond)
        null = torch.cat([self.null_cond(b, cond.device), tokens.new_zeros(b, s - 1, tokens.shape[-1])], 1)
        null_mask = (torch.arange(s, device=cond.device) == 0).expand(b, -1)
        tokens = torch.where(drop_cond[:, None, None], null, tokens)
        mask = torch.where(drop_cond[:, None], null_mask, mask)
        positions = torch.arange(s, device=cond.device).expand(b, -1).contiguous()  # for Opacus ghost clipping
        return tokens + self.cond_pos(positions), mask

    def forward(self, z_t: Tensor, t: Tensor, base: Tensor, cond: Tensor, cond_mask: Tensor | None = None,
                drop_base: Tensor | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """z_t (B, C, N), t (B,), base (B, base_dim), cond (B, S, cond_dim), cond_mask (B, S)
        True = valid, drop_base / drop_cond (B,) bool -> eps (B, C, N)."""
        b = z_t.shape[0]
        # The null tokens take part in every forward (selected or not), so that under Opacus they
        # always get a per-sample gradient, zero where unused; DPOptimizer requires one.
        keep = torch.zeros(b, dtype=torch.bool, device=z_t.device)
        drop_base = keep if drop_base is None else drop_base.to(z_t.device, torch.bool)
        drop_cond = keep if drop_cond is None else drop_cond.to(z_t.device, torch.bool)
        base = torch.where(drop_base[:, None], self.null_base(b, z_t.device)[:, 0], base)
        ctx, ctx_mask = self.embed_condition(cond, cond_mask, drop_cond)
        person = self.base_proj(base)
        c = self.t_embed(t)
        if self.cfg.injector == "adax":
            c = c + person
        elif self.cfg.injector == "adaln":
            c = c + person + masked_mean(ctx, ctx_mask)
            ctx, ctx_mask = None, None
        else:  # "cross": the person is one more token to attend to
            ctx = torch.cat([ctx, person[:, None]], dim=1)
            ctx_mask = torch.cat([ctx_mask, ctx_mask.new_ones(b, 1)], dim=1)
        x = self.x_embed(z_t.transpose(1, 2))
        for block in self.blocks:
            x = block(x, c, ctx, ctx_mask)
        return self.final_layer(x, c).transpose(1, 2)


def sample_drop_masks(batch: int, p_drop_base: float, p_drop_cond: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Independent Bernoulli masks (drop_base, drop_cond) for classifier-free-guidance training."""
    gdev = generator.device if generator is not None else device
    u = torch.rand(2, batch, generator=generator, device=gdev).to(device)
    return u[0] < p_drop_base, u[1] < p_drop_cond
