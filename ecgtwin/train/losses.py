"""The loss of each stage on one batch, per record where the objective allows it (DP-SGD clips
per-sample gradients, so the VAE and twin losses keep shape [B])."""

from __future__ import annotations

import torch
from torch import Tensor

from ecgtwin.models import AdaXDenoiser, ECGVAE, GaussianDiffusion, IndividualBaseExtractor, info_nce, vae_loss
from ecgtwin.models import public_negative_nce
from ecgtwin.models import sample_drop_masks


def vae_batch_loss(vae: ECGVAE, signals: Tensor, kl_weight: float,
                   generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """Per-record VAE loss [B] (reconstruction + weighted KL); the posterior sample's noise is `noise`, or
    drawn from `generator`."""
    x_hat, mean, logvar = vae(signals, generator=generator, noise=noise)
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


def pad_tokens(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate (tokens (b, S_k, E), mask (b, S_k)) of different statement counts S_k."""
    width = max(t.shape[1] for t, _ in parts)
    tokens = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t, _ in parts]
    masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in parts]
    return torch.cat(tokens), torch.cat(masks)


def ibe_private_loss(ibe: torch.nn.Module, ref: tuple[Tensor, Tensor, Tensor], tgt: tuple[Tensor, Tensor, Tensor],
                     neg: tuple[Tensor, Tensor, Tensor], temperature: float) -> Tensor:
    """Per-patient DP objective [B] (public_negative_nce) in ONE forward pass, so that Opacus'
    per-row gradients can be summed per patient. `neg` holds B * M public rows, M per patient, in
    patient order (row j belongs to patient j // M)."""
    b = len(ref[0])
    latents = torch.cat([ref[0], tgt[0], neg[0]])
    tokens, mask = pad_tokens([(ref[1], ref[2]), (tgt[1], tgt[2]), (neg[1], neg[2])])
    base = ibe(latents, tokens, mask)
    negatives = base[2 * b:].reshape(b, -1, base.shape[-1])
    return public_negative_nce(base[:b], base[b:2 * b], negatives, temperature)


def twin_loss_at(denoiser: AdaXDenoiser, diffusion: GaussianDiffusion, z0: Tensor, base: Tensor, tokens: Tensor,
                 mask: Tensor, drop_base: Tensor, drop_cond: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Per-record epsilon loss [B] at given dropout masks (B,) and draws t (D, B), noise (D, B, C, L): the DP
    pass draws them per patient."""
    def model_fn(z_t: Tensor, t_d: Tensor) -> Tensor:
        return denoiser(z_t, t_d, base, tokens, mask, drop_base=drop_base, drop_cond=drop_cond)

    return diffusion.loss_at(model_fn, z0, t, noise)
