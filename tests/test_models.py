"""Tests of the neural networks: shapes, parameter counts, the properties each paper relies on,
the samplers, and Opacus compatibility (the models are trained with DP-SGD)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch

from ecgtwin.models import (INJECTORS, LATENT_SCALE, AdaXDenoiser, DiffusionConfig, DiTConfig, ECGVAE,
                            GaussianDiffusion, IBEConfig, IndividualBaseExtractor, ModelConfig,
                            condition_tokens, guided_eps, guided_model_fn,
                            info_nce, kl_weight_at, paper_config, sample_drop_masks, vae_loss)
from ecgtwin.config import load_config
from ecgtwin.models.ibe import IBELayer

PAPER = paper_config()
DEMO = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").model
COND_DIM = 384 + 3


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def condition(batch: int = 2, s: int = 5, dim: int = COND_DIM, seed: int = 0):
    """Condition tokens and a mask with some padding in the first row."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, s, dim, generator=g)
    mask = torch.ones(batch, s, dtype=torch.bool)
    mask[0, 3:] = False
    return cond, mask


def perturb(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Move every weight off its (partly zero) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


# =============================================================================================
# Parameter counts of the paper configuration, derived by hand from the architecture
# =============================================================================================

def lin(i, o): return i * o + o                  # nn.Linear with bias
def conv(i, o, k): return i * o * k + o          # nn.Conv1d with bias
def norm(c): return 2 * c                        # GroupNorm / affine LayerNorm


def res(i, o):                                   # VAE ResBlock
    return norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)


def vae_attn(c): return norm(c) + lin(c, 3 * c) + lin(c, c)
def attn(w, ctx): return lin(w, w) + lin(ctx, 2 * w) + lin(w, w)   # q, kv, out projections


def expected_vae_params() -> tuple[int, int]:
    mid = res(512, 512) + vae_attn(512) + res(512, 512)
    encoder = (conv(12, 128, 3)
               + 2 * res(128, 128) + conv(128, 128, 3)                      # 1024, then /2
               + res(128, 256) + res(256, 256) + conv(256, 256, 3)          # 512, then /2
               + res(256, 512) + res(512, 512) + conv(512, 512, 3)          # 256, then /2
               + 2 * res(512, 512)                                          # 128
               + mid + norm(512) + conv(512, 8, 3) + conv(8, 8, 1))         # -> mean, logvar
    decoder = (conv(4, 4, 1) + conv(4, 512, 3) + mid
               + 3 * res(512, 512) + conv(512, 512, 3)                      # 128, then x2
               + 3 * res(512, 512) + conv(512, 512, 3)                      # 256, then x2
               + res(512, 256) + 2 * res(256, 256) + conv(256, 256, 3)      # 512, then x2
               + res(256, 128) + 2 * res(128, 128)                          # 1024
               + norm(128) + conv(128, 12, 3))
    return encoder, decoder


def expected_ibe_params(w=256, depth=3, cond=COND_DIM) -> int:
    layer = 4 * norm(w) + 2 * attn(w, w) + lin(w, 4 * w) + lin(4 * w, w)
    return lin(4, w) + lin(cond, w) + depth * layer


def expected_dit_params(injector: str, w=256, depth=7, cond=COND_DIM, base=256, max_cond=64) -> int:
    block = attn(w, w) + lin(w, 4 * w) + lin(4 * w, w) + lin(w, 6 * w)      # self-attn, MLP, adaLN
    if injector != "adaln":
        block += attn(w, w) + 2 * norm(w)                                    # cross-attn with q/k norm
    stem = (lin(4, w) + lin(256, w) + lin(w, w)                              # tokens, timestep MLP
            + lin(base, w) + lin(cond, w) + max_cond * w                     # base, condition, positions
            + base + w)                                                      # null base, null condition
    final = lin(w, 2 * w) + lin(w, 4)
    return stem + depth * block + final


def test_paper_parameter_counts():
    vae = ECGVAE(PAPER.vae)
    enc, dec = expected_vae_params()
    counts = {"vae.encoder": n_params(vae.encoder), "vae.decoder": n_params(vae.decoder),
              "ibe": n_params(IndividualBaseExtractor(PAPER.ibe))}
    for inj in INJECTORS:
        counts[f"dit[{inj}]"] = n_params(AdaXDenoiser(dataclasses.replace(PAPER.dit, injector=inj)))
    print("\npaper parameter counts:", counts)
    assert counts["vae.encoder"] == enc == 12_218_448
    assert counts["vae.decoder"] == dec == 17_333_664
    assert counts["ibe"] == expected_ibe_params() == 3_262_464
    assert counts["dit[adax]"] == expected_dit_params("adax") == 10_581_252
    assert counts["dit[cross]"] == expected_dit_params("cross") == 10_581_252
    assert counts["dit[adaln]"] == expected_dit_params("adaln") == 8_731_908


def test_demo_is_small_and_configs_round_trip():
    counts = {"vae": n_params(ECGVAE(DEMO.vae)), "ibe": n_params(IndividualBaseExtractor(DEMO.ibe)),
              "dit": n_params(AdaXDenoiser(DEMO.dit))}
    print("\ndemo parameter counts:", counts)
    assert counts == {"vae": 356_320, "ibe": 158_912, "dit": 245_892}
    assert counts["dit"] == expected_dit_params("adax", w=64, depth=2, base=64)
    for cfg in (PAPER, DEMO):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        DiTConfig(injector="film")
    with pytest.raises(ValueError):
        ModelConfig(ibe=IBEConfig(base_dim=64))           # IBE output must fit the DiT input


# =============================================================================================
# VAE
# =============================================================================================

def sine_ecgs(n: int, length: int = 1024, seed: int = 0) -> torch.Tensor:
    """Sums of sines per lead with random frequency, phase and amplitude: ECG-like band."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 10, length)
    f = 1 + 2 * torch.rand(n, 12, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 12, 1, generator=g)
    amp = 0.5 + torch.rand(n, 12, 1, generator=g)
    return amp * (torch.sin(2 * math.pi * f * t + phase) + 0.3 * torch.sin(6 * math.pi * f * t))


def test_vae_shapes_paper():
    vae = ECGVAE(PAPER.vae).eval()
    x = torch.randn(2, 12, 1024)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (2, 4, 128)
        assert vae.decode(mean).shape == (2, 12, 1024)
        x_hat, m2, _ = vae(x, sample=False)
        assert x_hat.shape == x.shape and torch.equal(m2, mean)
        assert torch.allclose(vae.to_latent(x), mean * LATENT_SCALE)
        z = mean * LATENT_SCALE
        assert torch.equal(vae.from_latent(z), vae.decode(z / LATENT_SCALE))
        # (mean * S) / S is mean up to rounding, which the unseeded paper-size decoder may amplify past 1e-5
        assert torch.allclose(vae.from_latent(z), vae.decode(mean), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        vae.encode(torch.randn(1, 12, 1020))


def test_vae_loss_and_kl_ramp():
    x = torch.randn(3, 12, 64)
    zeros = torch.zeros(3, 4, 8)
    # perfect reconstruction and posterior = prior: zero loss, one value per sample
    assert torch.equal(vae_loss(x, x, zeros, zeros, kl_weight=1.0), torch.zeros(3))
    x_hat = x.clone()
    x_hat[1] += 0.5
    mean = zeros.clone()
    mean[2] = 1.0                                    # KL = 0.5 * 4 channels = 2 per position
    loss = vae_loss(x, x_hat, mean, zeros, kl_weight=0.1)
    assert torch.allclose(loss, torch.tensor([0.0, 0.25 * 12 * 64, 0.1 * 2.0]))
    assert [kl_weight_at(s, 10, 1.0) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    assert kl_weight_at(3, 0, 0.5) == 0.5


def test_vae_overfits_a_tiny_batch():
    torch.manual_seed(0)
    vae = ECGVAE(DEMO.vae)
    x = sine_ecgs(2)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        x_hat, mean, logvar = vae(x)
        loss = vae_loss(x, x_hat, mean, logvar, kl_weight=1e-3).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\nVAE overfit: loss {losses[0]:.0f} -> {losses[-1]:.0f}")
    assert losses[-1] < 0.3 * losses[0]


# =============================================================================================
# Individual Base Extractor
# =============================================================================================

def test_ibe_shapes_paper():
    ibe = IndividualBaseExtractor(PAPER.ibe)
    cond, mask = condition()
    base = ibe(torch.randn(2, 4, 128), cond, mask)
    assert base.shape == (2, 256)
    assert ibe.tokens(torch.randn(2, 4, 128), cond, mask).shape == (2, 128, 256)


def test_ibe_subtracts_the_condition():
    torch.manual_seed(0)
    layer = IBELayer(DEMO.ibe)
    x = torch.randn(2, 128, 64)
    cond = torch.randn(2, 5, 64)
    # generic weights: the pathway can only ever lower a coordinate
    assert (layer.subtract_condition(x, cond, None) <= x).all()
    with torch.no_grad():
        layer.cross_attn.proj.weight.zero_()
        layer.cross_attn.proj.bias.fill_(0.5)                # cross-attention output forced to +0.5
    assert torch.allclose(layer.subtract_condition(x, cond, None), x - 0.5)
    with torch.no_grad():
        layer.cross_attn.proj.bias.fill_(-0.5)               # negative: ReLU blocks it
    assert torch.equal(layer.subtract_condition(x, cond, None), x)


def test_ibe_mask_and_pooling():
    torch.manual_seed(0)
    ibe = IndividualBaseExtractor(DEMO.ibe)
    latent = torch.randn(2, 4, 128)
    cond, mask = condition(dim=DEMO.ibe.cond_dim)
    base = ibe(latent, cond, mask)
    assert base.shape == (2, 64)
    assert torch.allclose(base, ibe.tokens(latent, cond, mask).mean(dim=1))
    garbage = cond.clone()
    garbage[0, 3:] = 100 * torch.randn(2, COND_DIM)           # change only padded tokens
    assert torch.allclose(ibe(latent, garbage, mask), base, atol=1e-5)
    longer = torch.cat([cond, torch.randn(2, 4, COND_DIM)], 1)  # more padding
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    assert torch.allclose(ibe(latent, longer, longer_mask), base, atol=1e-5)
    # the condition does matter where it is valid
    assert not torch.allclose(ibe(latent, cond, torch.ones_like(mask)), base, atol=1e-4)
    # a report with no valid statement gives finite output
    assert torch.isfinite(ibe(latent, cond, torch.zeros_like(mask))).all()


def test_info_nce():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 64, generator=g)
    tgt = ref + 0.1 * torch.randn(16, 64, generator=g)
    matched = info_nce(ref, tgt, 0.07)
    assert matched.dim() == 0
    assert torch.allclose(matched, info_nce(tgt, ref, 0.07))
    shuffled = info_nce(ref, tgt[torch.randperm(16, generator=g)], 0.07)
    assert matched < 0.1 < math.log(16) < shuffled


# =============================================================================================
# AdaX denoiser
# =============================================================================================

def dit_inputs(cfg: DiTConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.latent_channels, cfg.n_tokens, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    base = torch.randn(batch, cfg.base_dim, generator=g)
    cond, mask = condition(batch, dim=cfg.cond_dim, seed=seed)
    return z, t, base, cond, mask


def test_adax_shapes_and_zero_output_at_init():
    model = AdaXDenoiser(PAPER.dit)
    z, t, base, cond, mask = dit_inputs(PAPER.dit)
    eps = model(z, t, base, cond, mask)
    assert eps.shape == (2, 4, 128)
    assert torch.equal(eps, torch.zeros_like(eps))


def adam_steps(model: AdaXDenoiser, n: int, seed: int = 0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    z, t, base, cond, mask = dit_inputs(model.cfg, batch=4, seed=seed)
    target = torch.randn_like(z)
    for _ in range(n):
        loss = (model(z, t, base, cond, mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adax_learns_to_use_person_and_condition():
    torch.manual_seed(0)
    model = AdaXDenoiser(DEMO.dit)
    z, t, base, cond, mask = dit_inputs(DEMO.dit, seed=1)
    other_base, other_cond = torch.randn_like(base), torch.randn_like(cond)

    def out(b=base, c=cond):
        with torch.no_grad():
            return model(z, t, b, c, mask)

    adam_steps(model, 1)
    # After one step only the zero-initialised output layer has moved: the (ungated) cross-
    # attention already carries the condition, but the base vector enters through adaLN-Zero
    # weights whose gradient was zero while the output layer was zero.
    assert not torch.allclose(out(), out(c=other_cond))
    assert torch.equal(out(), out(b=other_base))
    adam_steps(model, 1)
    assert not torch.allclose(out(), out(b=other_base))
    assert not torch.allclose(out(), out(c=other_cond))


@pytest.mark.parametrize("injector", INJECTORS)
def test_each_injector_runs_and_conditions(injector):
    torch.manual_seed(0)
    cfg = dataclasses.replace(DEMO.dit, injector=injector)
    model = AdaXDenoiser(cfg)
    z, t, base, cond, mask = dit_inputs(cfg)
    assert model(z, t, base, cond, mask).shape == z.shape
    perturb(model)
    with torch.no_grad():
        ref = model(z, t, base, cond, mask)
        assert not torch.allclose(ref, model(z, t, torch.randn_like(base), cond, mask))
        assert not torch.allclose(ref, model(z, t, base, torch.randn_like(cond), mask))
        padded = cond.clone()
        padded[0, 3:] = 50.0                                  # padded tokens are ignored
        assert torch.allclose(ref, model(z, t, base, padded, mask), atol=1e-5)


@pytest.mark.parametrize("injector", INJECTORS)
def test_drop_flags_remove_base_and_condition(injector):
    torch.manual_seed(0)
    model = AdaXDenoiser(dataclasses.replace(DEMO.dit, injector=injector))
    perturb(model)
    z, t, base, cond, mask = dit_inputs(model.cfg)
    yes = torch.ones(2, dtype=torch.bool)
    no = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        a = model(z, t, base, cond, mask, drop_cond=yes)
        other_cond, other_mask = condition(2, s=9, dim=COND_DIM, seed=5)   # other length too
        b = model(z, t, base, other_cond, other_mask, drop_cond=yes)
        assert torch.allclose(a, b, atol=1e-5)
        assert not torch.allclose(a, model(z, t, base, cond, mask))
        c = model(z, t, base, cond, mask, drop_base=yes)
        d = model(z, t, torch.randn_like(base), cond, mask, drop_base=yes)
        assert torch.allclose(c, d, atol=1e-6)
        # flags are per sample, and all-False flags change nothing
        mixed = model(z, t, base, cond, mask, drop_cond=torch.tensor([True, False]))
        assert torch.allclose(mixed[0], a[0], atol=1e-6)
        assert torch.allclose(mixed[1], model(z, t, base, cond, mask)[1], atol=1e-6)
        assert torch.equal(model(z, t, base, cond, mask, no, no), model(z, t, base, cond, mask))
        # an empty report is the null condition
        empty = model(z, t, base, cond[:, :0], mask[:, :0])
        assert torch.allclose(empty, a, atol=1e-5)


def test_sample_drop_masks_and_condition_tokens():
    g = torch.Generator().manual_seed(0)
    drop_base, drop_cond = sample_drop_masks(10_000, 0.1, 0.3, generator=g)
    assert drop_base.dtype == torch.bool and abs(drop_base.float().mean() - 0.1) < 0.02
    assert abs(drop_cond.float().mean() - 0.3) < 0.02
    tokens = condition_tokens(torch.randn(2, 5, 384), torch.tensor([[0.1, 0.2, 1.0], [0.3, 0.4, 0.0]]))
    assert tokens.shape == (2, 5, 387) and torch.equal(tokens[1, 4, -3:], torch.tensor([0.3, 0.4, 0.0]))


# =============================================================================================
# Diffusion
# =============================================================================================

DIFF = GaussianDiffusion(DiffusionConfig())


def test_linear_betas():
    betas = DIFF.betas
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.012 - 0.00085) / 999, dtype=torch.float64))
    assert torch.allclose(DIFF.alphas_cumprod, torch.cumprod(1 - betas, 0))


def test_q_sample_statistics():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20_000, 4), 2.0)
    for step in (0, 300, 999):
        t = torch.full((20_000,), step)
        z = DIFF.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = DIFF.alphas_cumprod[step].item()
        assert z.mean().item() == pytest.approx(2.0 * math.sqrt(abar), abs=0.02)
        assert z.std().item() == pytest.approx(math.sqrt(1 - abar), abs=0.02)


def test_training_loss_is_per_sample_and_noise_draws_reduce_variance():
    x0 = torch.randn(4000, 4, 8, generator=torch.Generator().manual_seed(0))
    model_fn = lambda z, t: 0.5 * z                          # a fixed, imperfect predictor
    one = DIFF.training_loss(model_fn, x0, 1, torch.Generator().manual_seed(1))
    eight = DIFF.training_loss(model_fn, x0, 8, torch.Generator().manual_seed(1))
    assert one.shape == eight.shape == (4000,)
    assert eight.mean().item() == pytest.approx(one.mean().item(), rel=0.1)   # same expectation
    assert eight.var() < one.var() / 4                                       # ~1/8 of the variance
    again = DIFF.training_loss(model_fn, x0, 8, torch.Generator().manual_seed(1))
    assert torch.equal(eight, again)


def oracle(x0: torch.Tensor):
    """The perfect epsilon model for a known clean signal x0."""
    def model_fn(z, t):
        abar = DIFF._abar(t, z)
        return (z - abar.sqrt() * x0) / (1 - abar).sqrt()
    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_samplers_recover_x0_with_an_oracle(sampler):
    x0 = 0.5 * torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    out = DIFF.sample(oracle(x0), x0.shape, sampler=sampler, steps=10,
                      generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0, atol=1e-4)


def test_dpm_solver_pp_is_second_order():
    """For Gaussian data N(0, s^2) the optimal eps-model and the exact probability-flow ODE
    solution are known in closed form: z_t / std_t stays constant. DDIM converges at first order,
    DPM-Solver++(2M) at second order."""
    s = 0.5
    abar_all = DIFF.alphas_cumprod

    def model_fn(z, t):
        abar = DIFF._abar(t, z)
        return (1 - abar).sqrt() * z / (abar * s * s + 1 - abar)

    def std(i):
        return math.sqrt(abar_all[i].item() * s * s + 1 - abar_all[i].item())

    x_T = torch.randn(4, 4, 64, generator=torch.Generator().manual_seed(0))
    z_0 = x_T * std(0) / std(999)                                   # exact ODE solution at t = 0
    exact = math.sqrt(abar_all[0].item()) * s * s / std(0) ** 2 * z_0   # its x0 prediction
    err = {}
    for steps in (10, 20, 40):
        ddim = DIFF.sample_ddim(model_fn, x_T.shape, steps, x_T=x_T)
        dpm = DIFF.sample_dpm_solver_pp(model_fn, x_T.shape, steps, x_T=x_T)
        err["ddim", steps] = (ddim - exact).abs().max().item()
        err["dpm", steps] = (dpm - exact).abs().max().item()
    print("\nsampler max-abs error vs. exact ODE solution:", {k: round(v, 4) for k, v in err.items()})
    assert err["ddim", 20] < 0.7 * err["ddim", 10] and err["ddim", 40] < 0.7 * err["ddim", 20]
    assert err["dpm", 20] < 0.4 * err["dpm", 10] and err["dpm", 40] < 0.4 * err["dpm", 20]
    assert err["dpm", 20] < 0.2 * err["ddim", 20]
    time_spaced = DIFF.sample_ddim(model_fn, x_T.shape, 20, x_T=x_T, spacing="time")
    assert err["ddim", 20] < (time_spaced - exact).abs().max().item()   # why log-SNR is the default


def test_timesteps():
    for spacing in ("logsnr", "time"):
        for steps in (2, 7, 50, 1000):
            ts = DIFF.timesteps(steps, spacing)
            assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0
            assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError):
        DIFF.timesteps(1001)


def test_samplers_are_deterministic_given_a_seed():
    model = AdaXDenoiser(DEMO.dit)
    perturb(model)
    _, _, base, cond, mask = dit_inputs(DEMO.dit)
    fn = guided_model_fn(model, base, cond, mask, guidance_person=1.5, guidance_condition=2.0)
    shape = (2, 4, 128)
    for sample in (lambda g: DIFF.sample_ddim(fn, shape, steps=5, eta=0.0, generator=g),
                   lambda g: DIFF.sample_dpm_solver_pp(fn, shape, steps=5, generator=g)):
        a = sample(torch.Generator().manual_seed(7))
        b = sample(torch.Generator().manual_seed(7))
        c = sample(torch.Generator().manual_seed(8))
        assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.allclose(a, c)
    # with a fixed x_T, DDIM (eta=0) draws nothing: the generator does not matter
    x_T = torch.randn(shape)
    a = DIFF.sample_ddim(fn, shape, steps=4, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = DIFF.sample_ddim(fn, shape, steps=4, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        DIFF.sample(fn, shape, sampler="euler")


def test_guidance():
    model = AdaXDenoiser(DEMO.dit)
    perturb(model)
    z, t, base, cond, mask = dit_inputs(DEMO.dit)
    with torch.no_grad():
        plain = model(z, t, base, cond, mask)
        assert torch.allclose(guided_eps(model, z, t, base, cond, mask, 1.0, 1.0), plain)
        yes = torch.ones(2, dtype=torch.bool)
        e_p0 = model(z, t, base, cond, mask, drop_cond=yes)
        e_00 = model(z, t, base, cond, mask, drop_base=yes, drop_cond=yes)
        expected = e_00 + 2.0 * (e_p0 - e_00) + 3.0 * (plain - e_p0)
        assert torch.allclose(guided_eps(model, z, t, base, cond, mask, 2.0, 3.0), expected, atol=1e-5)
        assert torch.allclose(guided_eps(model, z, t, base, cond, mask, 1.0, 3.0),
                              e_p0 + 3.0 * (plain - e_p0), atol=1e-5)
        assert torch.allclose(guided_eps(model, z, t, base, cond, mask, 0.0, 0.0), e_00, atol=1e-5)


# =============================================================================================
# Opacus
# =============================================================================================

def per_sample_grads_ok(model: torch.nn.Module, loss_fn) -> None:
    from opacus import GradSampleModule
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        loss = loss_fn(gsm)
        assert loss.shape == (2,)
        loss.sum().backward()
        for name, p in gsm.named_parameters():
            if p.requires_grad:
                assert p.grad_sample is not None, name
                assert p.grad_sample.shape == (2, *p.shape), name
    finally:
        gsm._close()


@pytest.fixture
def quiet():
    """Opacus warns about secure RNG and hooks; not what these tests are about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_opacus_validator_finds_no_errors(quiet):
    from opacus.validators import ModuleValidator
    models = [ECGVAE(PAPER.vae), IndividualBaseExtractor(PAPER.ibe)]
    models += [AdaXDenoiser(dataclasses.replace(PAPER.dit, injector=i)) for i in INJECTORS]
    for model in models:
        assert ModuleValidator.validate(model, strict=False) == [], type(model).__name__


def test_opacus_per_sample_gradients(quiet):
    torch.manual_seed(0)
    x = sine_ecgs(2)
    per_sample_grads_ok(ECGVAE(PAPER.vae), lambda m: vae_loss(x, *m(x), kl_weight=0.5))
    latent = torch.randn(2, 4, 128)
    cond, mask = condition()
    per_sample_grads_ok(IndividualBaseExtractor(PAPER.ibe), lambda m: m(latent, cond, mask).pow(2).sum(1))
    for injector in INJECTORS:
        model = AdaXDenoiser(dataclasses.replace(PAPER.dit, injector=injector))
        z, t, base, cond, mask = dit_inputs(model.cfg)
        flags = torch.tensor([True, False])
        per_sample_grads_ok(model, lambda m: m(z, t, base, cond, mask, drop_base=flags,
                                               drop_cond=~flags).pow(2).flatten(1).sum(1))


def test_noise_multiplicity_gradient_is_per_sample(quiet):
    """With several noise draws, Opacus' per-sample gradient of sample i equals the gradient of
    sample i's own averaged loss: the draws do not mix samples."""
    from opacus import GradSampleModule
    torch.manual_seed(0)
    model = AdaXDenoiser(DEMO.dit)
    perturb(model)
    x0, _, base, cond, mask = dit_inputs(DEMO.dit)
    flags = torch.tensor([False, True])

    def loss(m):
        fn = lambda z, t: m(z, t, base, cond, mask, drop_cond=flags)
        return DIFF.training_loss(fn, x0, noise_draws=3, generator=torch.Generator().manual_seed(3))

    params = [p for p in model.parameters()]
    per_loss = loss(model)
    reference = [torch.autograd.grad(per_loss[i], params, retain_graph=True, allow_unused=True)
                 for i in range(2)]
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        loss(gsm).sum().backward()
        for (name, p), *refs in zip(model.named_parameters(), *reference):
            for i, ref in enumerate(refs):
                ref = torch.zeros_like(p) if ref is None else ref
                assert torch.allclose(p.grad_sample[i], ref, atol=1e-5, rtol=1e-4), name
    finally:
        gsm._close()


def test_dp_optimizer_step_without_dropout_flags(quiet):
    """DPOptimizer needs a per-sample gradient for every parameter, also for the null tokens of a
    batch in which no sample drops its base or condition."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    torch.manual_seed(0)
    model = AdaXDenoiser(DEMO.dit)
    z, t, base, cond, mask = dit_inputs(DEMO.dit)
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=2)
    try:
        before = model.null_base.table.weight.clone()
        loss = DIFF.training_loss(lambda zt, tt: gsm(zt, tt, base, cond, mask), z, noise_draws=2)
        loss.mean().backward()
        opt.step()
        assert not torch.equal(model.null_base.table.weight, before)   # DP noise reaches it too
    finally:
        gsm._close()


def test_empty_batches_run():
    """Poisson sampling of patients can produce an empty batch."""
    cfg = DEMO
    assert ECGVAE(cfg.vae)(torch.randn(0, 12, 1024))[0].shape == (0, 12, 1024)
    cond, mask = torch.randn(0, 5, COND_DIM), torch.ones(0, 5, dtype=torch.bool)
    assert IndividualBaseExtractor(cfg.ibe)(torch.randn(0, 4, 128), cond, mask).shape == (0, 64)
    eps = AdaXDenoiser(cfg.dit)(torch.randn(0, 4, 128), torch.zeros(0, dtype=torch.long),
                                torch.randn(0, 64), cond, mask)
    assert eps.shape == (0, 4, 128)
