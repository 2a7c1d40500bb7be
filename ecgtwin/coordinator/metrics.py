"""The run's metrics: one line per round (what each site reported, who refused and why, who failed), and
its plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ecgtwin.checkpoint import atomic_write
from ecgtwin.config import STAGES
from ecgtwin.coordinator.status import json_default, now


def round_entry(stage: str, round: int, replies: list[dict], refused: dict[str, str], failed: list[str],
                seconds: float, strategy: str) -> dict:
    """One metrics line. `replies`: per accepted site {"site", "node_id", allowlisted metrics...}."""
    total = sum(r.get("num-examples", 0) for r in replies) or 1
    losses = [(r["loss"], r.get("num-examples", 0)) for r in replies if _finite(r.get("loss"))]
    mean_loss = sum(l * n for l, n in losses) / (sum(n for _, n in losses) or 1) if losses else None
    return {"time": now(), "stage": stage, "round": round, "strategy": strategy, "seconds": round_(seconds),
            "sites": {r["site"]: {k: v for k, v in r.items() if k != "site"} for r in replies},
            "refused": refused, "failed": failed, "patients": int(total) if replies else 0, "loss": mean_loss,
            # a site that reports no epsilon trained without DP: every summary says so
            "not_private": sorted(r["site"] for r in replies if "epsilon" not in r)}


def write_metrics(out: str | Path, history: list[dict]) -> None:
    """metrics.jsonl (rewritten from the checkpoint's history, so it never holds a round twice) and the plot."""
    out = Path(out)
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(e, default=json_default) + "\n" for e in history).encode())
    plot_metrics(history, out / "metrics.png")


def plot_metrics(history: list[dict], png: str | Path) -> Path | None:
    """Top: each stage's training loss per site over its rounds (one panel per stage, the losses of the
    stages differ in scale). Bottom: epsilon spent per site over all rounds (stage boundaries marked)."""
    if not history:
        return None
    from matplotlib.ticker import MaxNLocator

    from ecgtwin.plot import new_figure

    stages = [s for s in STAGES if any(e["stage"] == s for e in history)]
    sites = sorted({s for e in history for s in e["sites"]} | {s for e in history for s in e["refused"]})
    fig = new_figure(figsize=(3.2 * max(2, len(stages)), 6))
    grid = fig.add_gridspec(2, len(stages))
    for col, stage in enumerate(stages):
        ax = fig.add_subplot(grid[0, col])
        entries = [e for e in history if e["stage"] == stage]
        for site in sites:
            points = [(e["round"], e["sites"][site].get("loss")) for e in entries if site in e["sites"]]
            points = [(x, y) for x, y in points if _finite(y)]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=site)
        ax.set_title(f"{stage}: training loss", fontsize=9)
        ax.set_xlabel("round")
        rounds = sorted({e["round"] for e in entries})
        ax.set_xticks(rounds if len(rounds) <= 12 else rounds[:: max(1, len(rounds) // 10)])
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if col == 0 and ax.lines:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    for site in sites:
        points = [(x, e["sites"][site].get("epsilon")) for x, e in enumerate(history, 1) if site in e["sites"]]
        points = [(x, y) for x, y in points if _finite(y)]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=site)
    previous = None
    for x, e in enumerate(history, 1):
        if e["stage"] != previous:
            ax.axvline(x - 0.5, color="grey", lw=0.6, ls="--")
            ax.text(x - 0.45, 0.02, e["stage"], transform=ax.get_xaxis_transform(), fontsize=8)
            previous = e["stage"]
        for site in e["refused"]:
            ax.annotate("refused", (x, 0.95), xycoords=("data", "axes fraction"), fontsize=7, color="red",
                        ha="center")
    ax.set_ylabel("epsilon spent")
    ax.set_xlabel("round (all stages)")
    ax.set_xlim(0.4, len(history) + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    return png


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def round_(x: float) -> float:
    return float(np.round(x, 2))
