"""Training step time and peak memory of each stage, paper vs demo configuration, on this machine.

Each measurement runs in a fresh process so that its peak resident memory is its own.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

from ecgtwin.config import STAGES, load_config
from ecgtwin.models import GaussianDiffusion, info_nce, vae_loss
from ecgtwin.weights import build_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # demo.yaml, paper.yaml (the papers' sizes)
BATCH = 16
STATEMENTS = 4
STEPS = 5


def _measure(config_name: str, stage: str, queue: mp.Queue) -> None:
    config = load_config(CONFIGS / f"{config_name}.yaml")
    cfg = config.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 12, 1024, generator=g)
    z = torch.randn(BATCH, cfg.vae.latent_channels, 128, generator=g)
    cond = torch.randn(BATCH, STATEMENTS, cfg.ibe.cond_dim, generator=g)
    model = build_module(stage, config, seed=0)
    if stage == "vae":
        def loss_fn():
            x_hat, mean, logvar = model(x, generator=g)
            return vae_loss(x, x_hat, mean, logvar, 1e-4).mean()
    elif stage == "ibe":
        def loss_fn():
            return info_nce(model(z, cond), model(z + 0.1, cond), 0.1)
    else:
        diffusion = GaussianDiffusion(cfg.diffusion)
        base = torch.randn(BATCH, cfg.dit.base_dim, generator=g)

        def loss_fn():
            return diffusion.training_loss(lambda zt, t: model(zt, t, base, cond), z, generator=g).mean()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(STEPS + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
        if step:  # the first step warms up allocators
            times.append(time.perf_counter() - start)
    queue.put({"params": sum(p.numel() for p in model.parameters()), "batch": BATCH,
               "step_s": round(sorted(times)[len(times) // 2], 4),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def run(out) -> dict:
    context = mp.get_context("spawn")
    results: dict = {"threads": torch.get_num_threads(), "note": f"median of {STEPS} steps, batch {BATCH}, CPU"}
    for config_name in ("demo", "paper"):
        for stage in STAGES:
            queue = context.Queue()
            process = context.Process(target=_measure, args=(config_name, stage, queue))
            process.start()
            results[f"{config_name}_{stage}"] = queue.get()
            process.join()
            print(config_name, stage, results[f"{config_name}_{stage}"], flush=True)
    return results
