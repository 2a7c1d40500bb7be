"""`ecgtwin train`: one stage on one site's store, non-private, with checkpoints, resume and loss curves.

Resuming continues from the last checkpoint with the same batches and noise as an uninterrupted run
(the random states are saved with the optimizer), so an interruption changes nothing in the result.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.conditioning import Conditioner, Conditions, PatientInfoNormalizer, conditioning_hr, store_conditions
from ecgtwin.config import ConfigError, ExperimentConfig, StageConfig, to_dict
from ecgtwin.data.store import SiteStore
from ecgtwin.models import ECGVAE, AdaXDenoiser, GaussianDiffusion, IndividualBaseExtractor, kl_weight_at
from ecgtwin.plot import plot_loss_curve
from ecgtwin.text import StatementEncoder
from ecgtwin.train import data as stage_data
from ecgtwin.train.stages import ibe_batch_loss, twin_batch_loss, vae_batch_loss

StepLoss = Callable[[int, np.random.Generator, torch.Generator], tuple[torch.Tensor, dict]]


@dataclasses.dataclass
class Stage:
    """What a training loop needs: the module to optimise and the loss of one step."""

    module: torch.nn.Module
    step_loss: StepLoss
    n_train: int  # records (VAE, twin) or patients with pairs (IBE)


def train_stage(stage: str, config: ExperimentConfig, store_path: str | Path, out: str | Path,
                progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train `stage` (vae | ibe | twin) into checkpoint folder `out`, resuming if it was interrupted."""
    store = SiteStore(store_path)
    _check_store(store, config)
    checkpoint = Checkpoint(out)
    _check_or_save_config(checkpoint, config)
    settings: StageConfig = getattr(config, stage)
    rows = stage_data.training_rows(store, config.data.held_out_fraction, settings.seed)
    if len(rows) == 0:
        raise ValueError(f"{store.path}: no training records (all patients held out?)")
    torch.manual_seed(settings.seed)  # initial weights and the VAE's reparameterisation noise
    built = _BUILDERS[stage](config, store, rows, checkpoint)
    optimizer = torch.optim.AdamW(built.module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng, generator, start = np.random.default_rng(settings.seed), torch.Generator().manual_seed(settings.seed), 0
    state = checkpoint.load_state(stage)
    if state is not None:
        checkpoint.load_weights(stage, built.module)
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state, start = state["numpy_rng"], state["step"]
        generator.set_state(state["torch_rng"])
        torch.set_rng_state(state["global_torch_rng"])
    log = checkpoint.path / f"{stage}_loss.jsonl"
    _truncate_log(log, start)
    started = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start, desc=f"train {stage}", unit="step", disable=not progress,
               file=sys.stderr)
    built.module.train()
    for step in range(start, settings.steps):
        loss, extra = built.step_loss(step, rng, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(built.module.parameters(), settings.grad_clip)
        optimizer.step()
        entry = {"step": step + 1, "loss": loss.item(), **extra}
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4g}")
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            with log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            _save(checkpoint, stage, built.module, optimizer, rng, generator, step + 1)
        if on_step is not None:
            on_step(step + 1, entry)
    bar.close()
    plot_loss_curve(log, checkpoint.path / f"{stage}_loss.png", title=f"{config.name}: {stage} stage")
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()] if log.is_file() else []
    return {"stage": stage, "checkpoint": str(checkpoint.path), "steps": settings.steps, "resumed_from": start,
            "train_records_or_patients": built.n_train, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - started, 2),
            "loss_curve": str(checkpoint.path / f"{stage}_loss.png")}


def local_pass(stage: str, config: ExperimentConfig, store_path: str | Path, out: str | Path, steps: int,
               round: int = 1, progress: bool = True, patients: list[str] | None = None,
               proximal_mu: float = 0.0) -> dict:
    """`steps` NON-private steps of `stage` from the weights in checkpoint folder `out` (fresh ones if it
    has none), saved back there: a federated round at a site whose policy says `private: false`
    (research on public or synthetic data only). A fresh optimizer per pass, as in FedAvg."""
    store = SiteStore(store_path)
    _check_store(store, config)
    checkpoint = Checkpoint(out)
    _check_or_save_config(checkpoint, config)
    use_population_normalizer(checkpoint)
    settings: StageConfig = getattr(config, stage)
    rows = (stage_data.training_rows(store, config.data.held_out_fraction, settings.seed) if patients is None
            else np.sort(np.concatenate([store.records_of(p) for p in patients])))
    torch.manual_seed(settings.seed)
    built = _BUILDERS[stage](config, store, rows, checkpoint)
    if checkpoint.has(stage):
        checkpoint.load_weights(stage, built.module)
    optimizer = torch.optim.AdamW(built.module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    pull = proximal_step(built.module, settings.lr, proximal_mu)
    seed = settings.seed + 1000 * round
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    losses, started = [], time.perf_counter()
    built.module.train()
    for step in tqdm(range(steps), desc=f"{stage} r{round}", unit="step", disable=not progress, file=sys.stderr):
        loss, _ = built.step_loss(step, rng, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(built.module.parameters(), settings.grad_clip)
        optimizer.step()
        pull()
        losses.append(loss.item())
    checkpoint.save_weights(stage, built.module)
    patients_used = len(set(store.records.patient_id.to_numpy()[rows]))
    return {"stage": stage, "round": round, "steps": steps, "patients": patients_used, "records_used": len(rows),
            "loss": float(np.mean(losses[-max(1, len(losses) // 5):])), "first_loss": losses[0],
            "seconds": float(np.round(time.perf_counter() - started, 2)), "checkpoint": str(checkpoint.path)}


def proximal_step(module: torch.nn.Module, lr: float, mu: float) -> Callable[[], None]:
    """FedProx: after each optimiser step, pull the weights towards the round's starting (global) weights,
    w <- w - lr * mu * (w - w_global), the gradient step of (mu / 2) ||w - w_global||^2. It does not touch
    the data, so under DP-SGD it is post-processing and costs no privacy."""
    if mu <= 0:
        return lambda: None
    start = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def pull() -> None:
        for p, p0 in zip(module.parameters(), start):
            p.sub_(lr * mu * (p - p0))

    return pull


def use_population_normalizer(checkpoint: Checkpoint) -> None:
    """Fixed population statistics for HR and age in federated and private training: fitting them on
    one site's patients would release a statistic of them without noise, and sites would disagree."""
    if not (checkpoint.path / "conditioning.json").is_file():
        checkpoint.write_text("conditioning.json", PatientInfoNormalizer().to_json())


def _save(checkpoint: Checkpoint, stage: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
          rng: np.random.Generator, generator: torch.Generator, step: int) -> None:
    checkpoint.save_weights(stage, module)
    checkpoint.save_state(stage, {"step": step, "optimizer": optimizer.state_dict(),
                                  "numpy_rng": rng.bit_generator.state, "torch_rng": generator.get_state(),
                                  "global_torch_rng": torch.get_rng_state()})


def _truncate_log(log: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again)."""
    if log.is_file():
        keep = [l for l in log.read_text().splitlines() if json.loads(l)["step"] <= step]
        log.write_text("".join(l + "\n" for l in keep))


def _check_store(store: SiteStore, config: ExperimentConfig) -> None:
    have = store.manifest["representation"]["n_samples"]
    if have != config.data.n_samples:
        raise ValueError(f"{store.path}: store holds {have} samples per record, the config expects "
                         f"{config.data.n_samples}; prepare it with --samples {config.data.n_samples}")


def _check_or_save_config(checkpoint: Checkpoint, config: ExperimentConfig) -> None:
    """A checkpoint folder belongs to one model configuration: refuse to mix weights of two."""
    if (checkpoint.path / "config.yaml").is_file():
        existing = checkpoint.config()
        if to_dict(existing.model) != to_dict(config.model):
            raise ConfigError(f"{checkpoint.path}: holds weights of a different model configuration; "
                              "use another --out folder")
    checkpoint.save_config(config)


def load_conditioner(config: ExperimentConfig, checkpoint: Checkpoint, store: SiteStore | None = None,
                     rows: np.ndarray | None = None) -> Conditioner:
    """The conditioner of a checkpoint; its patient-info statistics are fitted on the first store it
    sees and then kept (they are part of the model)."""
    encoder = StatementEncoder(config.text.encoder, cache_dir=checkpoint.path / "text-cache")
    path = checkpoint.path / "conditioning.json"
    if path.is_file():
        normalizer = PatientInfoNormalizer.from_json(path.read_text())
    elif store is not None:
        records = store.records.iloc[rows] if rows is not None else store.records
        normalizer = PatientInfoNormalizer.fit(conditioning_hr(records),
                                               records["age"].replace("", np.nan).astype(float).to_numpy())
        checkpoint.write_text("conditioning.json", normalizer.to_json())
    else:
        raise FileNotFoundError(f"{path}: missing; the checkpoint was not trained past the VAE stage")
    return Conditioner(encoder, normalizer, config.text.max_statements)


def frozen_vae(config: ExperimentConfig, checkpoint: Checkpoint) -> ECGVAE:
    vae = checkpoint.load_weights("vae", ECGVAE(config.model.vae))
    return vae.eval().requires_grad_(False)


def _vae_stage(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, checkpoint: Checkpoint) -> Stage:
    settings = config.vae
    vae = ECGVAE(config.model.vae)
    signals = torch.from_numpy(np.asarray(store.signals[rows]))

    def step_loss(step: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        index = rng.choice(len(rows), size=min(settings.batch_size, len(rows)), replace=False)
        kl_weight = kl_weight_at(step, settings.kl_ramp_steps, settings.kl_max)
        return vae_batch_loss(vae, signals[index], kl_weight).mean(), {"kl_weight": kl_weight}

    return Stage(vae, step_loss, len(rows))


@dataclasses.dataclass
class IBEInputs:
    latents: torch.Tensor  # (n, C, L) VAE latents of the training rows
    conditions: Conditions
    pairs: np.ndarray  # (m, 2) local indices (earlier, later) of the same patient
    by_patient: dict[str, list[int]]  # patient -> indices into `pairs`


def ibe_inputs(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, checkpoint: Checkpoint) -> IBEInputs:
    checkpoint.require("vae")
    latents = stage_data.encode_latents(frozen_vae(config, checkpoint), store.signals[rows])
    conditions = store_conditions(store.records.iloc[rows], load_conditioner(config, checkpoint, store, rows))
    local = {row: i for i, row in enumerate(rows)}
    pairs = stage_data.earlier_later_pairs(store, rows)
    if len(pairs) < 2:
        raise ValueError(f"{store.path}: the IBE needs at least two patients with two or more ECGs, "
                         f"found {len(pairs)} pairs")
    pairs = np.vectorize(local.get)(pairs)
    patient_of = store.records.patient_id.to_numpy()[rows]
    by_patient: dict[str, list[int]] = {}
    for k, (a, _) in enumerate(pairs):
        by_patient.setdefault(patient_of[a], []).append(k)
    return IBEInputs(latents, conditions, pairs, by_patient)


def _ibe_stage(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, checkpoint: Checkpoint) -> Stage:
    settings = config.ibe
    inputs = ibe_inputs(config, store, rows, checkpoint)
    latents, conditions, pairs, by_patient = inputs.latents, inputs.conditions, inputs.pairs, inputs.by_patient
    patients = sorted(by_patient)
    ibe = IndividualBaseExtractor(config.model.ibe)

    def step_loss(step: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        # one pair per patient in a batch: another pair of the same patient would be a false negative
        chosen = rng.choice(len(patients), size=min(settings.batch_size, len(patients)), replace=False)
        picked = pairs[[rng.choice(by_patient[patients[c]]) for c in chosen]]
        ref, tgt = torch.from_numpy(picked[:, 0]), torch.from_numpy(picked[:, 1])
        loss = ibe_batch_loss(ibe, (latents[ref], *conditions.tokens(ref)), (latents[tgt], *conditions.tokens(tgt)),
                              settings.temperature)
        return loss, {}

    return Stage(ibe, step_loss, len(patients))


def twin_inputs(config: ExperimentConfig, store: SiteStore, rows: np.ndarray,
                checkpoint: Checkpoint) -> tuple[torch.Tensor, Conditions, torch.Tensor]:
    """(latents, conditions, base vector of each row's reference ECG) for the twin stage."""
    checkpoint.require("vae", "ibe")
    latents = stage_data.encode_latents(frozen_vae(config, checkpoint), store.signals[rows])
    conditions = store_conditions(store.records.iloc[rows], load_conditioner(config, checkpoint, store, rows))
    ibe = checkpoint.load_weights("ibe", IndividualBaseExtractor(config.model.ibe)).requires_grad_(False)
    base_all = stage_data.base_vectors(ibe, latents, conditions)
    local = {row: i for i, row in enumerate(rows)}
    refs = np.array([local[r] for r in stage_data.reference_rows(store, rows,
                                                                  np.random.default_rng(config.twin.seed))])
    return latents, conditions, base_all[torch.from_numpy(refs)]


def _twin_stage(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, checkpoint: Checkpoint) -> Stage:
    settings = config.twin
    latents, conditions, base = twin_inputs(config, store, rows, checkpoint)
    denoiser = AdaXDenoiser(config.model.dit)
    diffusion = GaussianDiffusion(config.model.diffusion)

    def step_loss(step: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        index = torch.from_numpy(rng.choice(len(rows), size=min(settings.batch_size, len(rows)), replace=False))
        tokens, mask = conditions.tokens(index)
        loss = twin_batch_loss(denoiser, diffusion, latents[index], base[index], tokens, mask,
                               settings.base_dropout, settings.cond_dropout, settings.noise_draws, generator)
        return loss.mean(), {}

    return Stage(denoiser, step_loss, len(rows))


_BUILDERS: dict[str, Callable[..., Stage]] = {"vae": _vae_stage, "ibe": _ibe_stage, "twin": _twin_stage}
