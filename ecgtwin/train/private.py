"""One DP-SGD pass of a stage at a site, private per PATIENT (Opacus).

Each step Poisson-samples patients (each independently with rate q), takes at most
`records_per_patient` of a sampled patient's records, and computes one loss per patient. Opacus
computes a gradient per forward row; the rows of one patient (its records, the IBE's pair and its
public negatives, every noise draw of the diffusion loss) are summed into that patient's gradient
before the DPOptimizer clips it to `max_grad_norm` and adds Gaussian noise. So a patient with many
recordings contributes at most one clipped gradient per step, which is what the accountant assumes.

The pass is charged to the site's ledger before it trains (see ecgtwin.privacy.ledger); a pass that
would exceed the budget is refused and nothing is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from tqdm import tqdm

from ecgtwin.config import STAGES, ExperimentConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.errors import UserError
from ecgtwin.models import GaussianDiffusion, kl_weight_at
from ecgtwin.privacy import Ledger, PrivacyPolicy
from ecgtwin.privacy.plan import stage_noise
from ecgtwin.train import inputs as stage_inputs
from ecgtwin.train.local import population_conditioner, proximal_step
from ecgtwin.train.losses import ibe_private_loss, twin_batch_loss, vae_batch_loss
from ecgtwin.train.public import public_negatives
from ecgtwin.train.result import PassResult, StageWeights, check_store, frozen_stages, pass_rows
from ecgtwin.weights import module_from, module_weights

# patients chosen this step -> (loss of each patient [U], the patient slot of every forward row [R])
UnitLoss = Callable[[list[np.ndarray], torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
PLAN_CACHE = "plan_cache.json"  # in the site's cache folder


@dataclasses.dataclass
class PrivateStage:
    module: torch.nn.Module
    units: list[np.ndarray]  # per patient: the items (records or IBE pairs) it may contribute
    unit_loss: UnitLoss
    one_row_per_unit: bool  # ghost clipping needs it (one forward, one row per patient)
    # what grad_sample_mode "auto" uses: hooks was fastest for every stage on CPU (docs/benchmarks.md);
    # a stage measured faster otherwise (e.g. on GPU) sets its own
    fastest_mode: str = "hooks"


def private_pass(stage: str, config: ExperimentConfig, store: SiteStore, weights: StageWeights,
                 policy: PrivacyPolicy, ledger: Ledger, round: int = 1, steps: int | None = None,
                 run: str = "", patients: list[str] | None = None, proximal_mu: float = 0.0,
                 cache_dir: Path | None = None, progress: bool = False,
                 on_step: Callable[[int, dict], None] | None = None) -> PassResult:
    """`steps` DP-SGD steps of `stage` (default: the policy's local_steps) from `weights[stage]` (fresh
    weights if absent), the earlier stages frozen at `weights[...]`. `patients` restricts training to
    those patients (the membership audit); by default the store's training patients.

    The pass is charged to `ledger` after everything that can fail without training and before the first
    noisy step; the result carries that ledger entry. `cache_dir` (site-side) keeps the noise plan, the
    statement embeddings and the public negatives between passes."""
    check_store(store, config)
    rows = pass_rows(store, config, patients)
    seed = None if policy.seed is None else policy.seed + 1000 * round + STAGES.index(stage)
    rng = np.random.default_rng(seed)
    generator = torch.Generator()
    generator.manual_seed(seed) if seed is not None else generator.seed()
    built = _BUILDERS[stage](config, store, rows, weights, policy, rng, cache_dir)
    # q is over ALL training patients, the same population in every stage (the plan assumes it); a
    # patient with nothing to contribute here (no pair, for the IBE) is a unit with zero gradient
    n = len(set(store.records.patient_id.to_numpy()[rows]))
    # no local paths in messages: a refusal's reason goes to the server
    q, sigma = stage_noise(policy, stage, n, where=policy.site or "site",
                           cache=cache_dir / PLAN_CACHE if cache_dir else None)
    steps = steps or policy.stage(stage).local_steps
    settings = config.stage(stage)
    pull = proximal_step(built.module, settings.lr, proximal_mu)  # FedProx; data-independent
    with dp_step(built, policy, settings, q * n, sigma, generator) as step_fn:
        entry = ledger.charge(policy, stage, round, steps, q, sigma, n, run)
        started, losses, used_patients, used_records, log = time.perf_counter(), [], set(), 0, []
        bar = tqdm(total=steps, desc=f"dp {stage} r{round}", unit="step", disable=not progress, file=sys.stderr)
        built.module.train()
        for step in range(steps):
            chosen = np.flatnonzero(rng.random(len(built.units)) < q)  # Poisson sampling over patients
            picks = [_pick(built.units[u], policy.records_per_patient, rng) for u in chosen]
            loss = step_fn(picks, step)
            pull()
            used_patients.update(chosen.tolist())
            used_records += sum(len(p) for p in picks)
            losses.append(loss)
            bar.update(1)
            line = {"round": round, "step": step + 1, "loss": loss, "patients": len(chosen)}
            log.append(line)
            if on_step is not None:
                on_step(step + 1, line)
        bar.close()
    finite = [l for l in losses if l == l]
    summary = {"stage": stage, "round": round, "steps": steps, "patients": n,
               "patients_used": len(used_patients), "records_used": used_records,
               "loss": float(np.mean(finite[-max(1, len(finite) // 5):])) if finite else float("nan"),
               "first_loss": finite[0] if finite else float("nan"),
               "sample_rate": q, "noise_multiplier": sigma, "max_grad_norm": policy.max_grad_norm,
               "epsilon": entry["epsilon"], "delta": policy.delta, "accountant": policy.accountant,
               "grad_sample_mode": resolved_mode(built, policy),
               "seconds": float(np.round(time.perf_counter() - started, 2))}
    return PassResult(stage, module_weights(built.module), summary, log, entry)


def _pick(items: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return items if len(items) <= k else rng.choice(items, size=k, replace=False)


@contextlib.contextmanager
def dp_step(built: PrivateStage, policy: PrivacyPolicy, settings, expected_batch: float, sigma: float,
            generator: torch.Generator) -> Iterator[Callable[[list[np.ndarray], int], float]]:
    """The DP step in the policy's per-sample gradient mode (it returns the mean patient loss). Opacus'
    hooks and per-sample gradients are removed from the module when the block ends, however it ends."""
    module = built.module
    mode = resolved_mode(built, policy)
    base = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    expected = max(1, int(round(expected_batch)))
    opts = dict(noise_multiplier=sigma, max_grad_norm=policy.max_grad_norm, expected_batch_size=expected,
                loss_reduction="mean", generator=generator)
    with warnings.catch_warnings():  # Opacus' "secure RNG off" warning: sampling uses numpy's PCG64
        warnings.simplefilter("ignore")
        if mode == "ghost":
            if not built.one_row_per_unit or policy.records_per_patient != 1:
                raise UserError("grad_sample_mode ghost needs one forward row per patient: use it for the VAE "
                                 "and twin stages with records_per_patient 1 and noise_draws 1, else hooks")
            gsm = GradSampleModuleFastGradientClipping(module, batch_first=True, loss_reduction="sum",
                                                       max_grad_norm=policy.max_grad_norm, use_ghost_clipping=True)
            optimizer = DPOptimizerFastGradientClipping(base, **opts)
        else:
            gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum",
                                   force_functorch=mode == "functorch")
            optimizer = DPOptimizer(base, **opts)
    params = [p for p in module.parameters() if p.requires_grad]

    def step(picks: list[np.ndarray], index: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        if not picks:  # Poisson sampling may draw nobody: the step is noise only, as accounted
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape))
            if mode == "ghost":
                for p in params:
                    p.grad = torch.zeros_like(p)
            optimizer.step()
            return float("nan")
        losses, row_unit = built.unit_loss(picks, generator, index)
        if mode == "ghost":
            losses.sum().backward(retain_graph=True)  # first pass: per-patient norms only
            optimizer.zero_grad()
            coeff = gsm.get_clipping_coef()
            gsm.disable_hooks()
            (coeff.detach() * losses).sum().backward()  # second pass: the clipped sum
            gsm.enable_hooks()
        else:
            with warnings.catch_warnings():  # "full backward hook firing ... no inputs require gradients"
                warnings.simplefilter("ignore", UserWarning)
                losses.sum().backward()
            group_grad_samples(params, row_unit, len(picks))
        optimizer.step()
        return float(losses.detach().mean())

    try:
        yield step
    finally:
        gsm._close()  # removes the hooks and the grad_sample attributes it added
        for p in module.parameters():
            p.grad = None


def resolved_mode(built: PrivateStage, policy: PrivacyPolicy) -> str:
    return built.fastest_mode if policy.grad_sample_mode == "auto" else policy.grad_sample_mode


def group_grad_samples(params: list[torch.nn.Parameter], row_unit: torch.Tensor, n_units: int) -> None:
    """Sum Opacus' per-row gradients into one gradient per patient (what DP-SGD then clips)."""
    identity = len(row_unit) == n_units and bool((row_unit == torch.arange(n_units)).all())
    for p in params:
        if identity and not isinstance(p.grad_sample, list):
            continue  # one row per patient already (1 record, VAE/twin): nothing to sum
        rows = p.grad_sample
        if isinstance(rows, list):
            rows = torch.stack(rows).sum(0)
        p.grad_sample = torch.zeros((n_units, *rows.shape[1:]), dtype=rows.dtype).index_add_(0, row_unit, rows)


def _units_by_patient(store: SiteStore, rows: np.ndarray) -> list[np.ndarray]:
    """Local row indices of every training patient's records."""
    local = {row: i for i, row in enumerate(rows)}
    allowed = set(rows.tolist())
    units = [np.array([local[r] for r in store.records_of(p) if r in allowed], dtype=int) for p in store.patients]
    return [u for u in units if len(u)]


def _flatten(picks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.from_numpy(np.concatenate(picks))
    unit = torch.repeat_interleave(torch.arange(len(picks)), torch.tensor([len(p) for p in picks]))
    return index, unit


def _per_unit_mean(row_loss: torch.Tensor, unit: torch.Tensor, n_units: int) -> torch.Tensor:
    counts = torch.zeros(n_units).index_add_(0, unit, torch.ones(len(unit)))
    return torch.zeros(n_units).index_add_(0, unit, row_loss) / counts


def _vae(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
         policy: PrivacyPolicy, rng: np.random.Generator, cache_dir: Path | None) -> PrivateStage:
    vae = module_from("vae", config, weights.get("vae"))
    signals = torch.from_numpy(np.asarray(store.signals[rows]))
    settings = config.vae

    def unit_loss(picks: list[np.ndarray], generator: torch.Generator, step: int):
        index, unit = _flatten(picks)
        kl = kl_weight_at(step, settings.kl_ramp_steps, settings.kl_max)
        return _per_unit_mean(vae_batch_loss(vae, signals[index], kl, generator), unit, len(picks)), unit

    return PrivateStage(vae, _units_by_patient(store, rows), unit_loss, one_row_per_unit=True)


def _ibe(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
         policy: PrivacyPolicy, rng: np.random.Generator, cache_dir: Path | None) -> PrivateStage:
    (vae,) = frozen_stages("ibe", config, weights)
    conditioner = population_conditioner(config, cache_dir)
    inputs = stage_inputs.ibe_inputs(store, rows, vae, conditioner)
    pub_latents, pub_conditions = public_negatives(config, vae, conditioner,
                                                   cache_dir / "public-negatives" if cache_dir else None)
    m = policy.public_negatives
    ibe = module_from("ibe", config, weights.get("ibe"))
    units = [np.array(v, dtype=int) for _, v in sorted(inputs.by_patient.items())]

    def unit_loss(picks: list[np.ndarray], generator: torch.Generator, step: int):
        # one pair per patient and step (a second pair of the same patient adds no privacy cost but
        # the objective needs no more); each patient gets its own copy of m public negatives
        pairs = inputs.pairs[[p[0] for p in picks]]
        ref, tgt = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        neg = torch.randint(0, len(pub_latents), (len(picks) * m,), generator=generator)
        loss = ibe_private_loss(ibe, (inputs.latents[ref], *inputs.conditions.tokens(ref)),
                                (inputs.latents[tgt], *inputs.conditions.tokens(tgt)),
                                (pub_latents[neg], *pub_conditions.tokens(neg)), config.ibe.temperature)
        b = torch.arange(len(picks))
        return loss, torch.cat([b, b, b.repeat_interleave(m)])

    return PrivateStage(ibe, units, unit_loss, one_row_per_unit=False)


def _twin(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
          policy: PrivacyPolicy, rng: np.random.Generator, cache_dir: Path | None) -> PrivateStage:
    settings = config.twin
    vae, ibe = frozen_stages("twin", config, weights)
    data = stage_inputs.twin_inputs(store, rows, vae, ibe, population_conditioner(config, cache_dir), rng)
    denoiser = module_from("twin", config, weights.get("twin"))
    diffusion = GaussianDiffusion(config.model.diffusion)

    def unit_loss(picks: list[np.ndarray], generator: torch.Generator, step: int):
        index, unit = _flatten(picks)
        tokens, mask = data.conditions.tokens(index)
        row_loss = twin_batch_loss(denoiser, diffusion, data.latents[index], data.base[index], tokens, mask,
                                   settings.base_dropout, settings.cond_dropout, settings.noise_draws, generator)
        return _per_unit_mean(row_loss, unit, len(picks)), unit

    return PrivateStage(denoiser, _units_by_patient(store, rows), unit_loss,
                        one_row_per_unit=settings.noise_draws == 1)


_BUILDERS: dict[str, Callable[..., PrivateStage]] = {"vae": _vae, "ibe": _ibe, "twin": _twin}
