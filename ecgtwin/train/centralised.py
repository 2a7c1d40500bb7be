"""`ecgtwin train`: one stage on one site's store, non-private, with checkpoints, resume and loss curves.

Resuming continues from the last checkpoint with the same batches and noise as an uninterrupted run
(the random states are saved with the optimizer), so an interruption changes nothing in the result.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import torch
from tqdm import tqdm

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.conditioning import NORMALIZER_FILE, Conditioner, fit_normalizer, load_conditioner
from ecgtwin.compute import adamw, autocast, compile_module, use_tf32
from ecgtwin.config import STAGES, ConfigError, ExperimentConfig, to_dict
from ecgtwin.data.store import SiteStore
from ecgtwin.errors import UserError
from ecgtwin.plot import plot_loss_curve
from ecgtwin.train.local import build_stage, trainable
from ecgtwin.train.result import check_store, pass_rows
from ecgtwin.weights import module_weights, start_from as foundation_start


def train_stage(stage: str, config: ExperimentConfig, store_path: str | Path, out: str | Path,
                progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
                foundation: str | Path | None = None, device: torch.device | str = "cpu") -> dict:
    """Train `stage` (vae | ibe | twin) into checkpoint folder `out`, resuming if it was interrupted. With
    `foundation` (an `ecgtwin pretrain` folder), the stage starts from its weights and earlier stages the
    checkpoint lacks are taken from it as they are (frozen). One training at a time writes a checkpoint folder."""
    with Checkpoint(out).lock():
        return _train_stage(stage, config, store_path, out, progress, on_step, foundation, device)


def _train_stage(stage: str, config: ExperimentConfig, store_path: str | Path, out: str | Path, progress: bool,
                 on_step: Callable[[int, dict], None] | None, foundation: str | Path | None,
                 device: torch.device | str) -> dict:
    store = SiteStore(store_path)
    check_store(store, config)
    checkpoint = Checkpoint(out)
    check_or_save_config(checkpoint, config)
    start_from = adopt_foundation(checkpoint, config, stage, foundation)
    settings = config.stage(stage)
    rows = pass_rows(store, config)
    if len(rows) == 0:
        raise UserError(f"{store.path}: no training records (all patients held out?)")
    checkpoint.require(*STAGES[: STAGES.index(stage)])
    weights = {s: checkpoint.load_arrays(s) for s in STAGES[: STAGES.index(stage) + 1] if checkpoint.has(s)}
    state = checkpoint.load_state(stage)
    if state is None:  # a fresh stage: the foundation's weights, else its seeded initial weights
        weights.pop(stage, None)
        if start_from is not None:
            weights[stage] = start_from
    rng, generator, start = np.random.default_rng(settings.seed), torch.Generator().manual_seed(settings.seed), 0
    ref_rng = np.random.default_rng(settings.seed)  # which other ECG of a patient is its reference (twin)
    built = build_stage(stage, config, store, rows, weights, _conditioner(config, checkpoint, store, rows), ref_rng,
                        device)
    use_tf32(device, config.compute.tf32)
    optimizer = adamw(trainable(built.module), settings.lr, settings.weight_decay, device)
    compile_module(built.module, config.compute.compile)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state, start = state["numpy_rng"], state["step"]
        generator.set_state(state["torch_rng"])
    log = checkpoint.path / f"{stage}_loss.jsonl"
    _truncate_log(log, start)
    started = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start, desc=f"train {stage}", unit="step", disable=not progress,
               file=sys.stderr)
    built.module.train()
    saved = start  # the step of the last checkpoint written, which a non-finite step must leave as it is
    for step in range(start, settings.steps):
        with autocast(device, config.compute.precision):
            loss, extra = built.step_loss(step, rng, generator)
        value = loss.item()
        if not math.isfinite(value):
            _stop(stage, step + 1, f"the loss is {value}", store, checkpoint, saved)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(built.module), settings.grad_clip)
        optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in trainable(built.module)):
            _stop(stage, step + 1, "the weights are not finite after the optimizer step", store, checkpoint, saved)
        entry = {"step": step + 1, "loss": value, **extra}
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4g}")
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            with log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            checkpoint.save_weights(stage, built.module)
            checkpoint.save_state(stage, {"step": step + 1, "optimizer": optimizer.state_dict(),
                                          "numpy_rng": rng.bit_generator.state, "torch_rng": generator.get_state()})
            saved = step + 1
        if on_step is not None:
            on_step(step + 1, entry)
    bar.close()
    plot_loss_curve(log, checkpoint.path / f"{stage}_loss.png", title=f"{config.name}: {stage} stage")
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()] if log.is_file() else []
    return {"stage": stage, "checkpoint": str(checkpoint.path), "steps": settings.steps, "resumed_from": start,
            "train_records_or_patients": built.n_train, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - started, 2),
            "loss_curve": str(checkpoint.path / f"{stage}_loss.png")}


def _stop(stage: str, step: int, what: str, store: SiteStore, checkpoint: Checkpoint, saved: int) -> NoReturn:
    """Stop before a NaN or an infinity reaches the weights on disk: it never trains back out, and a saved
    broken model would be resumed from, aggregated or exported."""
    kept = f"its checkpoint of step {saved}" if saved else f"its {stage} weights as they were (this run saved none)"
    raise UserError(f"train {stage}: step {step}: {what}; stopped, {checkpoint.path} keeps {kept}. Look for "
                    f"NaN or infinite values in {store.path / 'signals.npy'}, or lower {stage}.lr")


def adopt_foundation(checkpoint: Checkpoint, config: ExperimentConfig, stage: str,
                      foundation: str | Path | None) -> dict | None:
    """Copy what the checkpoint lacks from the foundation (earlier stages, its normaliser); return the
    stage's starting weights from the foundation (with fresh LoRA adapters where the stage trains `lora`)."""
    if config.stage(stage).trainable == "frozen":
        raise UserError(f"stage {stage} is frozen in the config (trainable: frozen): there is nothing to train")
    if foundation is None:
        return None
    source = Checkpoint(foundation)
    if to_dict(source.config().model) != to_dict(checkpoint.config().model):
        raise ConfigError(f"{source.path}: the foundation has another model configuration than the experiment")
    for earlier in STAGES[: STAGES.index(stage)]:
        if not checkpoint.has(earlier):
            checkpoint.save_arrays(earlier, foundation_start(earlier, config, source.load_arrays(earlier)))
    if not (checkpoint.path / NORMALIZER_FILE).is_file() and (source.path / NORMALIZER_FILE).is_file():
        checkpoint.write_text(NORMALIZER_FILE, source.read_text(NORMALIZER_FILE))
    return foundation_start(stage, config, source.load_arrays(stage))


def _conditioner(config: ExperimentConfig, checkpoint: Checkpoint, store: SiteStore, rows: np.ndarray) -> Conditioner:
    """Centralised training fits the patient-info statistics on the first store it sees and keeps them
    (they are part of the model)."""
    if not (checkpoint.path / NORMALIZER_FILE).is_file():
        checkpoint.write_text(NORMALIZER_FILE, fit_normalizer(store.records.iloc[rows]).to_json())
    return load_conditioner(config, checkpoint.path)


def _truncate_log(log: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again)."""
    if log.is_file():
        keep = [l for l in log.read_text().splitlines() if json.loads(l)["step"] <= step]
        log.write_text("".join(l + "\n" for l in keep))


def check_or_save_config(checkpoint: Checkpoint, config: ExperimentConfig) -> None:
    """A checkpoint folder belongs to one model configuration: refuse to mix weights of two."""
    if (checkpoint.path / "config.yaml").is_file():
        existing = checkpoint.config()
        if to_dict(existing.model) != to_dict(config.model):
            raise ConfigError(f"{checkpoint.path}: holds weights of a different model configuration; "
                              "use another --out folder")
    checkpoint.save_config(config)


__all__ = ["train_stage", "check_or_save_config", "adopt_foundation", "module_weights"]
