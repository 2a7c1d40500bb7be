"""One DP-SGD pass of a stage at a site, private per PATIENT (Opacus).

Each step Poisson-samples patients (each independently with rate q), takes at most
`records_per_patient` of a sampled patient's records, and computes one loss per patient. Opacus
computes a gradient per forward row; the rows of one patient (its records, the IBE's pair and its
public negatives, every noise draw of the diffusion loss) are summed into that patient's gradient
before the DPOptimizer clips it to `max_grad_norm` and adds Gaussian noise. So a patient with many
recordings contributes at most one clipped gradient per step, which is what the accountant assumes.

Every random draw that touches a patient's gradient comes from the pass's secret key, per patient
(ecgtwin.train.randomness): removing one patient changes no other patient's gradient. The sampling rate
is batch_patients / the policy's public population, never the private count. A patient whose loss or
gradient is not finite contributes nothing to the step (its gradient is zeroed before clipping, so the
sensitivity stays max_grad_norm and no NaN reaches the weights).

The pass is charged to the site's ledger before it trains (see ecgtwin.privacy.ledger); a pass that
would exceed the budget is refused and nothing is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

from ecgtwin.compute import adamw, autocast, use_tf32
from ecgtwin.config import STAGES, ExperimentConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.device import module_device, to_device
from ecgtwin.errors import UserError
from ecgtwin.models import GaussianDiffusion, kl_weight_at
from ecgtwin.privacy import Ledger, PrivacyPolicy
from ecgtwin.privacy.plan import stage_noise
from ecgtwin.train import inputs as stage_inputs
from ecgtwin.train.local import population_conditioner, proximal_step
from ecgtwin.train.losses import ibe_private_loss, twin_loss_at, vae_batch_loss
from ecgtwin.train.public import public_negatives
from ecgtwin.train.randomness import PatientRandomness
from ecgtwin.train.result import PassResult, StageWeights, check_store, frozen_stages, pass_rows
from ecgtwin.weights import module_from, module_weights, select_trainable

Unit = tuple[str, np.ndarray]  # (patient id, the items it contributes this step: records or IBE pairs)
# the units chosen this step, the step -> (loss of each unit [U], the unit slot of every forward row [R])
UnitLoss = Callable[[list[Unit], int], tuple[torch.Tensor, torch.Tensor]]
PLAN_CACHE = "plan_cache.json"  # in the site's cache folder
# What grad_sample_mode auto takes per device kind, precision and stage: the mode `python -m bench.gpu --record`
# measured fastest there (docs/benchmarks.md); hooks where nothing was measured.
MEASURED_MODES = Path(__file__).with_name("opacus_modes.json")
CPU = torch.device("cpu")  # where a stage builder puts its module and batches unless told otherwise


@dataclasses.dataclass
class PrivateStage:
    module: torch.nn.Module
    units: list[Unit]  # per patient: its id and all the items it may contribute
    unit_loss: UnitLoss
    one_row_per_unit: bool  # ghost clipping needs it (one forward, one row per patient)


def pass_randomness(policy: PrivacyPolicy, stage: str, round: int, ledger: Ledger | None = None,
                    key: str | None = None) -> PatientRandomness:
    """The pass's secret key. A keyed pass (a federated round): from the site's secret and the pass key, so a
    retry that re-uses the pass's charge draws the same noise (ecgtwin.privacy.ledger); an unkeyed one: fresh
    OS entropy; tests only (see PrivacyPolicy.seed): from the seed."""
    if policy.seed is not None:
        return PatientRandomness.from_seed(policy.seed, policy.site, stage, round)
    if key is not None and ledger is not None:
        return PatientRandomness(ledger.pass_secret(key))
    return PatientRandomness.fresh()


def private_pass(stage: str, config: ExperimentConfig, store: SiteStore, weights: StageWeights,
                 policy: PrivacyPolicy, ledger: Ledger, round: int = 1, steps: int | None = None,
                 run: str = "", patients: list[str] | None = None, proximal_mu: float = 0.0,
                 cache_dir: Path | None = None, progress: bool = False,
                 on_step: Callable[[int, dict], None] | None = None, charge_key: str | None = None,
                 device: torch.device | str = "cpu") -> PassResult:
    """`steps` DP-SGD steps of `stage` (default: the policy's local_steps) from `weights[stage]` (fresh
    weights if absent), the earlier stages frozen at `weights[...]`. `patients` restricts training to
    those patients (the membership audit); by default the store's training patients.

    The pass is charged to `ledger` after everything that can fail without training and before the first
    noisy step; the result carries that ledger entry. With `charge_key`, a charge already made under that
    key (a pass that died before producing output) is re-used. `cache_dir` (site-side) keeps the noise plan,
    the statement embeddings and the public negatives between passes."""
    check_store(store, config)
    where = policy.site or "site"  # no local paths in messages: a refusal's reason goes to the server
    if store.patient_ids_are_records and policy.unit != "record":
        raise UserError(f"{where}: the store's source has no patient ids (each recording stands for its own "
                        "patient), so patient-level DP would be record-level DP; set unit: record in the policy "
                        "to train with that weaker guarantee")
    rows = pass_rows(store, config, patients)
    rand = pass_randomness(policy, stage, round, ledger, charge_key)
    built = private_stage(stage, config, store, rows, weights, policy, rand, cache_dir, torch.device(device))
    n = len(set(store.records.patient_id.to_numpy()[rows]))
    population = policy.public_population(where)
    if n > population:  # a utility and delta matter for the officer; refusing would leak n to the server
        warnings.warn(f"{where}: the store has more training patients than the policy's population {population} "
                      "(delta was set against it); training with the declared count, declare a larger one")
    # q = batch / the PUBLIC population, the same in every stage (the plan assumes it); a patient with
    # nothing to contribute here (no pair, for the IBE) is a unit with zero gradient
    q, sigma = stage_noise(policy, stage, population, where=where,
                           cache=cache_dir / PLAN_CACHE if cache_dir else None)
    steps = steps or policy.stage(stage).local_steps
    if policy.distributed_sites is not None and (steps != 1 or proximal_mu):
        raise UserError(f"{where}: distributed DP releases one noisy gradient sum per round (1 step, no FedProx), "
                        f"asked {steps} steps" + (f" with proximal mu {proximal_mu:g}" if proximal_mu else ""))
    settings = config.stage(stage)
    use_tf32(device, config.compute.tf32)
    pull = proximal_step(built.module, settings.lr, proximal_mu)  # FedProx; data-independent
    mode = resolved_mode(stage, built, policy, config.compute.precision)
    with dp_step(built, policy, settings, q * population, sigma, rand.pass_generator(device),
                 config.compute.precision, mode) as step_fn:
        entry = ledger.charge(policy, stage, round, steps, q, sigma, n, run, key=charge_key)
        started, losses, used_patients, used_records, skipped, log = time.perf_counter(), [], set(), 0, 0, []
        bar = tqdm(total=steps, desc=f"dp {stage} r{round}", unit="step", disable=not progress, file=sys.stderr)
        built.module.train()
        for step in range(steps):
            chosen = [u for u in built.units if rand.uniform("sample", step, u[0]) < q]  # Poisson, per patient
            picks = [(pid, _pick(items, policy.records_per_patient, rand.numpy("records", step, pid)))
                     for pid, items in chosen]
            loss, dropped = step_fn(picks, step)
            pull()
            used_patients.update(pid for pid, _ in chosen)
            used_records += sum(len(p) for _, p in picks)
            skipped += dropped
            losses.append(loss)
            bar.update(1)
            line = {"round": round, "step": step + 1, "loss": loss, "patients": len(chosen), "non_finite": dropped}
            log.append(line)
            if on_step is not None:
                on_step(step + 1, line)
        bar.close()
    finite = [l for l in losses if l == l]
    summary = {"stage": stage, "round": round, "steps": steps, "patients": n, "population": population,
               "patients_used": len(used_patients), "records_used": used_records, "non_finite_patients": skipped,
               "loss": float(np.mean(finite[-max(1, len(finite) // 5):])) if finite else float("nan"),
               "first_loss": finite[0] if finite else float("nan"),
               "sample_rate": q, "noise_multiplier": sigma, "max_grad_norm": policy.max_grad_norm,
               "noise_multiplier_site": sigma * policy.site_noise_share,
               "epsilon": entry["epsilon"], "delta": policy.delta, "accountant": policy.accountant,
               "unit": policy.unit, "grad_sample_mode": mode, "population_exceeded": n > population,
               "seconds": float(np.round(time.perf_counter() - started, 2))}
    return PassResult(stage, module_weights(built.module), summary, log, entry)


def _pick(items: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return items if len(items) <= k else rng.choice(items, size=k, replace=False)


@contextlib.contextmanager
def dp_step(built: PrivateStage, policy: PrivacyPolicy, settings, expected_batch: float, sigma: float,
            generator: torch.Generator, precision: str = "fp32",
            mode: str | None = None) -> Iterator[Callable[[list[Unit], int], tuple[float, int]]]:
    """The DP step in the policy's per-sample gradient mode; it returns (the mean loss of the patients it
    used, how many it dropped for a non-finite loss or gradient). Opacus' hooks and per-sample gradients
    are removed from the module when the block ends, however it ends. With precision bf16 the forward is
    autocast; the per-patient gradients are cast to fp32 before they are clipped, and noise is fp32."""
    mode = mode or resolved_mode("", built, policy, precision)  # "": no measured stage, auto is hooks
    if mode == "ghost" and precision != "fp32":
        raise UserError("grad_sample_mode ghost computes the per-patient norms inside the backward, in the "
                        f"forward's dtype: use precision fp32 with it, or hooks with {precision}")
    if mode == "ghost" and (not built.one_row_per_unit or policy.records_per_patient != 1):
        raise UserError("grad_sample_mode ghost needs one forward row per patient: use it for the VAE "
                        "and twin stages with records_per_patient 1 and noise_draws 1, else hooks")
    engine = DPEngine.build(built, policy, settings, expected_batch, sigma, generator, precision, mode)
    try:
        yield engine.step
    finally:
        engine.close()


@dataclasses.dataclass
class DPEngine:
    """Opacus' pieces for one pass: the module wrapped for per-sample gradients and the noisy optimizer."""

    built: PrivateStage
    gsm: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # the stage's trainable subset only
    mode: str
    precision: str

    @classmethod
    def build(cls, built: PrivateStage, policy: PrivacyPolicy, settings, expected_batch: float, sigma: float,
              generator: torch.Generator, precision: str, mode: str) -> "DPEngine":
        module = built.module
        params = [p for p in module.parameters() if p.requires_grad]
        if policy.distributed_sites is None:
            base = adamw(params, settings.lr, settings.weight_decay, module_device(module))
        else:  # the step releases weights - (clipped sum + this site's noise share): linear, the server steps
            base = torch.optim.SGD(params, lr=max(1, int(round(expected_batch))))
        opts = dict(noise_multiplier=sigma * policy.site_noise_share, max_grad_norm=policy.max_grad_norm, loss_reduction="mean",
                    expected_batch_size=max(1, int(round(expected_batch))), generator=generator)
        with warnings.catch_warnings():  # Opacus' "secure RNG off" warning: the key is a secret (randomness.py)
            warnings.simplefilter("ignore")
            if mode == "ghost":
                gsm = GradSampleModuleFastGradientClipping(module, batch_first=True, loss_reduction="sum",
                                                           max_grad_norm=policy.max_grad_norm, use_ghost_clipping=True)
                optimizer = DPOptimizerFastGradientClipping(base, **opts)
            else:
                gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum",
                                       force_functorch=mode == "functorch")
                optimizer = DPOptimizer(base, **opts)
        return cls(built, gsm, optimizer, params, mode, precision)

    def step(self, picks: list[Unit], index: int) -> tuple[float, int]:
        """One noisy step over the sampled patients `picks`."""
        self.optimizer.zero_grad(set_to_none=True)
        if not picks:
            self.noise_only()
            return float("nan"), 0
        backward = self._ghost_backward if self.mode == "ghost" else self._per_sample_backward
        losses, dropped = backward(picks, index)
        if losses is None:
            self.noise_only()
            return float("nan"), dropped
        self.optimizer.step()
        return (float(losses.detach().mean()) if len(losses) else float("nan")), dropped

    def noise_only(self) -> None:
        """Nobody sampled (or usable): the step is noise only, as accounted."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
        self.optimizer.step()

    def _per_sample_backward(self, picks: list[Unit], index: int) -> tuple[torch.Tensor, int]:
        """Opacus' per-row gradients (hooks or functorch), summed per patient; a patient whose loss or
        gradient is not finite is zeroed (per-sample gradients are row-local: the others are intact)."""
        with autocast(module_device(self.built.module), self.precision):
            losses, row_unit = self.built.unit_loss(picks, index)
        finite = torch.isfinite(losses.detach())
        with warnings.catch_warnings():  # "full backward hook firing ... no inputs require gradients"
            warnings.simplefilter("ignore", UserWarning)
            torch.where(finite, losses, torch.zeros_like(losses)).sum().backward()
        group_grad_samples(self.params, row_unit, len(picks))
        return losses[finite], zero_non_finite(self.params)

    def _ghost_backward(self, picks: list[Unit], index: int) -> tuple[torch.Tensor | None, int]:
        """Ghost clipping sums the patients inside the backward, where one non-finite loss or gradient would
        poison the sum: patients with a non-finite loss are found first (no hooks, no graph), then those whose
        gradient norm is not finite (a finite loss can have one) after the norm pass; each time the pass is
        computed again without them (a patient's gradient does not depend on the others). Returns the losses
        it used (None if nobody is left) and how many patients it dropped."""
        gsm = self.gsm
        gsm.disable_hooks()
        with torch.no_grad():
            probe, _ = self.built.unit_loss(picks, index)  # ghost: fp32 only (checked in dp_step)
        gsm.enable_hooks()
        keep = [p for p, ok in zip(picks, torch.isfinite(probe).tolist()) if ok]
        while keep:
            losses, _ = self.built.unit_loss(keep, index)
            losses.sum().backward(retain_graph=True)  # first pass: per-patient norms only
            self.optimizer.zero_grad()
            finite = torch.isfinite(gsm.get_norm_sample()).tolist()
            if all(finite):
                coeff = gsm.get_clipping_coef()
                gsm.disable_hooks()
                (coeff.detach() * losses).sum().backward()  # second pass: the clipped sum
                gsm.enable_hooks()
                return losses, len(picks) - len(keep)
            keep = [p for p, ok in zip(keep, finite) if ok]
        return None, len(picks)

    def close(self) -> None:
        self.gsm._close()  # removes the hooks and the grad_sample attributes it added
        for p in self.built.module.parameters():
            p.grad = None


def resolved_mode(stage: str, built: PrivateStage, policy: PrivacyPolicy, precision: str = "fp32") -> str:
    """The policy's mode, or for auto the measured fastest one this pass can use (ghost needs one forward row
    per patient and fp32)."""
    if policy.grad_sample_mode != "auto":
        return policy.grad_sample_mode
    ghost_ok = built.one_row_per_unit and policy.records_per_patient == 1 and precision == "fp32"
    mode = measured_fastest(module_device(built.module).type, precision).get(stage, "hooks")
    return mode if mode != "ghost" or ghost_ok else "hooks"


def measured_fastest(device_type: str, precision: str, path: Path | None = None) -> dict[str, str]:
    """stage -> the Opacus mode measured fastest on this kind of device in this precision ({} if unmeasured)."""
    path = path or MEASURED_MODES
    table = json.loads(path.read_text()) if path.is_file() else {}
    return table.get(device_type, {}).get(precision, {})


def group_grad_samples(params: list[torch.nn.Parameter], row_unit: torch.Tensor, n_units: int) -> None:
    """Sum Opacus' per-row gradients into one gradient per patient (what DP-SGD then clips), in the
    parameter's dtype (fp32): under bf16 autocast Opacus' rows come in bf16, and the norms that decide the
    clipping must not be rounded to 8 bits."""
    identity = len(row_unit) == n_units and bool((row_unit.cpu() == torch.arange(n_units)).all())
    for p in params:
        rows = p.grad_sample
        if isinstance(rows, list):
            rows = torch.stack([r.to(p.dtype) for r in rows]).sum(0)
        rows = rows.to(p.dtype)
        if identity:
            p.grad_sample = rows  # one row per patient already (1 record, VAE/twin): nothing to sum
            continue
        p.grad_sample = torch.zeros((n_units, *rows.shape[1:]), dtype=rows.dtype,
                                    device=rows.device).index_add_(0, row_unit.to(rows.device), rows)


def zero_non_finite(params: list[torch.nn.Parameter]) -> int:
    """Zero every patient's gradient that is not finite in some parameter (0 x inf would make the clipped
    sum NaN); a zero gradient stays within the clip norm. Returns how many patients were zeroed."""
    bad = None
    for p in params:
        rows = ~torch.isfinite(p.grad_sample.flatten(1)).all(dim=1)
        bad = rows if bad is None else bad | rows
    if bad is None or not bad.any():
        return 0
    for p in params:
        p.grad_sample[bad] = 0.0
    return int(bad.sum())


def _units_by_patient(store: SiteStore, rows: np.ndarray) -> list[Unit]:
    """Every training patient's id and the local row indices of its records."""
    local = {row: i for i, row in enumerate(rows)}
    allowed = set(rows.tolist())
    units = [(p, np.array([local[r] for r in store.records_of(p) if r in allowed], dtype=int)) for p in store.patients]
    return [u for u in units if len(u[1])]


def _flatten(picks: list[Unit]) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.from_numpy(np.concatenate([items for _, items in picks]))
    unit = torch.repeat_interleave(torch.arange(len(picks)), torch.tensor([len(items) for _, items in picks]))
    return index, unit


def _per_unit_mean(row_loss: torch.Tensor, unit: torch.Tensor, n_units: int) -> torch.Tensor:
    zeros = torch.zeros(n_units, device=row_loss.device, dtype=row_loss.dtype)
    counts = zeros.index_add(0, unit, torch.ones(len(unit), device=row_loss.device, dtype=row_loss.dtype))
    return zeros.index_add(0, unit, row_loss) / counts


def _rows_from(rand: PatientRandomness, purpose: str, step: int, picks: list[Unit], draw) -> torch.Tensor:
    """One draw per forward row, each from its own patient's generator: stacked in row order."""
    out = []
    for pid, items in picks:
        g = rand.torch(purpose, step, pid)
        out += [draw(g) for _ in items]
    return torch.stack(out)


def _vae(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
         policy: PrivacyPolicy, rand: PatientRandomness, cache_dir: Path | None,
         device: torch.device = CPU) -> PrivateStage:
    vae = select_trainable(module_from("vae", config, weights.get("vae")), "vae", config).to(device)
    settings = config.vae
    latent = (config.model.vae.latent_channels, config.data.n_samples // vae.cfg.downsample_factor)

    def unit_loss(picks: list[Unit], step: int):
        index, unit = _flatten(picks)
        kl = kl_weight_at(step, settings.kl_ramp_steps, settings.kl_max)
        noise = _rows_from(rand, "vae-noise", step, picks, lambda g: torch.randn(latent, generator=g)).to(device)
        unit = unit.to(device)
        batch = to_device(store.read(rows[index.numpy()]), device)
        return _per_unit_mean(vae_batch_loss(vae, batch, kl, noise=noise), unit, len(picks)), unit

    return PrivateStage(vae, _units_by_patient(store, rows), unit_loss, one_row_per_unit=True)


def _ibe(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
         policy: PrivacyPolicy, rand: PatientRandomness, cache_dir: Path | None,
         device: torch.device = CPU) -> PrivateStage:
    (vae,) = frozen_stages("ibe", config, weights, device)
    conditioner = population_conditioner(config, cache_dir)
    inputs = stage_inputs.ibe_inputs(store, rows, vae, conditioner, minimum_pairs=0)  # no count-based refusal
    pub_latents, pub_conditions = public_negatives(config, vae, conditioner,
                                                   cache_dir / "public-negatives" if cache_dir else None)
    pub_latents, pub_conditions = pub_latents.to(device), pub_conditions.to(device)
    m = policy.public_negatives
    ibe = select_trainable(module_from("ibe", config, weights.get("ibe")), "ibe", config).to(device)
    units = [(p, np.array(v, dtype=int)) for p, v in sorted(inputs.by_patient.items())]

    def unit_loss(picks: list[Unit], step: int):
        # one pair per patient and step (a second pair of the same patient adds no privacy cost but
        # the objective needs no more); each patient gets its own copy of m public negatives
        pairs = inputs.pairs[[items[0] for _, items in picks]]
        ref, tgt = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        neg = torch.cat([torch.randint(0, len(pub_latents), (m,), generator=rand.torch("negatives", step, pid))
                         for pid, _ in picks])
        loss = ibe_private_loss(ibe, (inputs.latents[ref], *inputs.conditions.tokens(ref)),
                                (inputs.latents[tgt], *inputs.conditions.tokens(tgt)),
                                (pub_latents[neg], *pub_conditions.tokens(neg)), config.ibe.temperature)
        b = torch.arange(len(picks), device=device)
        return loss, torch.cat([b, b, b.repeat_interleave(m)])

    return PrivateStage(ibe, units, unit_loss, one_row_per_unit=False)


def _twin(config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
          policy: PrivacyPolicy, rand: PatientRandomness, cache_dir: Path | None,
         device: torch.device = CPU) -> PrivateStage:
    settings = config.twin
    vae, ibe = frozen_stages("twin", config, weights, device)
    data = stage_inputs.twin_inputs(store, rows, vae, ibe, population_conditioner(config, cache_dir),
                                    lambda patient: rand.numpy("reference", -1, patient))
    denoiser = select_trainable(module_from("twin", config, weights.get("twin")), "twin", config).to(device)
    diffusion = GaussianDiffusion(config.model.diffusion)
    draws, shape = settings.noise_draws, tuple(data.latents.shape[1:])

    def unit_loss(picks: list[Unit], step: int):
        index, unit = _flatten(picks)
        unit = unit.to(device)
        tokens, mask = data.conditions.tokens(index)
        drops = _rows_from(rand, "dropout", step, picks, lambda g: torch.rand(2, generator=g)).to(device)
        t = _rows_from(rand, "timestep", step, picks,
                       lambda g: torch.randint(0, diffusion.num_steps, (draws,), generator=g)).T.to(device)
        noise = _rows_from(rand, "noise", step, picks,
                           lambda g: torch.randn((draws, *shape), generator=g)).transpose(0, 1).to(device)
        row_loss = twin_loss_at(denoiser, diffusion, data.latents[index], data.base[index], tokens, mask,
                                drops[:, 0] < settings.base_dropout, drops[:, 1] < settings.cond_dropout, t, noise)
        return _per_unit_mean(row_loss, unit, len(picks)), unit

    return PrivateStage(denoiser, _units_by_patient(store, rows), unit_loss,
                        one_row_per_unit=settings.noise_draws == 1)


_BUILDERS: dict[str, Callable[..., PrivateStage]] = {"vae": _vae, "ibe": _ibe, "twin": _twin}


def private_stage(stage: str, config: ExperimentConfig, store: SiteStore, rows: np.ndarray, weights: StageWeights,
                  policy: PrivacyPolicy, rand: PatientRandomness, cache_dir: Path | None = None,
                  device: torch.device = CPU) -> PrivateStage:
    """The stage's trainable module, its patients and its per-patient loss, as a DP pass builds them (for
    measurements of the per-patient gradients, e.g. bench.dp_signal)."""
    return _BUILDERS[stage](config, store, rows, weights, policy, rand, cache_dir, device)
