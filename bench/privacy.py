"""DP-SGD step time and peak memory vs the non-private step, per stage, at equal batch (demo config).

Each setting runs in a fresh process (its own peak RSS) and uses the real DP step of
ecgtwin.train.private (patient sampling aside): per-row gradients by Opacus hooks or functorch, or
ghost clipping where the stage allows it (one forward row per patient), grouped per patient, clipped,
noised. "none" is plain AdamW on the same per-patient losses. The IBE's rows include its public
negatives (M per patient), so its DP objective is also timed without DP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ecgtwin.config import ExperimentConfig, load_config
from ecgtwin.models import GaussianDiffusion
from ecgtwin.privacy import PrivacyPolicy
from ecgtwin.train import private
from ecgtwin.train.losses import ibe_private_loss, twin_batch_loss, vae_batch_loss
from ecgtwin.weights import build_module

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

BATCH = 16  # patients per step, one record each
NEGATIVES = 15
STEPS = 6
MODES = {"vae": ("none", "hooks", "functorch", "ghost"), "ibe": ("none", "hooks", "functorch"),
         "twin": ("none", "hooks", "functorch", "ghost")}


def _stage(name: str, config: ExperimentConfig) -> private.PrivateStage:
    cfg = config.model
    g = torch.Generator().manual_seed(0)
    unit = torch.arange(BATCH)
    gen = torch.Generator().manual_seed(1)  # the losses' own draws (the DP pass draws them per patient)
    if name == "vae":
        vae, x = build_module("vae", config, seed=0), torch.randn(BATCH, 12, 1024, generator=g)
        return private.PrivateStage(vae, [], lambda picks, step: (vae_batch_loss(vae, x, 1e-4, gen), unit), True)
    z = torch.randn(BATCH, cfg.vae.latent_channels, 128, generator=g)
    cond, mask = torch.randn(BATCH, 4, cfg.ibe.cond_dim, generator=g), torch.ones(BATCH, 4, dtype=torch.bool)
    if name == "ibe":
        ibe = build_module("ibe", config, seed=0)
        neg = (torch.randn(BATCH * NEGATIVES, cfg.vae.latent_channels, 128, generator=g),
               torch.randn(BATCH * NEGATIVES, 4, cfg.ibe.cond_dim, generator=g),
               torch.ones(BATCH * NEGATIVES, 4, dtype=torch.bool))
        rows = torch.cat([unit, unit, unit.repeat_interleave(NEGATIVES)])
        return private.PrivateStage(
            ibe, [], lambda picks, step: (ibe_private_loss(ibe, (z, cond, mask), (z + 0.1, cond, mask), neg, 0.1),
                                               rows), False)
    dit, diffusion = build_module("twin", config, seed=0), GaussianDiffusion(cfg.diffusion)
    base = torch.randn(BATCH, cfg.dit.base_dim, generator=g)
    return private.PrivateStage(
        dit, [], lambda picks, step: (twin_batch_loss(dit, diffusion, z, base, cond, mask, 0.1, 0.1, 1, gen),
                                           unit), True)


@contextlib.contextmanager
def _plain_step(built: private.PrivateStage, generator: torch.Generator):
    """The non-private step on the same per-patient losses: plain AdamW."""
    optimizer = torch.optim.AdamW(built.module.parameters(), lr=1e-4)

    def step(picks, index):
        optimizer.zero_grad()
        built.unit_loss(picks, index)[0].sum().backward()
        optimizer.step()

    yield step


def _measure(stage: str, mode: str, queue: mp.Queue) -> None:
    warnings.simplefilter("ignore")
    config = load_config(CONFIG)
    built = _stage(stage, config)
    picks = [(str(i), np.array([i])) for i in range(BATCH)]
    generator = torch.Generator().manual_seed(0)
    if mode == "none":
        stepper = _plain_step(built, generator)
    else:
        policy = PrivacyPolicy(epsilon=8.0, grad_sample_mode=mode, max_grad_norm=1.0)
        settings = dataclasses.replace(config.stage(stage), lr=1e-4, weight_decay=0.0)
        stepper = private.dp_step(built, policy, settings, BATCH, 1.0, generator)
    times = []
    with stepper as step:
        for i in range(STEPS + 1):
            start = time.perf_counter()
            step(picks, i)
            if i:  # the first step warms up allocators and hooks
                times.append(time.perf_counter() - start)
    queue.put({"step_s": round(sorted(times)[len(times) // 2], 4),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def run(out) -> dict:
    context = mp.get_context("spawn")
    results: dict = {"threads": torch.get_num_threads(),
                     "note": f"median of {STEPS} steps, {BATCH} patients per step, demo config, CPU"}
    for stage, modes in MODES.items():
        for mode in modes:
            queue = context.Queue()
            process = context.Process(target=_measure, args=(stage, mode, queue))
            process.start()
            results[f"{stage}_{mode}"] = queue.get()
            process.join()
        plain = results[f"{stage}_none"]["step_s"]
        for mode in modes[1:]:
            results[f"{stage}_{mode}"]["vs_non_private"] = round(results[f"{stage}_{mode}"]["step_s"] / plain, 2)
        print(stage, {m: results[f"{stage}_{m}"] for m in modes}, flush=True)
    return results
