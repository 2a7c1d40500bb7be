"""The loss of each stage on one batch, per record where the objective allows it (DP-SGD clips
per-sample gradients, so the VAE and twin losses keep shape [B])."""

from __future__ import annotations

import torch
from torch import Tensor

from ecgtwin.models import AdaXDenoiser, ECGVAE, GaussianDiffusion, IndividualBaseExtractor, info_nce, vae_loss
from ecgtwin.models import sample_drop_masks


def vae_batch_loss(vae: ECGVAE, signals: Tensor, kl_weight: float) -> Tensor:
    """Per-record VAE loss [B] (reconstruction + weighted KL)."""
    x_hat, mean, logvar = vae(signals)
    return vae_loss(signals, x_hat, mean, logvar, kl_weight)


def ibe_batch_loss(ibe: IndividualBaseExtractor, ref: tuple[Tensor, Tensor, Tensor],
                   tgt: tuple[Tensor, Tensor, Tensor], temperature: float) -> Tensor:
    """ECGTwin's symmetric InfoNCE between base vectors of earlier and later ECGs of the same patients.
    Each of ref/tgt is (latents, condition tokens, mask). Non-private: see docs/privacy.md."""
    return info_nce(ibe(*ref), ibe(*tgt), temperature)


def twin_batch_loss(denoiser: AdaXDenoiser, diffusion: GaussianDiffusion, z0: Tensor, base: Tensor,
                    tokens: Tensor, mask: Tensor, base_dropout: float, cond_dropout: float,
                    noise_draws: int, generator: torch.Generator) -> Tensor:
    """Per-record epsilon loss [B], with person/condition dropout for classifier-free guidance and the
    loss averaged over `noise_draws` (t, noise) draws per record."""
    drop_base, drop_cond = sample_drop_masks(len(z0), base_dropout, cond_dropout, generator=generator)

    def model_fn(z_t: Tensor, t: Tensor) -> Tensor:
        return denoiser(z_t, t, base, tokens, mask, drop_base=drop_base, drop_cond=drop_cond)

    return diffusion.training_loss(model_fn, z0, noise_draws=noise_draws, generator=generator)
