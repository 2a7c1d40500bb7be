"""ECG VAE: 12 x 1024 signal <-> 4 x 128 latent (DiffuSETS' "signal compression" module).

The layout is the 1-D version of the Stable Diffusion autoencoder that DiffuSETS' code uses:
conv-in, four resolution levels of ResBlocks with a stride-2 conv after the first three
(1024 -> 512 -> 256 -> 128 samples), a middle of ResBlock / self-attention / ResBlock, and a
conv to mean and log-variance. The decoder mirrors it with nearest-neighbour upsampling.
GroupNorm only (Opacus cannot clip per-sample gradients through BatchNorm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Stable Diffusion's latent scale, kept by DiffuSETS: the diffusion model sees mean * LATENT_SCALE.
LATENT_SCALE = 0.18215


@dataclass
class VAEConfig:
    in_channels: int = 12            # leads
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; a 2x downsample between levels
    num_res_blocks: int = 2          # per encoder level (the decoder uses one more, as in SD)
    norm_groups: int = 32
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)   # YAML gives lists
        self.logvar_clamp = tuple(self.logvar_clamp)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus a 1x1 conv on the skip path when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the L/8 positions of the bottleneck."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x).transpose(1, 2)                     # (B, L, C)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # one head
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.proj(h).transpose(1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels, groups), AttnBlock(channels, groups),
                         ResBlock(channels, channels, groups))


class Encoder(nn.Module):
    """(B, 12, L) -> (B, 2 * latent_channels, L / 8): mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        layers: list[nn.Module] = [nn.Conv1d(cfg.in_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, w, g))
                c = w
            if level < len(widths) - 1:
                layers.append(Downsample(c))
        layers += [_middle(c, g), _norm(c, g), nn.SiLU(),
                   nn.Conv1d(c, 2 * cfg.latent_channels, 3, padding=1),
                   nn.Conv1d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)]  # SD's quant_conv
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """(B, latent_channels, L / 8) -> (B, 12, L)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        c = widths[-1]
        layers: list[nn.Module] = [nn.Conv1d(cfg.latent_channels, cfg.latent_channels, 1),  # post_quant_conv
                                   nn.Conv1d(cfg.latent_channels, c, 3, padding=1), _middle(c, g)]
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(c, widths[level], g))
                c = widths[level]
            if level > 0:
                layers.append(Upsample(c))
        layers += [_norm(c, g), nn.SiLU(), nn.Conv1d(c, cfg.in_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


class ECGVAE(nn.Module):
    """Convolutional VAE. Latents returned by `encode`/taken by `decode` are UNscaled; the diffusion
    model works on `to_latent(x)` = mean * LATENT_SCALE and `from_latent` undoes that."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or VAEConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 12, L) -> mean, logvar, each (B, latent_channels, L / 8)."""
        if x.shape[-1] % self.cfg.downsample_factor:
            raise ValueError(f"signal length {x.shape[-1]} is not a multiple of {self.cfg.downsample_factor}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*self.cfg.logvar_clamp)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_channels, L / 8) unscaled latent -> (B, 12, L) signal."""
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruct x through a posterior sample (or the mean): (x_hat, mean, logvar). The sample's noise
        is `noise` when given (DP: drawn per patient), else drawn from `generator`."""
        mean, logvar = self.encode(x)
        if sample:
            if noise is None:
                where = generator.device if generator is not None else mean.device  # a CPU seed on any device
                noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=where).to(mean.device)
            z = mean + noise * (0.5 * logvar).exp()
        else:
            z = mean
        return self.decode(z), mean, logvar

    @torch.no_grad()
    def to_latent(self, x: Tensor) -> Tensor:
        """Signal -> the scaled latent the diffusion model is trained on (posterior mean)."""
        return self.encode(x)[0] * LATENT_SCALE

    @torch.no_grad()
    def from_latent(self, z: Tensor) -> Tensor:
        """Scaled latent (as sampled by diffusion) -> signal."""
        return self.decode(z / LATENT_SCALE)


def vae_loss(x: Tensor, x_hat: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float) -> Tensor:
    """Per-sample VAE loss, shape (B,), as in DiffuSETS' code: summed squared error over leads and
    samples, plus kl_weight * KL(q(z|x) || N(0, I)) summed over latent channels and averaged over
    latent positions. Per-sample so that DP-SGD can clip each patient's gradient."""
    recon = (x_hat - x).pow(2).flatten(1).sum(dim=1)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)   # (B, C, L')
    kl = kl.sum(dim=1).mean(dim=-1)
    return recon + kl_weight * kl


def kl_weight_at(step: int, ramp_steps: int, max_weight: float = 1.0) -> float:
    """Linear KL warm-up: max_weight * (step + 1) / ramp_steps, then flat. DiffuSETS ramps over its
    10 epochs (0.1, 0.2, ..., 1.0); `step` may count epochs or optimiser steps."""
    if ramp_steps <= 0:
        return float(max_weight)
    return float(max_weight) * min(1.0, (step + 1) / ramp_steps)
