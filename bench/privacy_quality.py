"""What privacy costs in quality, on a small synthetic site (2 hospitals' worth of patients, 3 ECGs each):

- IBE: the paper's InfoNCE (non-private) vs the per-patient public-negative objective, without and
  with DP-SGD: how well base vectors of HELD-OUT patients separate people (cosine margin: mean
  cosine to the same patient's other ECGs minus mean cosine to others'; and top-1 identification).
- Twin: noise multiplicity under DP-SGD at the same epsilon: held-out denoising loss with 1 vs 4
  (t, noise) draws per patient per step, evaluated on fixed draws.
The VAE is trained once, non-private, so that only the compared stage differs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.conditioning import ensure_population_normalizer, load_conditioner, store_conditions
from ecgtwin.config import STAGES, load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.split import split_patients, training_rows
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.models import GaussianDiffusion, IndividualBaseExtractor
from ecgtwin.privacy import Ledger, PrivacyPolicy
from ecgtwin.privacy.policy import StagePlan, StagePlans
from ecgtwin.train.centralised import train_stage
from ecgtwin.train.inputs import base_vectors, encode_latents, ibe_inputs
from ecgtwin.train.losses import ibe_private_loss
from ecgtwin.train.private import private_pass
from ecgtwin.train.public import public_negatives
from ecgtwin.train.result import frozen_ibe, frozen_vae
from ecgtwin.weights import build_module, frozen, load_weights_into

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
HELD_OUT = 0.25
IBE_STEPS, TWIN_STEPS, EPSILON = 150, 200, 8.0


def run(out) -> dict:
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize_consortium(root / "raw", sites=2, patients_per_site=24, records_per_patient=3, seed=7)
        prepare_store("synthetic", root / "raw", root / "store", on_reject=lambda r: None)
        config = load_config(CONFIG)
        config.data.held_out_fraction = HELD_OUT
        config.vae.steps, config.ibe.steps, config.twin.steps = 300, IBE_STEPS, TWIN_STEPS
        train_stage("vae", config, root / "store", root / "base", progress=False)
        results = {"patients": len(SiteStore(root / "store").patients), "held_out_fraction": HELD_OUT,
                   "epsilon": EPSILON, "ibe": _ibe(config, root), "twin": _twin(config, root)}
    print(results, flush=True)
    return results


def _copy_base(root: Path, name: str) -> Path:
    """A checkpoint folder with the shared VAE and the fixed population statistics (what the DP passes use),
    so that every compared run conditions on the same scale."""
    folder = root / name
    folder.mkdir()
    for f in ("vae.safetensors", "config.yaml"):
        (folder / f).write_bytes((root / "base" / f).read_bytes())
    ensure_population_normalizer(folder)
    return folder


def _policy(stage: str, steps: int, batch: int = 16, **extra) -> PrivacyPolicy:
    plans = {s: StagePlan(rounds=0) for s in STAGES}
    plans[stage] = StagePlan(rounds=1, local_steps=steps, batch_patients=batch)
    return PrivacyPolicy(site="bench", epsilon=EPSILON, delta=1e-3, accountant="prv", seed=0, population=POPULATION,
                         stages=StagePlans(**plans), **extra)


def _private(stage: str, config, store: SiteStore, folder: Path, policy: PrivacyPolicy, ledger: Ledger) -> dict:
    """One DP pass of `stage` from the folder's frozen earlier stages, its weights saved back there. The
    folder is also the pass's cache (statement embeddings, public negatives, noise plan)."""
    checkpoint = Checkpoint(folder)
    weights = {s: checkpoint.load_arrays(s) for s in STAGES[: STAGES.index(stage)]}
    result = private_pass(stage, config, store, weights, policy, ledger, cache_dir=folder, progress=False)
    checkpoint.save_arrays(stage, result.weights)
    return result.summary


def _ibe(config, root: Path) -> dict:
    store = SiteStore(root / "store")
    out = {}
    # 1. the paper's InfoNCE, non-private
    paper = _copy_base(root, "ibe_infonce")
    train_stage("ibe", config, store.path, paper, progress=False)
    # 2. the per-patient objective, non-private (same steps, batch, learning rate)
    public = _copy_base(root, "ibe_public")
    _train_public_objective(config, store, Checkpoint(public))
    # 3. the per-patient objective under DP-SGD
    dp = _copy_base(root, "ibe_dp")
    summary = _private("ibe", config, store, dp, _policy("ibe", IBE_STEPS), Ledger(root / "ibe_dp_ledger.jsonl"))
    for name, folder in (("infonce_non_private", paper), ("public_negatives_non_private", public),
                         ("public_negatives_dp", dp)):
        out[name] = _separation(config, store, Checkpoint(folder))
    out["untrained"] = _separation(config, store, Checkpoint(paper), frozen(build_module("ibe", config, seed=0)))
    out["dp_epsilon"], out["dp_noise_multiplier"] = summary["epsilon"], summary["noise_multiplier"]
    return out


def _train_public_objective(config, store: SiteStore, checkpoint: Checkpoint, negatives: int = 15) -> None:
    rows = training_rows(store, config.data.held_out_fraction, config.data.split_seed)
    vae = frozen_vae(config, checkpoint.load_arrays("vae"))
    conditioner = load_conditioner(config, checkpoint.path)
    inputs = ibe_inputs(store, rows, vae, conditioner)
    pub_latents, pub_conditions = public_negatives(config, vae, conditioner, checkpoint.path / "public-negatives")
    ibe = build_module("ibe", config, seed=config.ibe.seed)
    optimizer = torch.optim.AdamW(ibe.parameters(), lr=config.ibe.lr)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    patients = sorted(inputs.by_patient)
    for _ in range(config.ibe.steps):
        chosen = rng.choice(len(patients), size=min(16, len(patients)), replace=False)
        pairs = inputs.pairs[[rng.choice(inputs.by_patient[patients[c]]) for c in chosen]]
        ref, tgt = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        neg = torch.randint(0, len(pub_latents), (len(chosen) * negatives,), generator=g)
        loss = ibe_private_loss(ibe, (inputs.latents[ref], *inputs.conditions.tokens(ref)),
                                (inputs.latents[tgt], *inputs.conditions.tokens(tgt)),
                                (pub_latents[neg], *pub_conditions.tokens(neg)), config.ibe.temperature).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint.save_weights("ibe", ibe)


def _held_out(config, store: SiteStore, checkpoint: Checkpoint):
    _, held = split_patients(store.patients, config.data.held_out_fraction, config.data.split_seed)
    rows = np.concatenate([store.records_of(p) for p in held])
    latents = encode_latents(frozen_vae(config, checkpoint.load_arrays("vae")), store, rows)
    conditions = store_conditions(store.records.iloc[rows], load_conditioner(config, checkpoint.path))
    return rows, latents, conditions, store.records.patient_id.to_numpy()[rows]


def _separation(config, store: SiteStore, checkpoint: Checkpoint, ibe: IndividualBaseExtractor | None = None) -> dict:
    ibe = ibe or frozen_ibe(config, checkpoint.load_arrays("ibe"))
    _, latents, conditions, patients = _held_out(config, store, checkpoint)
    base = torch.nn.functional.normalize(base_vectors(ibe, latents, conditions), dim=-1)
    sim = (base @ base.T).numpy()
    same = (patients[:, None] == patients[None, :]) & ~np.eye(len(patients), dtype=bool)
    other = patients[:, None] != patients[None, :]
    np.fill_diagonal(sim, -np.inf)
    top1 = float(np.mean(patients[sim.argmax(1)] == patients))
    np.fill_diagonal(sim, np.nan)
    return {"margin": round(float(np.nanmean(sim[same]) - np.nanmean(sim[other])), 3),
            "identification_top1": round(top1, 3), "held_out_patients": int(len(set(patients)))}


def _twin(config, root: Path) -> dict:
    store, out = SiteStore(root / "store"), {}
    ibe_weights = (root / "ibe_infonce" / "ibe.safetensors").read_bytes()
    for draws in (1, 4):
        folder = _copy_base(root, f"twin_draws{draws}")
        (folder / "ibe.safetensors").write_bytes(ibe_weights)
        cfg = dataclasses.replace(config, twin=dataclasses.replace(config.twin, noise_draws=draws))
        started = time.perf_counter()
        summary = _private("twin", cfg, store, folder, _policy("twin", TWIN_STEPS),
                           Ledger(root / f"twin{draws}_ledger.jsonl"))
        out[f"noise_draws_{draws}"] = {"held_out_loss": _twin_loss(cfg, store, Checkpoint(folder)),
                                       "epsilon": summary["epsilon"], "seconds": round(time.perf_counter() - started, 1)}
    return out


@torch.no_grad()
def _twin_loss(config, store: SiteStore, checkpoint: Checkpoint, draws: int = 8) -> float:
    """Held-out epsilon-prediction MSE on fixed (t, noise) draws, with the person and condition given."""
    rows, latents, conditions, _ = _held_out(config, store, checkpoint)
    base = base_vectors(frozen_ibe(config, checkpoint.load_arrays("ibe")), latents, conditions)
    denoiser = frozen(load_weights_into(build_module("twin", config), checkpoint.load_arrays("twin")))
    diffusion = GaussianDiffusion(config.model.diffusion)
    tokens, mask = conditions.tokens()
    loss = diffusion.training_loss(lambda z, t: denoiser(z, t, base, tokens, mask), latents, noise_draws=draws,
                                   generator=torch.Generator().manual_seed(123))
    return round(float(loss.mean()), 4)
