"""The evaluation report: OUT/report.html with PNG figures beside it (metrics.json is written by run).

    real_vs_twin_<k>.png   reference ECG, the real later ECG whose condition was requested, and its twin
    tsne_patient.png       t-SNE of the encoder features of real ECGs (dots) and twins (crosses), by patient
    tsne_condition.png     the same map coloured by condition (the first label code)
    report.html            headline metrics, the per-condition table, downstream arms, sanity, the figures
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from matplotlib import colormaps
import numpy as np

from ecgtwin.data.store import SiteStore
from ecgtwin.evaluate.encoder import record_codes
from ecgtwin.plot import new_figure, plot_ecg_paper

HEADLINE = ("fid", "precision", "recall", "f1", "clip_score", "clip_score_real", "hr_mae", "hr_mae_real",
            "condition_accuracy", "condition_accuracy_real", "similarity", "silhouette",
            "identification_top1", "identification_chance_top1", "identification_real_top1", "identification_top5",
            "identification_chance_top5", "identification_ibe_top1", "identification_ibe_real_top1")


def _primary(labels_json: str) -> str:
    codes = record_codes(labels_json)
    return codes[0] if codes else "none"


def tsne_map(features: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 4:
        return np.c_[np.arange(n), np.zeros(n)].astype(float)
    return TSNE(n_components=2, perplexity=max(1.0, min(30.0, (n - 1) / 3)), init="pca", random_state=seed,
                metric="cosine").fit_transform(features)


def _scatter(xy: np.ndarray, groups: np.ndarray, is_twin: np.ndarray, title: str, path: Path) -> Path:
    fig = new_figure(figsize=(6.5, 5))
    ax = fig.subplots()
    names = sorted(set(groups.tolist()))
    cmap = colormaps.get_cmap("tab20" if len(names) > 10 else "tab10")
    for i, name in enumerate(names):
        for twin, marker in ((False, "o"), (True, "x")):
            sel = (groups == name) & (is_twin == twin)
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], marker=marker, s=28, color=cmap(i % cmap.N),
                           label=f"{name}" if not twin else None, alpha=0.85)
    ax.set_title(f"{title}  (o real, x twin)", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    if len(names) <= 20:
        ax.legend(fontsize=6, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def write_report(out: str | Path, result: dict, store: SiteStore, twins, f_twin: np.ndarray, f_real: np.ndarray,
                 real_rows: np.ndarray, encoder, n_pictures: int = 3) -> Path:
    out = Path(out)
    fs = store.fs
    pictures = []
    for k, patient in enumerate(dict.fromkeys(twins.patients.tolist())):
        if k >= n_pictures:
            break
        i = int(np.flatnonzero(twins.patients == patient)[0])
        ref, target = int(twins.reference_rows[i]), int(twins.target_rows[i])
        panels = [(f"reference (real): {store.records.report.iloc[ref][:50]}", np.asarray(store.signals[ref]), fs),
                  (f"target (real): {store.records.report.iloc[target][:50]}", np.asarray(store.signals[target]), fs),
                  (f"twin: {twins.reports[i][:50]}", twins.signals[i], fs)]
        pictures.append(plot_ecg_paper(panels, out / f"real_vs_twin_{k}.png", dpi=80).name)

    features = np.concatenate([f_real, f_twin])
    is_twin = np.r_[np.zeros(len(f_real), bool), np.ones(len(f_twin), bool)]
    patients = np.r_[store.records.patient_id.to_numpy()[real_rows].astype(str), twins.patients.astype(str)]
    conditions = np.r_[[_primary(l) for l in store.records.labels.to_numpy()[real_rows]],
                       [_primary(l) for l in twins.labels]]
    xy = tsne_map(features)
    _scatter(xy, patients, is_twin, "t-SNE of encoder features by patient", out / "tsne_patient.png")
    _scatter(xy, conditions, is_twin, "t-SNE of encoder features by condition", out / "tsne_condition.png")

    rows = "".join(f"<tr><td>{k}</td><td>{_fmt(result.get(k))}</td></tr>" for k in HEADLINE if k in result)
    per = result.get("per_condition") or {}
    per_rows = "".join(
        f"<tr><td>{html.escape(code)}</td><td>{e['n']}</td><td>{_fmt(e['recognised'])}</td>"
        f"<td>{_fmt(e.get('recognised_in_real'))}</td><td>{_fmt(e['false_alarm'])}</td></tr>"
        for code, e in per.items())
    down = result.get("downstream") or {}
    down_rows = "".join(
        f"<tr><td>{arm}</td><td>{_fmt(down[arm]['accuracy'])}</td><td>{_fmt(down[arm]['macro_f1'])}</td>"
        f"<td>{_fmt(down[arm]['auroc'])}</td><td>{down[arm]['n_test']}</td></tr>"
        for arm in ("none", "personalised", "non_personalised") if arm in down)
    sanity = result.get("sanity", {})
    san_rows = "".join(
        f"<tr><td>{which}</td><td>{_fmt(s['amplitude_max_abs_mv']['median'])}</td>"
        f"<td>{_fmt(s['lead_ii_peak_to_peak_mv']['median'])}</td><td>{_fmt(s['share_implausible_amplitude'])}</td>"
        f"<td>{_fmt(s['einthoven_relative_residual']['median'])}</td><td>{_fmt(s['share_rhythm_detected'])}</td></tr>"
        for which, s in sanity.items())
    setup = html.escape(json.dumps(result.get("setup", {}), indent=1))
    figures = "".join(f'<p><img src="{p}" style="max-width:100%"></p>' for p in pictures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ecgtwin evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{border:1px solid #ccc;padding:3px 8px}}
table{{border-collapse:collapse;margin-bottom:1em}}</style></head><body>
<h1>ecgtwin evaluation</h1>
<p>Definitions and how to read them: docs/evaluation.md. "_real" rows are the same measurement on the real
later ECGs (a ceiling for the twins); chance rows are what a random guess would get.</p>
<h2>Headline metrics</h2><table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<h2>Per condition</h2><table><tr><th>code</th><th>twins asking for it</th><th>recognised in twins</th>
<th>recognised in real ECGs</th><th>false alarm in twins</th></tr>{per_rows}</table>
<h2>Downstream: personalised monitor</h2><table><tr><th>fine-tuning</th><th>accuracy</th><th>macro F1</th>
<th>AUROC</th><th>test ECGs</th></tr>{down_rows}</table>
<h2>Signal sanity</h2><table><tr><th>set</th><th>median max |x| (mV)</th><th>median II peak-to-peak (mV)</th>
<th>share |x| &gt; 5 mV</th><th>median Einthoven residual</th><th>share with rhythm</th></tr>{san_rows}</table>
<h2>Real vs twin</h2>{figures}
<h2>Feature space</h2><p><img src="tsne_patient.png"> <img src="tsne_condition.png"></p>
<h2>Setup</h2><pre>{setup}</pre></body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
