"""bench.dp_signal: the per-step signal of a DP step, measured from per-patient gradients."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench.dp_signal import clip_rows, patient_gradients, signal, snr  # noqa: E402
from ecgtwin.train.private import PrivateStage  # noqa: E402


def test_the_signal_estimate_removes_the_finite_sample_bias():
    """Vectors mu + noise with |mu| = 0.1 and tr Sigma = 1: the naive norm of their mean is biased upward by
    tr Sigma / P; the estimate is not."""
    rng = np.random.default_rng(0)
    d, p = 400, 256
    mu = np.zeros(d)
    mu[0] = 0.1
    grads = mu + rng.normal(scale=1 / math.sqrt(d), size=(p, d))
    naive = float(np.linalg.norm(grads.mean(0)))
    measured = signal(grads, 1.0)
    assert naive > 0.1 + 0.01  # sqrt(0.01 + 1/256) ~ 0.118
    assert abs(measured["signal_norm"] - 0.1) < 0.006
    assert abs(measured["trace_sigma"] - 1.0) < 0.1


def test_clipped_gradients_are_each_patients_own_gradient_clipped_to_c():
    """A linear model with a squared loss per patient: the gradient of patient i is 2 (w x_i - y_i) x_i, known in
    closed form; a large one is scaled down to norm C, a small one is left as it is."""
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.1, 0.1]])
    y = torch.tensor([0.0, 0.0, 0.0])
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 1.0]]))

    def unit_loss(picks, step):
        index = torch.tensor([int(items[0]) for _, items in picks])
        return ((module(x[index]).squeeze(1) - y[index]) ** 2), index

    stage = PrivateStage(module, [(f"p{i}", np.array([i])) for i in range(3)], unit_loss, one_row_per_unit=True)
    raw = patient_gradients(stage, 3)
    exact = np.stack([2 * float(x[i].sum()) * x[i].numpy() for i in range(3)])
    assert np.allclose(raw, exact, rtol=1e-6)
    grads = clip_rows(raw, 1.0)
    assert np.allclose(grads[0], exact[0] / np.linalg.norm(exact[0]), rtol=1e-6)  # 2.0 -> 1.0
    assert np.allclose(grads[2], exact[2], rtol=1e-6)  # norm 0.057: not clipped
    assert np.allclose(np.linalg.norm(grads, axis=1), [1.0, 1.0, np.linalg.norm(exact[2])], rtol=1e-6)


def test_dp_noise_lowers_the_signal_to_noise_ratio_by_its_norm_over_the_trainable_coordinates():
    measured = {"signal_norm": 0.2, "trace_sigma": 0.32, "max_grad_norm": 0.5}
    assert math.isclose(snr(measured, 100, None, 32), 0.2 / 0.1)  # sampling noise only: sqrt(0.32 / 32)
    plan = {"noise_on_mean": 0.02, "batch_patients": 32}  # sigma / E: the noise norm is 0.02 * 0.5 * sqrt(100)
    assert math.isclose(snr(measured, 100, plan, 32), 0.2 / math.sqrt(0.1 ** 2 + 0.1 ** 2))
