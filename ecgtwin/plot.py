"""12-lead ECGs on standard ECG paper: 25 mm/s, 10 mm/mV, 1 mm minor and 5 mm major grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ecgtwin.data.record import LEADS

MM_PER_S = 25.0
MM_PER_MV = 10.0
_LAYOUT = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]]
_ROW_MM = 30.0  # vertical space per row: +-1.5 mV


def new_figure(**kwargs) -> Figure:
    """A figure that is only ever saved to a file: no pyplot, no backend to select, no global state."""
    return Figure(**kwargs)


def plot_ecg_paper(panels: Sequence[tuple[str, np.ndarray, float]], path: str | Path, dpi: int = 150) -> Path:
    """Draw each (title, (12, n) mV signal, fs) as a 3x4 layout plus a lead II rhythm strip, side by side."""
    figures_mm = [_panel_width_mm(signal, fs) for _, signal, fs in panels]
    height_mm = _ROW_MM * 4 + 10
    fig = new_figure(figsize=(sum(figures_mm) / 25.4 + 0.3 * len(panels), height_mm / 25.4))
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": figures_mm})
    for ax, (title, signal, fs), width in zip(axes[0], panels, figures_mm):
        _draw_panel(ax, title, np.asarray(signal, dtype=float), fs, width, height_mm)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _panel_width_mm(signal: np.ndarray, fs: float) -> float:
    return signal.shape[1] / fs * MM_PER_S


def _draw_panel(ax: Axes, title: str, signal: np.ndarray, fs: float, width: float, height: float) -> None:
    _grid(ax, width, height)
    n = signal.shape[1]
    quarter = n // 4
    t_mm = np.arange(n) / fs * MM_PER_S
    for row, names in enumerate(_LAYOUT):
        baseline = height - (row + 1) * _ROW_MM
        for col, name in enumerate(names):
            part = slice(col * quarter, (col + 1) * quarter)
            ax.plot(t_mm[part], baseline + signal[LEADS.index(name), part] * MM_PER_MV, color="black", lw=0.6)
            ax.text(t_mm[part][0] + 1, baseline + 8, name, fontsize=7)
    strip = height - 4 * _ROW_MM
    ax.plot(t_mm, strip + signal[LEADS.index("II")] * MM_PER_MV, color="black", lw=0.6)
    ax.text(1, strip + 8, "II", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")


def _grid(ax: Axes, width: float, height: float) -> None:
    for x in np.arange(0, width + 0.01, 1.0):
        ax.axvline(x, color="#f4c6c6" if x % 5 else "#e08a8a", lw=0.3 if x % 5 else 0.6, zorder=0)
    for y in np.arange(0, height + 0.01, 1.0):
        ax.axhline(y, color="#f4c6c6" if y % 5 else "#e08a8a", lw=0.3 if y % 5 else 0.6, zorder=0)


def plot_loss_curve(jsonl: str | Path, png: str | Path, title: str = "") -> Path | None:
    """Training loss against step from a loss JSONL file (log scale when the loss stays positive)."""
    import json

    path = Path(jsonl)
    if not path.is_file():
        return None
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        return None
    steps = [e["step"] for e in entries]
    losses = [e["loss"] for e in entries]
    fig = new_figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, losses, lw=1.2)
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return Path(png)
