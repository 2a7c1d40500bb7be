"""Training step time and peak memory of each stage, paper vs demo configuration, on this machine.

Each measurement runs in a fresh process so that its peak resident memory is its own.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

import torch

from ecgtwin.models import (AdaXDenoiser, ECGVAE, GaussianDiffusion, IndividualBaseExtractor, demo_config,
                            info_nce, paper_config, vae_loss)

BATCH = 16
STATEMENTS = 4
STEPS = 5


def _measure(config_name: str, stage: str, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    cfg = (paper_config if config_name == "paper" else demo_config)()
    x = torch.randn(BATCH, 12, 1024)
    z = torch.randn(BATCH, cfg.vae.latent_channels, 128)
    cond = torch.randn(BATCH, STATEMENTS, cfg.ibe.cond_dim)
    if stage == "vae":
        model = ECGVAE(cfg.vae)

        def loss_fn():
            x_hat, mean, logvar = model(x)
            return vae_loss(x, x_hat, mean, logvar, 1e-4).mean()
    elif stage == "ibe":
        model = IndividualBaseExtractor(cfg.ibe)

        def loss_fn():
            return info_nce(model(z, cond), model(z + 0.1, cond), 0.1)
    else:
        model, diffusion = AdaXDenoiser(cfg.dit), GaussianDiffusion(cfg.diffusion)
        base = torch.randn(BATCH, cfg.dit.base_dim)

        def loss_fn():
            return diffusion.training_loss(lambda zt, t: model(zt, t, base, cond), z).mean()
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
        for stage in ("vae", "ibe", "twin"):
            queue = context.Queue()
            process = context.Process(target=_measure, args=(config_name, stage, queue))
            process.start()
            results[f"{config_name}_{stage}"] = queue.get()
            process.join()
            print(config_name, stage, results[f"{config_name}_{stage}"], flush=True)
    return results
