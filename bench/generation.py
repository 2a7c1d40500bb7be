"""Generation throughput and the quality cost of fewer sampling steps, on the synthetic consortium.

Trains the demo configuration briefly, then generates twins of held-out patients under four rhythm
conditions with DDPM-1000, DDIM and DPM-Solver++ at 25 and 50 steps, with and without guidance.
Quality: |requested - measured| HR (R peaks) and the rhythm recognised by a classifier trained on the
real synthetic records (not on twins).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from ecgtwin.config import STAGES, load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.signal import r_peaks
from ecgtwin.data.split import split_patients
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.train.centralised import train_stage
from ecgtwin.twin import Condition, Reference, TwinGenerator

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TARGETS = {"NSR": ("Sinus rhythm. Normal ECG.", 72.0), "SB": ("Sinus bradycardia", 50.0),
           "ST": ("Sinus tachycardia", 120.0), "AF": ("Atrial fibrillation", 100.0)}
SETTINGS = [("ddpm", 1000, 1.0), ("ddim", 50, 1.0), ("ddim", 25, 1.0), ("dpm++", 50, 1.0), ("dpm++", 25, 1.0),
            ("dpm++", 25, 2.0)]
REFERENCES = 6
TWINS_PER_ARM = 2


def rhythm_features(signal: np.ndarray, fs: float) -> np.ndarray:
    """HR, RR irregularity and lead II amplitude statistics: enough to tell NSR, SB, ST and AF apart."""
    peaks = r_peaks(signal[1], fs)
    rr = np.diff(peaks) / fs if len(peaks) > 2 else np.array([1.0, 1.0])
    return np.array([60 / rr.mean(), rr.std() / rr.mean(), np.abs(np.diff(rr)).mean(), signal[1].std(),
                     np.percentile(signal[1], 99) - np.percentile(signal[1], 1)])


def primary_rhythm(labels: dict) -> str | None:
    for code in ("AF", "ST", "SB", "NSR"):
        if code in labels:
            return code
    return None


def run(out: Path) -> dict:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize_consortium(tmp / "c", sites=3, patients_per_site=16, records_per_patient=3, seed=11)
        prepare_store("synthetic", tmp / "c", tmp / "s", on_reject=lambda r: None)
        config = load_config(CONFIG)
        started = time.perf_counter()
        for stage in STAGES:
            train_stage(stage, config, tmp / "s", tmp / "ckpt", progress=True)
        train_seconds = time.perf_counter() - started
        store = SiteStore(tmp / "s")
        fs = store.fs
        labels = [primary_rhythm(json.loads(l)) for l in store.records["labels"]]
        keep = [i for i, l in enumerate(labels) if l]
        features = np.stack([rhythm_features(np.asarray(store.signals[i]), fs) for i in keep])
        classifier = RandomForestClassifier(n_estimators=200, random_state=0).fit(features, [labels[i] for i in keep])
        _, held = split_patients(store.patients, config.data.held_out_fraction, config.data.split_seed)
        patients = (held + [p for p in store.patients if p not in held])[:REFERENCES]
        generator = TwinGenerator(tmp / "ckpt")
        results = {"train_seconds": round(train_seconds, 1), "references": len(patients),
                   "twins_per_setting": len(patients) * len(TARGETS) * TWINS_PER_ARM}
        for sampler, steps, guidance in SETTINGS:
            errors, correct, total, seconds = [], 0, 0, 0.0
            for p_index, patient in enumerate(patients):
                row = int(store.records_of(patient)[0])
                ref = Reference(np.asarray(store.signals[row]), fs, Condition(store.records.report[row]), patient)
                for code, (report, hr) in TARGETS.items():
                    start = time.perf_counter()
                    twins = generator.generate(ref, Condition(report, hr), n=TWINS_PER_ARM, sampler=sampler,
                                               steps=steps, guidance_condition=guidance, seed=p_index)
                    seconds += time.perf_counter() - start
                    for twin in twins:
                        f = rhythm_features(twin, fs)
                        errors.append(abs(f[0] - hr))
                        correct += classifier.predict(f[None])[0] == code
                        total += 1
            key = f"{sampler}_{steps}" + ("_guided" if guidance != 1.0 else "")
            results[key] = {"twins_per_s": round(total / seconds, 2), "hr_mae_bpm": round(float(np.median(errors)), 2),
                            "hr_mae_mean_bpm": round(float(np.mean(errors)), 2),
                            "rhythm_accuracy": round(correct / total, 3)}
            print(key, results[key], flush=True)
        base = results["ddpm_1000"]["twins_per_s"]
        for key, value in results.items():
            if isinstance(value, dict):
                value["speedup_vs_ddpm"] = round(value["twins_per_s"] / base, 1)
    return results
