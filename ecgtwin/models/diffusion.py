"""Gaussian diffusion on VAE latents: the DDPM forward process, the per-sample training loss with
noise multiplicity, three samplers (DDPM, DDIM, DPM-Solver++ 2M) and classifier-free guidance
for person and condition separately.

Schedule as in both papers' code: 1000 steps, betas linear from 0.00085 to 0.012, the network
predicts the added noise (epsilon). A `model_fn(z_t, t) -> eps` closure carries the conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

ModelFn = Callable[[Tensor, Tensor], Tensor]
SAMPLERS = ("ddpm", "ddim", "dpm++")


@dataclass
class DiffusionConfig:
    num_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012


def _noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str | None,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise drawn on the generator's device (so a seed means the same numbers anywhere),
    then moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


class GaussianDiffusion:
    """Discrete-time DDPM with linear betas and epsilon prediction. Holds no learned state."""

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg = cfg or DiffusionConfig()
        self.num_steps = cfg.num_steps
        self.betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self._abar_table = torch.cat([self.alphas_cumprod, self.alphas_cumprod.new_ones(1)])  # [-1] = 1

    # -- forward process ---------------------------------------------------------------------

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar_t for a (B,) index tensor, broadcastable to `like`; t = -1 means alpha_bar = 1."""
        abar = self._abar_table[t.cpu()]
        return abar.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, z_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        abar = self._abar(t, z_t)
        return (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def training_loss(self, model_fn: ModelFn, x0: Tensor, noise_draws: int = 1,
                      generator: torch.Generator | None = None) -> Tensor:
        """Per-sample epsilon MSE, shape (B,), averaged over `noise_draws` independent (t, noise)
        draws per sample ("noise multiplicity" for DP-SGD).

        Each draw is a separate forward pass with batch B, never a batch of B * draws: per-sample
        gradient hooks then sum the draws of one sample into that sample's gradient, which is
        what DP-SGD must clip."""
        if noise_draws < 1:
            raise ValueError("noise_draws must be >= 1")
        b = x0.shape[0]
        where = generator.device if generator is not None else x0.device
        t, noise = [], []
        for _ in range(noise_draws):
            t.append(torch.randint(0, self.num_steps, (b,), generator=generator, device=where).to(x0.device))
            noise.append(_noise(x0.shape, generator, x0.device, x0.dtype))
        return self.loss_at(model_fn, x0, torch.stack(t), torch.stack(noise))

    def loss_at(self, model_fn: ModelFn, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-sample epsilon MSE (B,) averaged over given draws: t (D, B) timesteps, noise (D, B, ...)."""
        total = x0.new_zeros(x0.shape[0])
        for t_d, noise_d in zip(t, noise):
            eps = model_fn(self.q_sample(x0, t_d, noise_d), t_d)
            total = total + (eps - noise_d).pow(2).flatten(1).mean(dim=1)
        return total / len(t)

    # -- samplers ----------------------------------------------------------------------------

    def timesteps(self, steps: int, spacing: str = "logsnr") -> list[int]:
        """`steps` distinct timesteps from T-1 down to 0, evenly spaced in half log-SNR
        lambda = log(alpha / sigma) ("logsnr", as DPM-Solver recommends; far more accurate per
        step than "time" here, because lambda moves fast near t = 0) or in t ("time")."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps}")
        if spacing == "time":
            return torch.linspace(self.num_steps - 1, 0, steps).round().long().tolist()
        if spacing != "logsnr":
            raise ValueError(f"spacing must be 'logsnr' or 'time', got {spacing!r}")
        abar = self.alphas_cumprod
        lam = 0.5 * (abar.log() - (1 - abar).log())                       # decreasing in t
        targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
        ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
        for i in range(steps - 2, -1, -1):   # rounding can merge neighbours near t = 0: keep distinct
            ts[i] = max(ts[i], ts[i + 1] + 1)
        return ts

    def _start(self, shape, generator, device, x_T: Tensor | None) -> Tensor:
        return _noise(shape, generator, device) if x_T is None else x_T.to(device)

    @staticmethod
    def _t(value: int, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), value, dtype=torch.long, device=x.device)

    @torch.no_grad()
    def sample_ddpm(self, model_fn: ModelFn, shape: Sequence[int], generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, x_T: Tensor | None = None,
                    progress: bool = False) -> Tensor:
        """Ancestral sampling through all T steps, posterior variance beta_tilde ("fixed small")."""
        x = self._start(shape, generator, device, x_T)
        for t in tqdm(range(self.num_steps - 1, -1, -1), disable=not progress, desc="DDPM"):
            tt = self._t(t, x)
            x0 = self.predict_x0(x, tt, model_fn(x, tt))
            abar, abar_prev = self._abar(tt, x), self._abar(tt - 1, x)
            beta = 1 - abar / abar_prev
            mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x) / (1 - abar)
            if t > 0:
                var = beta * (1 - abar_prev) / (1 - abar)
                mean = mean + var.sqrt() * _noise(x.shape, generator, x.device, x.dtype)
            x = mean
        return x

    @torch.no_grad()
    def sample_ddim(self, model_fn: ModelFn, shape: Sequence[int], steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    x_T: Tensor | None = None, progress: bool = False, spacing: str = "logsnr") -> Tensor:
        """DDIM (Song et al. 2021); eta = 0 is deterministic given x_T, eta = 1 is DDPM-like.
        The last step goes to the clean signal (alpha_bar = 1)."""
        ts = self.timesteps(steps, spacing)
        x = self._start(shape, generator, device, x_T)
        for i, t in enumerate(tqdm(ts, disable=not progress, desc="DDIM")):
            tt = self._t(t, x)
            eps = model_fn(x, tt)
            x0 = self.predict_x0(x, tt, eps)
            prev = ts[i + 1] if i + 1 < len(ts) else -1           # -1: the clean signal
            abar, abar_prev = self._abar(tt, x), self._abar(self._t(prev, x), x)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if eta > 0 and prev >= 0:
                x = x + sigma * _noise(x.shape, generator, x.device, x.dtype)
        return x

    @torch.no_grad()
    def sample_dpm_solver_pp(self, model_fn: ModelFn, shape: Sequence[int], steps: int = 20,
                             generator: torch.Generator | None = None,
                             device: torch.device | str | None = None, x_T: Tensor | None = None,
                             progress: bool = False, spacing: str = "logsnr") -> Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, data-prediction form, on the
        discrete schedule. First-order (= DDIM) on the first step; the last step returns the data
        prediction (sigma -> 0)."""
        ts = self.timesteps(steps, spacing)
        abar = self.alphas_cumprod[ts]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        lam = alpha.log() - sigma.log()                       # half log-SNR
        x = self._start(shape, generator, device, x_T)
        x0_prev = None
        for i, t in enumerate(tqdm(ts, disable=not progress, desc="DPM-Solver++")):
            tt = self._t(t, x)
            x0 = self.predict_x0(x, tt, model_fn(x, tt))
            if i + 1 == len(ts):
                return x0
            h = (lam[i + 1] - lam[i]).item()
            d = x0
            if x0_prev is not None:
                r = (lam[i] - lam[i - 1]).item() / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = (sigma[i + 1] / sigma[i]).item() * x - alpha[i + 1].item() * math.expm1(-h) * d
            x0_prev = x0
        return x

    def sample(self, model_fn: ModelFn, shape: Sequence[int], sampler: str = "dpm++", steps: int = 20,
               eta: float = 0.0, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, x_T: Tensor | None = None,
               progress: bool = False, spacing: str = "logsnr") -> Tensor:
        """Dispatch by name: "ddpm" (all T steps; `steps`, `spacing` ignored), "ddim" or "dpm++"."""
        common = dict(generator=generator, device=device, x_T=x_T, progress=progress)
        if sampler == "ddpm":
            return self.sample_ddpm(model_fn, shape, **common)
        if sampler == "ddim":
            return self.sample_ddim(model_fn, shape, steps=steps, eta=eta, spacing=spacing, **common)
        if sampler == "dpm++":
            return self.sample_dpm_solver_pp(model_fn, shape, steps=steps, spacing=spacing, **common)
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


# -- classifier-free guidance -------------------------------------------------------------------

def guided_eps(model: Callable[..., Tensor], z: Tensor, t: Tensor, base: Tensor, cond: Tensor,
               cond_mask: Tensor | None, guidance_person: float = 1.0,
               guidance_condition: float = 1.0) -> Tensor:
    """Classifier-free guidance with separate scales for the person and the condition:

        eps = e(0,0) + g_p (e(p,0) - e(0,0)) + g_c (e(p,c) - e(p,0))

    where 0 is the learned null base / null condition of an AdaXDenoiser. The passes are stacked
    into one batch. e(0,0) cancels when g_p = 1 (two passes) and everything but e(p,c) cancels
    when g_p = g_c = 1 (the plain conditional pass)."""
    g_p, g_c = float(guidance_person), float(guidance_condition)
    if g_p == 1.0 and g_c == 1.0:
        return model(z, t, base, cond, cond_mask)
    b = z.shape[0]
    # (drop_base, drop_cond) of each pass: (p,c), (p,0), (0,0); (0,0) only needed when g_p != 1
    passes = [(False, False), (False, True)] + ([(True, True)] if g_p != 1.0 else [])
    n = len(passes)
    flags = torch.tensor(passes, device=z.device).repeat_interleave(b, dim=0)
    mask = None if cond_mask is None else cond_mask.repeat(n, 1)
    eps = model(z.repeat(n, 1, 1), t.repeat(n), base.repeat(n, 1), cond.repeat(n, 1, 1), mask,
                drop_base=flags[:, 0], drop_cond=flags[:, 1]).chunk(n)
    e_pc, e_p0 = eps[0], eps[1]
    e_00 = eps[2] if n == 3 else e_p0
    return e_00 + g_p * (e_p0 - e_00) + g_c * (e_pc - e_p0)


def guided_model_fn(model: Callable[..., Tensor], base: Tensor, cond: Tensor, cond_mask: Tensor | None,
                    guidance_person: float = 1.0, guidance_condition: float = 1.0) -> ModelFn:
    """Close over the conditioning: a `model_fn(z, t)` for the samplers."""
    def model_fn(z: Tensor, t: Tensor) -> Tensor:
        return guided_eps(model, z, t, base, cond, cond_mask, guidance_person, guidance_condition)
    return model_fn
