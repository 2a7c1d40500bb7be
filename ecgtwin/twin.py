"""Reference ECG + target condition -> digital twins (ECGTwin's inference), written as WFDB + pictures.

The reference is encoded by the frozen VAE, the IBE strips its own condition and keeps the person
(the base vector), and the AdaX denoiser generates latents for the target condition, decoded by the VAE.
Everything happens at the site that holds the reference.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import signal as sps
from tqdm import tqdm

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.compute import autocast, check_precision, compile_module, use_tf32
from ecgtwin.conditioning import SEX_CODE, conditioning_hr, report_text
from ecgtwin.config import STAGES
from ecgtwin.data.preprocess import PreprocessConfig, preprocess
from ecgtwin.data.readers.common import load_12_lead
from ecgtwin.data.record import Record, RecordError, parse_age, parse_sex
from ecgtwin.data.store import SiteStore
from ecgtwin.data.wfdb_io import header_fields, write_wfdb
from ecgtwin.models import LATENT_SCALE, GaussianDiffusion
from ecgtwin.models import guided_model_fn
from ecgtwin.plot import plot_ecg_paper
from ecgtwin.data.signal import HR_PLAUSIBLE, heart_rate, project_limb_leads
from ecgtwin.text import split_statements
from ecgtwin.conditioning import load_conditioner
from ecgtwin.errors import UserError, MissingInput
from ecgtwin.weights import build_module


AGE_RANGE = (0.0, 120.0)


@dataclasses.dataclass
class Condition:
    """What a record shows or a twin should show: report text and patient information."""

    report: str
    hr: float | None = None
    age: float | None = None
    sex: str | None = None

    def validate(self) -> "Condition":
        if self.hr is not None and not HR_PLAUSIBLE[0] <= self.hr <= HR_PLAUSIBLE[1]:
            raise UserError(f"HR {self.hr:g} bpm is not a plausible heart rate ({HR_PLAUSIBLE[0]:g}-{HR_PLAUSIBLE[1]:g} bpm)")
        if self.age is not None and not AGE_RANGE[0] <= self.age <= AGE_RANGE[1]:
            raise UserError(f"age {self.age:g} is not plausible ({AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years)")
        if self.sex is not None and self.sex not in SEX_CODE:
            raise UserError(f"sex must be F or M, got {self.sex!r}")
        return self


@dataclasses.dataclass
class Reference:
    """A reference ECG in the model representation with the condition it shows."""

    signal: np.ndarray  # (12, n_samples) mV at the model rate
    fs: float
    condition: Condition
    source: str
    original: np.ndarray | None = None  # (12, n) as recorded, for the pictures
    original_fs: float | None = None


def edit_report(report: str, add: list[str] = (), swap: list[str] = (), remove: list[str] = ()) -> str:
    """Condition editing: the reference's statements with some added, swapped ('old=new') or removed."""
    statements = split_statements(report)
    lowered = [s.lower() for s in statements]
    for rule in swap:
        old, sep, new = rule.partition("=")
        if not sep or old.strip().lower() not in lowered:
            raise UserError(f"cannot swap {rule!r}: write OLD=NEW with OLD one of the reference's statements "
                             f"({'; '.join(statements) or 'none'})")
        statements[lowered.index(old.strip().lower())] = new.strip()
    for statement in remove:
        if statement.strip().lower() not in [s.lower() for s in statements]:
            raise UserError(f"cannot remove {statement!r}: not in the reference's report")
        statements = [s for s in statements if s.lower() != statement.strip().lower()]
    statements += [a.strip() for a in add if a.strip()]
    return ". ".join(statements)


def read_reference(path: str | Path, preprocess_config: PreprocessConfig, report: str | None = None) -> Reference:
    """Any WFDB record the readers understand (PTB-XL, Challenge .mat, MIMIC-IV-ECG, synthetic, plain)."""
    try:
        rec = load_12_lead(Path(path))
    except RecordError as error:
        raise UserError(f"{path}: cannot use as reference: {error.reason}: {error}") from error
    fields = header_fields(rec.comments)
    record = Record(record_id=Path(path).name, signal=rec.signal, fs=rec.fs, patient_id="reference", source=str(path))
    try:
        signal, _ = preprocess(record, preprocess_config)
    except RecordError as error:
        raise UserError(f"{path}: cannot use as reference: {error.reason}: {error}") from error
    window = rec.signal[:, : int(preprocess_config.duration_s * rec.fs)]
    condition = Condition(report=report if report is not None else fields.get("report", fields.get("dx", "")),
                          hr=heart_rate(window, rec.fs), age=parse_age(fields.get("age")),
                          sex=parse_sex(fields.get("sex")))
    if condition.hr is not None and not np.isfinite(condition.hr):
        condition.hr = None
    return Reference(signal, preprocess_config.fs, condition, str(path), window, rec.fs)


class TwinGenerator:
    """The three trained models of a checkpoint, ready to generate twins."""

    def __init__(self, checkpoint_dir: str | Path, device: torch.device | str = "cpu", precision: str | None = None,
                 compile: bool | None = None) -> None:
        """`precision` (fp32 | bf16) and `compile` override the checkpoint config's `compute` section for the
        denoiser's forward passes; the samplers' arithmetic and the VAE decoder stay in fp32."""
        self.checkpoint = Checkpoint(checkpoint_dir)
        if not self.checkpoint.path.is_dir():
            raise MissingInput(f"{self.checkpoint.path}: checkpoint folder does not exist")
        self.checkpoint.require(*STAGES)
        self.config = self.checkpoint.config()
        model = self.config.model
        self.device = torch.device(device)
        self.vae, self.ibe, self.denoiser = (
            self._frozen(self.checkpoint.load_weights(s, build_module(s, self.config))) for s in STAGES)
        use_tf32(self.device, self.config.compute.tf32)
        self.precision = check_precision(self.config.compute.precision if precision is None else precision)
        compile_module(self.denoiser, self.config.compute.compile if compile is None else compile)
        self.diffusion = GaussianDiffusion(model.diffusion)
        self.conditioner = load_conditioner(self.config, self.checkpoint.path)
        self.preprocess = PreprocessConfig(n_samples=self.config.data.n_samples, duration_s=self.config.data.duration_s)

    def _frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device).eval().requires_grad_(False)

    def _denoise(self, *args, **kwargs) -> torch.Tensor:
        """The denoiser's eps in fp32, its forward in the generator's precision."""
        with autocast(self.device, self.precision):
            return self.denoiser(*args, **kwargs).float()

    def _tokens(self, conditions: list[Condition], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens of each condition repeated n times, in order."""
        rows = [c for c in conditions for _ in range(n)]
        missing = lambda v: np.nan if v is None else v  # noqa: E731
        built = self.conditioner.build([c.report for c in rows], np.array([missing(c.hr) for c in rows], float),
                                       np.array([missing(c.age) for c in rows], float), [c.sex for c in rows])
        tokens, mask = built.tokens()
        return tokens.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def base_vector(self, reference: Reference) -> torch.Tensor:
        """The person: the IBE's base vector of the reference ECG, its own condition subtracted."""
        x = torch.tensor(np.array(reference.signal[None]), dtype=torch.float32, device=self.device)
        latent = self.vae.encode(x)[0] * LATENT_SCALE
        return self.ibe(latent, *self._tokens([reference.condition], 1))

    @torch.no_grad()
    def base_vectors(self, signals: np.ndarray, conditions: list[Condition], batch_size: int = 128) -> np.ndarray:
        """`base_vector` of many ECGs (n, 12, n_samples), each under its own condition: (n, base_dim)."""
        out = []
        for i in range(0, len(signals), batch_size):
            x = torch.tensor(np.asarray(signals[i:i + batch_size]), dtype=torch.float32, device=self.device)
            latent = self.vae.encode(x)[0] * LATENT_SCALE
            out.append(self.ibe(latent, *self._tokens(list(conditions[i:i + batch_size]), 1)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.model.ibe.base_dim), np.float32)

    @torch.no_grad()
    def generate(self, reference: Reference, target: Condition, n: int = 1, sampler: str | None = None,
                 steps: int | None = None, guidance_condition: float | None = None,
                 guidance_person: float | None = None, seed: int = 0, progress: bool = False) -> np.ndarray:
        """n twins of the reference's person under `target`: (n, 12, n_samples) mV at the model rate."""
        return self.generate_many(reference, [target], n, sampler, steps, guidance_condition, guidance_person,
                                  seed, progress)

    @torch.no_grad()
    def generate_many(self, reference: Reference, targets: list[Condition], n: int = 1, sampler: str | None = None,
                      steps: int | None = None, guidance_condition: float | None = None,
                      guidance_person: float | None = None, seed: int = 0, progress: bool = False) -> np.ndarray:
        """n twins of the reference's person under each target, in one batch: (len(targets) * n, 12,
        n_samples), the twins of targets[0] first."""
        for target in targets:
            target.validate()
        settings = self.config.generate
        base = self.base_vector(reference).expand(len(targets) * n, -1)
        tokens, mask = self._tokens(targets, n)
        model_fn = guided_model_fn(self._denoise, base, tokens, mask,
                                   settings.guidance_person if guidance_person is None else guidance_person,
                                   settings.guidance_condition if guidance_condition is None else guidance_condition)
        shape = (len(targets) * n, self.config.model.dit.latent_channels, self.config.model.dit.n_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        latents = self.diffusion.sample(model_fn, shape, sampler=sampler or settings.sampler,
                                        steps=steps or settings.steps, generator=generator, device=self.device,
                                        progress=progress)
        return self.decode(latents)

    @torch.no_grad()
    def generate_batch(self, requests: list[tuple[Reference, Condition]], n: int = 1, batch_size: int = 64,
                       sampler: str | None = None, steps: int | None = None,
                       guidance_condition: float | None = None, guidance_person: float | None = None,
                       seed: int = 0) -> list[np.ndarray]:
        """n twins for each (reference, target) request, as many requests per sampling batch as fit in
        `batch_size` rows (guidance doubles or triples a batch inside the model function). Returns one
        (n, 12, n_samples) array per request. A batch's noise is drawn from `seed` + the index of its
        first request, so with one request per batch this is `generate(..., seed=seed + k)`."""
        for _, target in requests:
            target.validate()
        settings = self.config.generate
        bases: dict[int, torch.Tensor] = {}
        for reference, _ in requests:  # each person's base vector once, however many targets
            if id(reference) not in bases:
                bases[id(reference)] = self.base_vector(reference)
        per_batch = max(1, batch_size // max(1, n))
        out: list[np.ndarray] = []
        for start in range(0, len(requests), per_batch):
            chunk = requests[start:start + per_batch]
            base = torch.cat([bases[id(reference)].expand(n, -1) for reference, _ in chunk])
            tokens, mask = self._tokens([target for _, target in chunk], n)
            model_fn = guided_model_fn(self._denoise, base, tokens, mask,
                                       settings.guidance_person if guidance_person is None else guidance_person,
                                       settings.guidance_condition if guidance_condition is None else guidance_condition)
            shape = (len(chunk) * n, self.config.model.dit.latent_channels, self.config.model.dit.n_tokens)
            generator = torch.Generator(device=self.device).manual_seed(seed + start)
            latents = self.diffusion.sample(model_fn, shape, sampler=sampler or settings.sampler,
                                            steps=steps or settings.steps, generator=generator, device=self.device)
            twins = self.decode(latents)
            out += [twins[k * n:(k + 1) * n] for k in range(len(chunk))]
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> (n, 12, n_samples) mV signals, limb leads derived unless the config says raw."""
        twins = self.vae.decode(latents / LATENT_SCALE).cpu().numpy()
        return project_limb_leads(twins) if self.config.generate.limb_leads == "derived" else twins


def to_rate(signals: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Resample (n, 12, L) twins from the model rate to an output rate over the same duration."""
    n_out = int(round(signals.shape[-1] * fs_out / fs_in))
    return sps.resample_poly(signals, n_out, signals.shape[-1], axis=-1)


def write_twins(out: str | Path, twins: np.ndarray, fs_model: float, reference: Reference, target: Condition,
                out_fs: float = 500.0, prefix: str = "twin", notes: list[str] = ()) -> list[dict]:
    """Write twins as WFDB records at `out_fs` (mV, standard lead names, the condition in the header)
    and a PNG on ECG paper with the reference beside the first twins. Returns one row per twin."""
    out = Path(out)
    resampled = to_rate(twins, fs_model, out_fs)
    rows = []
    for i, twin in enumerate(resampled):
        name = f"{prefix}_{i:03d}"
        comments = [f"Report: {target.report}", f"Twin of: {reference.source}",
                    *(f"{key}: {value}" for key, value in (("HR", target.hr), ("Age", target.age), ("Sex", target.sex))
                      if value is not None), *notes]
        write_wfdb(out, name, twin, out_fs, comments)
        rows.append({"record": name, "report": target.report, "hr_requested": target.hr,
                     "hr_measured": round(heart_rate(twin, out_fs), 1)})
    panels = [(f"reference: {reference.condition.report[:60]}", reference.original, reference.original_fs)]
    panels += [(f"{prefix}_{i:03d}: {target.report[:60]}", resampled[i], out_fs) for i in range(min(3, len(resampled)))]
    plot_ecg_paper(panels, out / f"{prefix}.png")
    return rows


def reference_from_store(store: SiteStore, row: int) -> Reference:
    """A record of a site store as a reference, with the condition it was recorded under."""
    record = store.records.iloc[row]
    hr = float(conditioning_hr(store.records.iloc[[row]])[0])
    age = float(pd.to_numeric(pd.Series([record["age"]]), errors="coerce").iloc[0])
    own = Condition(report_text(record), None if np.isnan(hr) else hr, None if np.isnan(age) else age,
                    record["sex"] if record["sex"] in SEX_CODE else None)
    signal = np.asarray(store.signals[row])
    return Reference(signal, store.fs, own, record["record_id"], signal, store.fs)


def generate_cohort(checkpoint_dir: str | Path, store_path: str | Path, reports: list[str], out: str | Path,
                    patients: int = 10, n: int = 2, steps: int | None = None,
                    guidance_condition: float | None = None, seed: int = 0, progress: bool = True,
                    device: torch.device | str = "cpu", batch_size: int = 64, precision: str | None = None,
                    compile: bool | None = None, guidance_person: float | None = None) -> dict:
    """Twins of the first `patients` patients of a store (earliest ECG as reference) under each report,
    sampled `batch_size` twins at a time across patients and reports."""
    generator = TwinGenerator(checkpoint_dir, device=device, precision=precision, compile=compile)
    store = SiteStore(store_path)
    out = Path(out)
    chosen = store.patients[:patients]
    references = {p: reference_from_store(store, int(store.records_of(p)[0])) for p in chosen}
    arms = [(p, r_index, Condition(report, references[p].condition.hr, references[p].condition.age,
                                   references[p].condition.sex))
            for p in chosen for r_index, report in enumerate(reports)]
    per_batch = max(1, batch_size // max(1, n))
    rows = []
    bar = tqdm(total=len(arms), desc="cohort", unit="arm", disable=not progress, file=sys.stderr)
    for start in range(0, len(arms), per_batch):
        chunk = arms[start:start + per_batch]
        twins = generator.generate_batch([(references[p], target) for p, _, target in chunk], n=n,
                                         batch_size=batch_size, steps=steps, guidance_condition=guidance_condition,
                                         guidance_person=guidance_person, seed=seed + start)
        for (patient, r_index, target), arm in zip(chunk, twins):
            written = write_twins(out / _safe(patient), arm, generator.preprocess.fs, references[patient], target,
                                  out_fs=generator.config.generate.out_fs, prefix=f"arm{r_index}")
            rows += [{"patient_id": patient, "reference": references[patient].source, **w} for w in written]
            bar.update(1)
    bar.close()
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "cohort.csv", index=False)
    return {"out": str(out), "patients": len(chosen), "reports": len(reports), "twins": len(table),
            "hr_mae_bpm": round(float((table.hr_measured - table.hr_requested).abs().mean()), 2) if len(table) else None}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))
