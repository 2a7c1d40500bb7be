"""One NON-private local pass of a stage: a federated round at a site whose policy says `private: false`
(research on public or synthetic data only), and the stage builders `ecgtwin train` shares.

A pass is a function of values: the stage's starting weights and the frozen earlier stages' weights in,
the new weights and a local log out. A fresh optimizer per pass, as in FedAvg.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ecgtwin.conditioning import Conditioner, PatientInfoNormalizer, conditioner_from
from ecgtwin.compute import adamw, autocast, compile_module, use_tf32
from ecgtwin.config import ExperimentConfig
from ecgtwin.device import module_device, to_device
from ecgtwin.data.store import ReadAhead, SiteStore
from ecgtwin.models import GaussianDiffusion, kl_weight_at
from ecgtwin.train import inputs as stage_inputs
from ecgtwin.train.losses import ibe_batch_loss, twin_batch_loss, vae_batch_loss
from ecgtwin.train.result import PassResult, StageWeights, check_store, frozen_stages, pass_rows
from ecgtwin.weights import module_from, module_weights, select_trainable

# (step, numpy rng, torch generator) -> (mean loss of the batch, extra log values)
StepLoss = Callable[[int, np.random.Generator, torch.Generator], tuple[torch.Tensor, dict]]


@dataclasses.dataclass
class Stage:
    """What a training loop needs: the module to optimise and the loss of one step."""

    module: torch.nn.Module
    step_loss: StepLoss
    n_train: int  # records (VAE, twin) or patients with pairs (IBE)


def build_stage(stage: str, config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
                conditioner: Conditioner, rng: np.random.Generator, device: torch.device | str = "cpu") -> Stage:
    """The stage's module (from `weights[stage]`, or fresh) on `device` and its step loss on the store's
    `rows` (batches moved to the device; their random draws stay on the CPU)."""
    frozen = frozen_stages(stage, config, weights, device)
    module = select_trainable(module_from(stage, config, weights.get(stage)), stage, config).to(device)
    return _BUILDERS[stage](config, store, rows, module, frozen, conditioner, rng)


def population_conditioner(config: ExperimentConfig, cache_dir: Path | None) -> Conditioner:
    """Fixed population statistics for HR and age in federated and private training: fitting them on one
    site's patients would release a statistic of them without noise, and sites would disagree."""
    return conditioner_from(config, PatientInfoNormalizer(), cache_dir / "text-cache" if cache_dir else None)


def local_pass(stage: str, config: ExperimentConfig, store: SiteStore, weights: StageWeights, steps: int,
               round: int = 1, patients: list[str] | None = None, proximal_mu: float = 0.0,
               cache_dir: Path | None = None, progress: bool = False, device: torch.device | str = "cpu") -> PassResult:
    """`steps` non-private steps of `stage` from `weights[stage]` (fresh weights if absent), on the store's
    training patients (or `patients`)."""
    check_store(store, config)
    settings = config.stage(stage)
    rows = pass_rows(store, config, patients)
    seed = settings.seed + 1000 * round
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    built = build_stage(stage, config, store, rows, weights, population_conditioner(config, cache_dir), rng, device)
    use_tf32(device, config.compute.tf32)
    optimizer = adamw(trainable(built.module), settings.lr, settings.weight_decay, device)
    compile_module(built.module, config.compute.compile)
    pull = proximal_step(built.module, settings.lr, proximal_mu)
    step_losses, started = [], time.perf_counter()
    built.module.train()
    for step in tqdm(range(steps), desc=f"{stage} r{round}", unit="step", disable=not progress, file=sys.stderr):
        with autocast(device, config.compute.precision):
            loss, _ = built.step_loss(step, rng, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(built.module), settings.grad_clip)
        optimizer.step()
        pull()
        step_losses.append(loss.detach())  # kept on the device: no host synchronisation per step
    losses = torch.stack(step_losses).float().tolist()  # one for the whole pass
    log = [{"round": round, "step": k + 1, "loss": value} for k, value in enumerate(losses)]
    summary = {"stage": stage, "round": round, "steps": steps, "records_used": len(rows),
               "patients": len(set(store.records.patient_id.to_numpy()[rows])),
               "loss": float(np.mean(losses[-max(1, len(losses) // 5):])), "first_loss": losses[0],
               "seconds": float(np.round(time.perf_counter() - started, 2))}
    return PassResult(stage, module_weights(built.module), summary, log)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a pass optimises (select_trainable froze the others)."""
    return [p for p in module.parameters() if p.requires_grad]


def proximal_step(module: torch.nn.Module, lr: float, mu: float) -> Callable[[], None]:
    """FedProx: after each optimiser step, pull the weights towards the round's starting (global) weights,
    w <- w - lr * mu * (w - w_global), the gradient step of (mu / 2) ||w - w_global||^2. It does not touch
    the data, so under DP-SGD it is post-processing and costs no privacy."""
    if mu <= 0:
        return lambda: None
    params = trainable(module)
    start = [p.detach().clone() for p in params]

    @torch.no_grad()
    def pull() -> None:
        for p, p0 in zip(params, start):
            p.sub_(lr * mu * (p - p0))

    return pull


def _vae_stage(config, store, rows, vae, frozen, conditioner, rng) -> Stage:
    settings = config.vae
    device = module_device(vae)
    reader = ReadAhead(store, pin=device.type == "cuda")

    def draw(rng: np.random.Generator) -> np.ndarray:
        return rows[rng.choice(len(rows), size=min(settings.batch_size, len(rows)), replace=False)]

    def step_loss(step: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        # the next steps' batches are read while this one trains: their rows are what this step's generator
        # will draw next, peeked at on a copy of it, so the draws (and an exact resume) are unchanged
        index = draw(rng)
        kl_weight = kl_weight_at(step, settings.kl_ramp_steps, settings.kl_max)
        batch = to_device(reader.read(index, _peek(rng, draw, reader.ahead)), device)
        return vae_batch_loss(vae, batch, kl_weight, generator).mean(), {"kl_weight": kl_weight}

    return Stage(vae, step_loss, len(rows))


def _peek(rng: np.random.Generator, draw: Callable[[np.random.Generator], np.ndarray], n: int) -> list[np.ndarray]:
    """The next n draws `rng` would give, without advancing it."""
    ahead = copy.deepcopy(rng)
    return [draw(ahead) for _ in range(n)]


def _ibe_stage(config, store, rows, ibe, frozen, conditioner, rng) -> Stage:
    settings = config.ibe
    inputs = stage_inputs.ibe_inputs(store, rows, frozen[0], conditioner)
    patients = sorted(inputs.by_patient)

    def step_loss(step: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        # one pair per patient in a batch: another pair of the same patient would be a false negative
        chosen = rng.choice(len(patients), size=min(settings.batch_size, len(patients)), replace=False)
        picked = inputs.pairs[[rng.choice(inputs.by_patient[patients[c]]) for c in chosen]]
        ref, tgt = torch.from_numpy(picked[:, 0]), torch.from_numpy(picked[:, 1])
        loss = ibe_batch_loss(ibe, (inputs.latents[ref], *inputs.conditions.tokens(ref)),
                              (inputs.latents[tgt], *inputs.conditions.tokens(tgt)), settings.temperature)
        return loss, {}

    return Stage(ibe, step_loss, len(patients))


def _twin_stage(config, store, rows, denoiser, frozen, conditioner, rng) -> Stage:
    settings = config.twin
    data = stage_inputs.twin_inputs(store, rows, frozen[0], frozen[1], conditioner, lambda patient: rng)
    diffusion = GaussianDiffusion(config.model.diffusion)

    def step_loss(step: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        index = torch.from_numpy(rng.choice(len(rows), size=min(settings.batch_size, len(rows)), replace=False))
        tokens, mask = data.conditions.tokens(index)
        loss = twin_batch_loss(denoiser, diffusion, data.latents[index], data.base[index], tokens, mask,
                               settings.base_dropout, settings.cond_dropout, settings.noise_draws, generator)
        return loss.mean(), {}

    return Stage(denoiser, step_loss, len(rows))


_BUILDERS = {"vae": _vae_stage, "ibe": _ibe_stage, "twin": _twin_stage}
