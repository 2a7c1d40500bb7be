"""`ecgtwin evaluate`: the whole protocol at one site, on its own data (docs/evaluation.md).

1. Patients: those the generator never trained on (held out in every stage's split of the checkpoint's
   config), split by a hash into ENCODER patients (train the evaluation encoder) and TWIN patients
   (get twins); both sets are real data held apart from the generator's training data. With
   `encoder_store`, the encoder trains on every patient of that other store instead and all held-out
   patients of `store` get twins.
2. Twins: for each twin patient, reference = earliest ECG, targets = their later ECGs (report, HR, age,
   sex); `twins_per_patient` twins cycle over the targets.
3. Metrics (ecgtwin.evaluate.metrics) on the encoder's features and on the signals; downstream
   (ecgtwin.evaluate.downstream); report (ecgtwin.evaluate.report).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ecgtwin.conditioning import SEX_CODE, conditioning_hr, report_text
from ecgtwin.data.record import LEADS
from ecgtwin.data.store import SiteStore
from ecgtwin.evaluate import metrics as M
from ecgtwin.evaluate.bootstrap import patient_bootstrap, rows_of
from ecgtwin.evaluate.encoder import EncoderConfig, EvaluationEncoder, encoder_key, multi_hot, train_encoder
from ecgtwin.evaluate.person_encoder import PersonEncoder, PersonEncoderConfig, get_person_encoder
from ecgtwin.data.split import split_patients
from ecgtwin.errors import UserError, MissingInput
from ecgtwin.models.diffusion import SAMPLERS

ENCODER_SPLIT_SEED = 6006  # the encoder/twin split of the held-out patients (independent of training splits)


@dataclasses.dataclass
class TwinSet:
    """Generated twins with what was asked of them."""

    signals: np.ndarray  # (n, 12, L)
    patients: np.ndarray  # (n,) patient id of each twin
    reference_rows: np.ndarray  # (n,) store row of the reference ECG
    target_rows: np.ndarray  # (n,) store row whose condition was requested (-1 for a panel twin)
    reports: list[str]
    hr: np.ndarray  # requested HR (NaN = none)
    labels: list[str]  # labels JSON of the requested condition


def held_out_patients(store: SiteStore, config) -> list[str]:
    """Patients held out of training (one split for every stage: the generator never saw them)."""
    _, held = split_patients(store.patients, config.data.held_out_fraction, config.data.split_seed)
    return held


def check_store_matches(store: SiteStore, config, what: str = "store") -> None:
    rep = store.manifest.get("representation", {})
    leads = tuple(rep.get("leads", LEADS))
    if leads != LEADS:
        raise UserError(f"{store.path}: {what} has leads {','.join(leads)}, the generator makes {','.join(LEADS)}")
    fs_model = config.data.n_samples / config.data.duration_s
    if abs(store.fs - fs_model) > 1e-6 * fs_model:
        raise UserError(f"{store.path}: {what} is sampled at {store.fs:g} Hz, the generator at {fs_model:g} Hz "
                         f"(prepare it with --samples {config.data.n_samples} --duration {config.data.duration_s:g})")
    if store.signals.shape[-1] != config.data.n_samples:
        raise UserError(f"{store.path}: {what} has {store.signals.shape[-1]} samples per record, "
                         f"the generator {config.data.n_samples}")
    if len(store) == 0:
        raise UserError(f"{store.path}: {what} is empty")


def choose_patients(store: SiteStore, config, encoder_fraction: float, encoder_store: SiteStore | None,
                    max_patients: int | None) -> tuple[list[str], list[str]]:
    held = held_out_patients(store, config)
    if not held:
        raise UserError(f"{store.path}: no patient is held out from the generator's training "
                         f"(held_out_fraction {config.data.held_out_fraction}); nothing fair to evaluate on")
    # Only a patient with two or more ECGs has a reference and a target; the others can still train the encoder.
    several = [p for p in held if len(store.records_of(p)) >= 2]
    if encoder_store is not None:
        enc, twin = [], several
    else:
        if not 0 < encoder_fraction < 1:
            raise UserError(f"encoder fraction must be in (0, 1), got {encoder_fraction}")
        twin, enc = split_patients(several, encoder_fraction, ENCODER_SPLIT_SEED)
        enc = sorted(set(enc) | (set(held) - set(several)), key=held.index)
    if max_patients is not None and max_patients < 2:
        raise UserError(f"at most {max_patients} twin patient(s): the metrics that compare patients need 2 or more")
    if max_patients is not None and len(twin) > max_patients:  # a seeded draw: a store lists its sites in turn
        keep = np.random.default_rng(ENCODER_SPLIT_SEED).choice(len(twin), size=max_patients, replace=False)
        twin = [twin[i] for i in sorted(keep)]
    if len(twin) < 2:
        raise UserError(f"{store.path}: only {len(twin)} held-out patient(s) with two or more ECGs to make twins of "
                         f"(of {len(held)} held out); need at least 2 (use a larger store or held_out_fraction)")
    return enc, twin


def generate_twins(generator, store: SiteStore, patients: list[str], twins_per_patient: int, sampler: str | None,
                   steps: int | None, guidance: float | None, seed: int, progress: bool,
                   guidance_person: float | None = None) -> TwinSet:
    from ecgtwin.twin import Condition, reference_from_store

    out: dict[str, list] = {k: [] for k in ("signals", "patients", "ref", "target", "reports", "hr", "labels")}
    records = store.records
    hrs = conditioning_hr(records)
    bar = tqdm(total=len(patients), desc="twins", unit="patient", disable=not progress, file=sys.stderr)
    for p_index, patient in enumerate(patients):
        rows = store.records_of(patient)
        reference = reference_from_store(store, int(rows[0]))
        targets = rows[1:]
        counts = np.bincount(np.arange(twins_per_patient) % len(targets), minlength=len(targets))
        for t_index, (row, n) in enumerate(zip(targets, counts)):
            if n == 0:
                continue
            rec = records.iloc[int(row)]
            age = pd.to_numeric(pd.Series([rec["age"]]), errors="coerce").iloc[0]
            hr = hrs[int(row)]
            condition = Condition(report_text(rec), None if np.isnan(hr) else float(hr),
                                  None if np.isnan(age) else float(age), rec["sex"] if rec["sex"] in SEX_CODE else None)
            twins = generator.generate(reference, condition, n=int(n), sampler=sampler, steps=steps,
                                       guidance_condition=guidance, guidance_person=guidance_person,
                                       seed=seed + 1000 * p_index + t_index)
            out["signals"].append(twins)
            out["patients"] += [patient] * int(n)
            out["ref"] += [int(rows[0])] * int(n)
            out["target"] += [int(row)] * int(n)
            out["reports"] += [condition.report] * int(n)
            out["hr"] += [hr] * int(n)
            out["labels"] += [rec["labels"]] * int(n)
        bar.update(1)
    bar.close()
    return TwinSet(np.concatenate(out["signals"]).astype(np.float32), np.array(out["patients"]), np.array(out["ref"]),
                   np.array(out["target"]), out["reports"], np.array(out["hr"], float), out["labels"])


def get_encoder(store: SiteStore, rows: np.ndarray, config: EncoderConfig, cache: Path, progress: bool,
                ) -> tuple[EvaluationEncoder, bool]:
    """The cached encoder when it was trained on exactly these records with these settings, else a new one."""
    key = encoder_key(store, rows, config)
    cached = EvaluationEncoder.load(cache, key)
    if cached is not None:
        return cached, True
    reports = [report_text(r) for _, r in store.records.iloc[rows].iterrows()]
    encoder = train_encoder(store, rows, config, reports, progress=progress, text_cache=cache / "text-cache")
    encoder.save(cache, key)
    return encoder, False


def run_evaluation(checkpoint: str | Path, store: str | Path, out: str | Path, twins_per_patient: int = 4,
                   sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                   guidance_person: float | None = None, encoder_steps: int | None = None, encoder_fraction: float = 0.5,
                   encoder_cache: str | Path | None = None, encoder_store: str | Path | None = None,
                   max_patients: int | None = None, downstream: bool = True, downstream_twins: int = 2,
                   report: bool = True, seed: int = 0, progress: bool = True,
                   device: torch.device | str = "cpu", precision: str | None = None,
                   compile: bool | None = None) -> dict:
    """Evaluate the generator in `checkpoint` on the held-out patients of `store`; writes OUT/metrics.json
    (and the report). Returns the metrics."""
    from ecgtwin.evaluate.downstream import run_downstream
    from ecgtwin.evaluate.report import write_report
    from ecgtwin.twin import TwinGenerator

    started = time.perf_counter()
    if twins_per_patient < 1:
        raise UserError("twins per patient must be at least 1")
    if sampler is not None and sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} ({', '.join(SAMPLERS)})")
    if steps is not None and steps < 1:
        raise UserError("steps must be at least 1")
    if not Path(checkpoint).is_dir():
        raise MissingInput(f"{checkpoint}: checkpoint folder does not exist")
    generator = TwinGenerator(checkpoint, device=device, precision=precision, compile=compile)  # refuses a checkpoint missing a stage
    config = generator.config
    site = SiteStore(store)
    check_store_matches(site, config)
    enc_site = SiteStore(encoder_store) if encoder_store is not None else None
    if enc_site is not None:
        check_store_matches(enc_site, config, "encoder store")
    enc_patients, twin_patients = choose_patients(site, config, encoder_fraction, enc_site, max_patients)
    enc_source = enc_site or site
    enc_rows = (np.arange(len(enc_site)) if enc_site is not None
                else np.sort(np.concatenate([site.records_of(p) for p in enc_patients])) if enc_patients
                else np.zeros(0, int))
    enc_config = EncoderConfig(text_model=config.text.encoder, seed=seed)
    if encoder_steps is not None:
        if encoder_steps < 1:
            raise UserError("encoder steps must be at least 1")
        enc_config.steps = encoder_steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder, cached = get_encoder(enc_source, enc_rows, enc_config, Path(encoder_cache or out / "encoder"), progress)

    twins = generate_twins(generator, site, twin_patients, twins_per_patient, sampler, steps, guidance, seed, progress,
                           guidance_person)
    fs = site.fs
    twin_set = M.SignalSet(twins.signals, fs, LEADS, "twins")
    real_rows = np.concatenate([site.records_of(p) for p in twin_patients])  # gallery: every real ECG of them
    target_rows = np.unique(twins.target_rows)
    real_set = M.SignalSet(np.asarray(site.signals[real_rows]), fs, LEADS, "real ECGs")
    target_set = M.SignalSet(np.asarray(site.signals[target_rows]), fs, LEADS, "real target ECGs")
    M.check_compatible(real_set, twin_set)

    f_twin = encoder.ecg_features(twin_set.signals, fs)
    f_real = encoder.ecg_features(real_set.signals, fs)
    f_target = encoder.ecg_features(target_set.signals, fs)
    real_patients = site.records.patient_id.to_numpy()[real_rows]

    result: dict = {"fid": M.fid(f_target, f_twin)}
    pr = M.precision_recall(f_target, f_twin, k=3)
    result.update({"precision": pr["precision"], "recall": pr["recall"], "f1": pr["f1"]})
    text_twin = encoder.text_features(twins.reports)
    result["clip_score"] = M.clip_score(f_twin, text_twin)
    result["clip_score_real"] = M.clip_score(
        f_target, encoder.text_features([report_text(site.records.iloc[int(r)]) for r in target_rows]))
    hr_twin = M.measured_hr(twin_set)
    hr = M.hr_mae(twins.hr, hr_twin)
    result["hr_mae"] = hr["hr_mae"]
    result["hr_measured_share"] = hr["hr_measured_share"]
    hr_real = M.measured_hr(target_set)
    result["hr_mae_real"] = M.hr_mae(conditioning_hr(site.records.iloc[target_rows]), hr_real)["hr_mae"]
    # what a twin that kept its reference's own rate would score: the bar for following the requested HR
    hr_reference = conditioning_hr(site.records.iloc[twins.reference_rows])
    result["hr_mae_keep_reference"] = M.hr_mae(twins.hr, hr_reference)["hr_mae"]

    codes = encoder.codes
    prob_twin = encoder.condition_probabilities(f_twin) if codes else None
    if codes:
        cond = M.condition_scores(multi_hot(twins.labels, codes), prob_twin, codes)
        real_cond = M.condition_scores(multi_hot(site.records.labels.to_numpy()[target_rows], codes),
                                       encoder.condition_probabilities(f_target), codes)
        for code, entry in cond["per_condition"].items():
            entry["recognised_in_real"] = real_cond["per_condition"][code]["recognised"]
        result.update({"condition_accuracy": cond["condition_accuracy"],
                       "condition_accuracy_real": real_cond["condition_accuracy"],
                       "condition_exact_match": cond["condition_exact_match"],
                       "per_condition": cond["per_condition"]})
    else:
        result.update({"condition_accuracy": None, "condition_accuracy_real": None, "per_condition": {}})

    result["similarity"] = M.similarity_score(f_twin, twins.patients, f_real, real_patients)
    result["silhouette"] = (M.silhouette(f_twin, twins.patients)
                            if 2 <= len(set(twins.patients)) <= len(f_twin) - 1 else None)
    ident = M.identification(f_twin, twins.patients, f_real, real_patients)
    result.update(ident)
    result.update(M.identification_real(f_real, real_patients))
    result.update(person_identification(generator, site, twins, real_rows, real_set.signals, real_patients))
    person = get_person_encoder(enc_source, enc_rows, PersonEncoderConfig(
        seed=seed, **({} if encoder_steps is None else {"steps": encoder_steps})),
        Path(encoder_cache or out / "encoder") / "person", progress)
    result.update(independent_identification(person, twin_set, real_set, twins.patients, real_patients))
    result["sanity"] = {"twins": M.sanity(twin_set, hr_twin), "real": M.sanity(target_set, hr_real)}
    result["vae_relative_error"] = vae_relative_error(generator, target_set.signals)
    target_patients = site.records.patient_id.to_numpy()[target_rows]
    result["intervals"] = headline_intervals(twins, f_twin, text_twin, prob_twin, codes, f_real, real_patients,
                                             f_target, target_patients, hr_twin, seed)

    result["downstream"] = (run_downstream(generator, encoder, site, enc_source, enc_rows, twin_patients,
                                           n_twins=downstream_twins, sampler=sampler, steps=steps,
                                           guidance=guidance, seed=seed, progress=progress)
                            if downstream else None)
    settings = config.generate
    result["setup"] = {
        "checkpoint": str(checkpoint), "store": str(store), "model": config.name,
        "injector": config.model.dit.injector,
        "sampler": sampler or settings.sampler, "steps": None if (sampler or settings.sampler) == "ddpm"
        else steps or settings.steps, "guidance": settings.guidance_condition if guidance is None else guidance,
        "guidance_person": settings.guidance_person if guidance_person is None else guidance_person,
        "held_out_patients": len(held_out_patients(site, config)), "twin_patients": len(twin_patients),
        "encoder_patients": int(enc_source.records.patient_id.iloc[enc_rows].nunique()) if len(enc_rows) else 0,
        "encoder_records": int(len(enc_rows)), "encoder_store": str(encoder_store) if encoder_store else None,
        "encoder_cached": cached, "encoder": encoder.info, "twins": int(len(twin_set.signals)),
        "twins_per_patient": twins_per_patient, "real_gallery": int(len(real_rows)),
        "real_targets": int(len(target_rows)), "seed": seed}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result = _jsonable(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if report:
        result["report"] = str(write_report(out, result, site, twins, f_twin, f_real, real_rows, encoder))
    return result


def person_identification(generator, site: SiteStore, twins: TwinSet, real_rows: np.ndarray, real: np.ndarray,
                          real_patients: np.ndarray) -> dict:
    """Identification in the generator's own person space: the IBE's base vector of each twin (under the
    condition it was asked for) against those of the real gallery (under their own), and the same leave
    one out for the real ECGs. Not independent of the generator, so a diagnostic beside the encoder's
    `identification_top1`: it says whether the person the twin was conditioned on survives sampling."""
    from ecgtwin.twin import reference_from_store

    condition = lambda row: reference_from_store(site, int(row)).condition  # noqa: E731  what was asked / shown
    b_twin = generator.base_vectors(twins.signals, [condition(r) for r in twins.target_rows])
    b_real = generator.base_vectors(real, [condition(r) for r in real_rows])
    ident = M.identification(b_twin, twins.patients, b_real, real_patients, ks=(1,))
    real_top1 = M.identification_real(b_real, real_patients)["identification_real_top1"]
    return {"identification_ibe_top1": ident["identification_top1"], "identification_ibe_real_top1": real_top1}


def independent_identification(person: PersonEncoder | None, twins: M.SignalSet, real: M.SignalSet,
                               twin_patients: np.ndarray, real_patients: np.ndarray) -> dict:
    """Identification by the person encoder (trained to tell patients apart, on other patients, independent
    of the generator): the twins' rate and the real ECGs' leave-one-out rate at the same gallery; None
    when the encoder's patients had too few repeated ECGs to train it."""
    if person is None:
        return {"identification_person_top1": None, "identification_person_real_top1": None}
    f_twin, f_real = person.features(twins.signals, twins.fs), person.features(real.signals, real.fs)
    return {"identification_person_top1": M.identification(f_twin, twin_patients, f_real, real_patients,
                                                           ks=(1,))["identification_top1"],
            "identification_person_real_top1": M.identification_real(f_real, real_patients)["identification_real_top1"],
            "person_encoder": person.info}


def vae_relative_error(generator, signals: np.ndarray) -> float:
    """|decode(encode(x)) - x|^2 / |x|^2 over real ECGs: how much of the twins' distance to real ECGs the
    VAE alone already costs (0 = perfect reconstruction, 1 = as far off as a flat line)."""
    import torch

    x = torch.tensor(np.asarray(signals), dtype=torch.float32, device=generator.device)
    with torch.no_grad():
        reconstruction = generator.vae.decode(generator.vae.encode(x)[0])
    return float(((reconstruction - x) ** 2).sum() / (x ** 2).sum())


def headline_intervals(twins: TwinSet, f_twin: np.ndarray, text: np.ndarray, probabilities: np.ndarray | None,
                       codes: list[str], f_real: np.ndarray, real_patients: np.ndarray, f_target: np.ndarray,
                       target_patients: np.ndarray, hr_twin: np.ndarray, seed: int) -> dict[str, list[float]]:
    """95 % patient-bootstrap intervals of FID, CLIP, HR MAE, condition accuracy, similarity, identification
    (from the features, probabilities and rates already computed for the point values)."""
    requested = multi_hot(twins.labels, codes) if codes else None
    first = M.identification_ranks(f_twin, twins.patients, f_real, real_patients) == 0  # once: the gallery stays whole

    def compute(sample: np.ndarray) -> dict[str, float]:
        t = rows_of(sample, twins.patients)  # the twins are the sample; the real gallery stays whole
        out = {"fid": M.fid(f_target[rows_of(sample, target_patients)], f_twin[t]),
               "clip_score": M.clip_score(f_twin[t], text[t]),
               "hr_mae": M.hr_mae(twins.hr[t], hr_twin[t])["hr_mae"],
               "similarity": M.similarity_score(f_twin[t], twins.patients[t], f_real, real_patients),
               "identification_top1": float(first[t].mean())}
        if requested is not None:
            out["condition_accuracy"] = M.condition_scores(requested[t], probabilities[t], codes)["condition_accuracy"]
        return out

    return patient_bootstrap(compute, twins.patients, seed=seed)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
