"""Downstream: ECGTwin's personalised monitor, kept small and CPU-cheap.

A population classifier (a multilabel logistic head on the evaluation encoder's ECG features, trained
on the encoder patients' real ECGs) is fine-tuned per twin patient and tested on that patient's real
ECGs other than the reference (which the twins were made from). Three arms:

    none              the population classifier as it is
    personalised      fine-tuned on this patient's twins under a fixed panel of conditions
    non_personalised  fine-tuned on the same number of panel twins of OTHER patients (synthetic, same
                      conditions, not this person)

The panel is one representative report per condition code (the most frequent report among the encoder
records carrying that code, with their median HR), so the twins never see the test ECGs' own
reports. Predictions are pooled over patients; accuracy is exact-match (subset) accuracy, F1 is macro
over codes, AUROC is macro over codes with both classes among the test ECGs.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ecgtwin.conditioning import SEX_CODE, conditioning_hr, report_text
from ecgtwin.data.store import SiteStore
from ecgtwin.evaluate.encoder import EvaluationEncoder, multi_hot, record_codes


def condition_panel(store: SiteStore, rows: np.ndarray, codes: list[str]) -> list[dict]:
    """One target condition per code: the most frequent report among `rows` carrying the code."""
    records = store.records.iloc[rows]
    hr = conditioning_hr(records)
    panel, seen = [], set()
    for code in codes:
        mine = [i for i, labels in enumerate(records.labels) if code in record_codes(labels)]
        if not mine:
            continue
        reports = pd.Series([report_text(records.iloc[i]) for i in mine])
        report = reports.value_counts().index[0]
        if report in seen:
            continue
        seen.add(report)
        pick = [i for i, r in zip(mine, reports) if r == report]
        rate = float(np.nanmedian(hr[pick])) if np.isfinite(hr[pick]).any() else float("nan")
        panel.append({"code": code, "report": report, "hr": rate, "labels": records.labels.iloc[pick[0]]})
    return panel


@torch.no_grad()
def panel_twins(generator, reference, panel: list[dict], n: int, sampler: str | None, steps: int | None,
                guidance: float | None, seed: int) -> np.ndarray:
    """n twins of the reference's person under every panel condition, in one batch: (len(panel) * n, 12, L)."""
    from ecgtwin.twin import Condition

    own = reference.condition
    targets = [Condition(e["report"], hr=e["hr"] if np.isfinite(e["hr"]) else None, age=own.age, sex=own.sex)
               for e in panel]
    return generator.generate_many(reference, targets, n, sampler=sampler, steps=steps, guidance_condition=guidance,
                                   seed=seed)


def fit_head(x: np.ndarray, y: np.ndarray, init: tuple[torch.Tensor, torch.Tensor] | None = None,
             steps: int = 300, lr: float = 0.05, l2_to_init: float = 1e-2, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multilabel logistic regression by full-batch Adam; with `init`, fine-tunes from it with an L2 pull
    back to it (so a handful of twins adapts the population model instead of replacing it). Deterministic
    (zero or given initial weights, full batch); `seed` is kept for callers."""
    x_t, y_t = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    if init is None:
        w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
        b = torch.zeros(y.shape[1], requires_grad=True)
        anchor = None
    else:
        w, b = init[0].clone().requires_grad_(True), init[1].clone().requires_grad_(True)
        anchor = (init[0].clone(), init[1].clone())
    optimizer = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(x_t @ w + b, y_t)
        if anchor is not None:
            loss = loss + l2_to_init * (((w - anchor[0]) ** 2).sum() + ((b - anchor[1]) ** 2).sum())
        else:
            loss = loss + 1e-4 * (w ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return w.detach(), b.detach()


def predict(head: tuple[torch.Tensor, torch.Tensor], x: np.ndarray) -> np.ndarray:
    return torch.sigmoid(torch.as_tensor(x, dtype=torch.float32) @ head[0] + head[1]).numpy()


def classification_scores(y: np.ndarray, p: np.ndarray) -> dict:
    """accuracy (exact match), macro F1 over codes, macro AUROC over codes with both classes present."""
    from sklearn.metrics import f1_score, roc_auc_score

    y = np.asarray(y, int)
    pred = (p > 0.5).astype(int)
    aucs = [roc_auc_score(y[:, j], p[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return {"accuracy": float((pred == y).all(axis=1).mean()),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            "auroc": float(np.mean(aucs)) if aucs else None, "n_test": int(len(y))}


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / std


def run_downstream(generator, encoder: EvaluationEncoder, store: SiteStore, encoder_store: SiteStore,
                   encoder_rows: np.ndarray, patients: list[str], n_twins: int = 2, sampler: str | None = None,
                   steps: int | None = None, guidance: float | None = None, seed: int = 0,
                   progress: bool = False) -> dict:
    from ecgtwin.twin import reference_from_store

    codes = encoder.codes
    if not codes or len(encoder_rows) < 2:
        return {"skipped": "no condition codes or no encoder records to train a population classifier on"}
    panel = condition_panel(encoder_store, encoder_rows, codes)
    if not panel:
        return {"skipped": "no condition of the classifier is found among the encoder records"}
    x_pop = encoder.ecg_features(np.asarray(encoder_store.signals[encoder_rows]), store.fs)
    mean, std = x_pop.mean(0), x_pop.std(0) + 1e-6
    y_pop = multi_hot(encoder_store.records.labels.to_numpy()[encoder_rows], codes)
    population = fit_head(_standardise(x_pop, mean, std), y_pop, seed=seed)
    y_panel = multi_hot([e["labels"] for e in panel for _ in range(n_twins)], codes)

    feats, tests = {}, {}
    bar = tqdm(total=len(patients), desc="downstream twins", unit="patient", disable=not progress, file=sys.stderr)
    for i, patient in enumerate(patients):
        rows = store.records_of(patient)
        reference = reference_from_store(store, int(rows[0]))
        twins = panel_twins(generator, reference, panel, n_twins, sampler, steps, guidance, seed + 7919 * (i + 1))
        feats[patient] = _standardise(encoder.ecg_features(twins, store.fs), mean, std)
        tests[patient] = rows[1:]
        bar.update(1)
    bar.close()

    rng = np.random.default_rng(seed)
    preds: dict[str, list] = {"none": [], "personalised": [], "non_personalised": []}
    truth = []
    for patient in patients:
        x_test = _standardise(encoder.ecg_features(np.asarray(store.signals[tests[patient]]), store.fs), mean, std)
        truth.append(multi_hot(store.records.labels.to_numpy()[tests[patient]], codes))
        preds["none"].append(predict(population, x_test))
        own = fit_head(feats[patient], y_panel, init=population, seed=seed)
        preds["personalised"].append(predict(own, x_test))
        others = [p for p in patients if p != patient]
        # the same panel positions, each taken from a randomly chosen other patient
        pick = rng.integers(len(others), size=len(y_panel))
        x_other = np.stack([feats[others[k]][j] for j, k in enumerate(pick)])
        generic = fit_head(x_other, y_panel, init=population, seed=seed)
        preds["non_personalised"].append(predict(generic, x_test))
    y = np.concatenate(truth)
    out = {arm: classification_scores(y, np.concatenate(p)) for arm, p in preds.items()}
    out.update({"patients": len(patients), "panel": [{"code": e["code"], "report": e["report"]} for e in panel],
                "twins_per_condition": n_twins, "codes": codes})
    return out
