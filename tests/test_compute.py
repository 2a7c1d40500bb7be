"""How the passes compute: bf16 autocast of the forward passes with DP clipping, noise and accounting kept
in fp32; the fused optimiser; torch.compile behind a flag; the config and command-line switches."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgtwin.compute import adamw, autocast, compile_module
from ecgtwin.config import ConfigError, load_config
from ecgtwin.errors import UserError

from test_device import N_SAMPLES, tiny  # noqa: F401  (the tiny store and config fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_bf16_autocasts_the_matmuls_and_fp32_leaves_them_alone():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with autocast("cpu", "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(UserError, match="precision 'fp16'"):
        autocast("cpu", "fp16")


def test_a_config_names_a_bad_precision(tmp_path):
    text = (ROOT / "configs" / "demo.yaml").read_text() + "compute:\n  precision: fp16\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"c\.yaml: compute\.precision: must be one of bf16, fp32"):
        load_config(tmp_path / "c.yaml")


def test_the_optimizer_is_fused_on_cuda_only_and_steps_like_the_default():
    p1, p2 = (torch.nn.Parameter(torch.ones(5)) for _ in range(2))
    fused, plain = adamw([p1], 0.1, 0.0, "cpu"), torch.optim.AdamW([p2], lr=0.1, weight_decay=0.0)
    assert not fused.defaults.get("fused")
    for p, opt in ((p1, fused), (p2, plain)):
        p.grad = torch.arange(5.0)
        opt.step()
    assert torch.equal(p1, p2)
    if torch.cuda.is_available():
        assert adamw([torch.nn.Parameter(torch.ones(2, device="cuda"))], 0.1, 0.0, "cuda").defaults["fused"]


def test_bf16_per_patient_gradients_are_summed_and_clipped_in_fp32():
    from ecgtwin.train.private import group_grad_samples

    p = torch.nn.Parameter(torch.zeros(3))
    rows = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [1 / 3, 0.0, 0.0]]).to(torch.bfloat16)
    p.grad_sample = rows
    group_grad_samples([p], torch.tensor([0, 0, 1]), 2)  # rows 0 and 1 are one patient's
    assert p.grad_sample.dtype == torch.float32
    assert torch.equal(p.grad_sample, torch.stack([rows[0].float() + rows[1].float(), rows[2].float()]))
    p.grad_sample = rows[:2]
    group_grad_samples([p], torch.tensor([0, 1]), 2)  # one row per patient: cast, not summed
    assert p.grad_sample.dtype == torch.float32


def _policy(mode: str = "auto"):
    from ecgtwin.privacy import PrivacyPolicy
    from ecgtwin.privacy.policy import StagePlan, StagePlans

    plans = StagePlans(**{s: StagePlan(rounds=1, local_steps=2, batch_patients=3, noise_multiplier=1.0)
                          for s in ("vae", "ibe", "twin")})
    return PrivacyPolicy(site="compute", epsilon=50.0, delta=1e-3, population=6, stages=plans, seed=3,
                         grad_sample_mode=mode)


def test_a_bf16_dp_pass_trains_under_the_same_noise_and_charge_as_fp32(tiny, tmp_path):  # noqa: F811
    from ecgtwin.data.store import SiteStore
    from ecgtwin.privacy import Ledger
    from ecgtwin.train.centralised import train_stage
    from ecgtwin.train.private import private_pass
    from ecgtwin.checkpoint import Checkpoint

    root, config = tiny
    for stage in ("vae", "ibe", "twin"):
        train_stage(stage, config, root / "store", tmp_path / "ckpt", progress=False)
    store = SiteStore(root / "store")
    weights = {s: Checkpoint(tmp_path / "ckpt").load_arrays(s) for s in ("vae", "ibe", "twin")}
    results = {}
    for precision in ("fp32", "bf16"):
        config.compute.precision = precision
        results[precision] = private_pass("twin", config, store, weights, _policy(),
                                          Ledger(tmp_path / f"{precision}.jsonl"))
    config.compute.precision = "fp32"
    fp32, bf16 = results["fp32"], results["bf16"]
    for key in ("noise_multiplier", "sample_rate", "max_grad_norm", "epsilon"):
        assert bf16.summary[key] == fp32.summary[key], key
    assert bf16.entry["epsilon"] == fp32.entry["epsilon"]
    for name, value in bf16.weights.items():
        assert value.dtype == np.float32 and np.isfinite(value).all(), name
    changed = [n for n in bf16.weights if not np.array_equal(bf16.weights[n], weights["twin"][n])]
    assert changed, "the bf16 pass trained nothing"
    # the same seed: the same patients, draws and noise, so the two passes differ by bf16 rounding only
    diff = max(float(np.abs(bf16.weights[n] - fp32.weights[n]).max()) for n in changed)
    step = max(float(np.abs(fp32.weights[n] - weights["twin"][n]).max()) for n in changed)
    assert diff < 0.5 * step


def test_ghost_clipping_refuses_bf16(tiny, tmp_path):  # noqa: F811
    from ecgtwin.data.store import SiteStore
    from ecgtwin.privacy import Ledger
    from ecgtwin.train.private import private_pass

    root, config = tiny
    config.compute.precision = "bf16"
    try:
        with pytest.raises(UserError, match="ghost .* use precision fp32"):
            private_pass("vae", config, SiteStore(root / "store"), {}, _policy("ghost"),
                         Ledger(tmp_path / "ledger.jsonl"))
    finally:
        config.compute.precision = "fp32"
    assert not (tmp_path / "ledger.jsonl").exists() or not (tmp_path / "ledger.jsonl").read_text().strip()


def test_bf16_and_compiled_generation_follow_the_fp32_twins(tiny, tmp_path):  # noqa: F811
    from ecgtwin.data.store import SiteStore
    from ecgtwin.train.centralised import train_stage
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store

    root, config = tiny
    for stage in ("vae", "ibe", "twin"):
        train_stage(stage, config, root / "store", tmp_path / "ckpt", progress=False)
    reference = reference_from_store(SiteStore(root / "store"), 0)
    target = Condition("Sinus rhythm.", 70.0, 50.0, "F")
    fp32 = TwinGenerator(tmp_path / "ckpt").generate(reference, target, n=2, seed=1, steps=5)
    seen = []
    bf16_gen = TwinGenerator(tmp_path / "ckpt", precision="bf16")
    bf16_gen.denoiser.final_layer.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    bf16 = bf16_gen.generate(reference, target, n=2, seed=1, steps=5)
    assert seen and set(seen) == {torch.bfloat16}  # the denoiser really ran in bf16
    assert bf16.dtype == fp32.dtype and np.isfinite(bf16).all()
    assert np.corrcoef(bf16.ravel(), fp32.ravel())[0, 1] > 0.9
    with pytest.raises(UserError, match="precision"):
        TwinGenerator(tmp_path / "ckpt", precision="int8")


def test_compile_keeps_the_weights_names_and_the_outputs():
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    names = list(module.state_dict())
    x = torch.randn(5, 4)
    eager = module(x)
    compile_module(module, True)
    assert list(module.state_dict()) == names  # checkpoints and replies keep their tensor names
    assert torch.allclose(module(x), eager, atol=1e-5)


def test_every_computing_command_takes_precision_and_compile():
    for command in ("train", "pretrain", "generate", "cohort", "evaluate"):
        shown = subprocess.run([str(Path(sys.executable).parent / "ecgtwin"), command, "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout
        assert "--precision" in shown and "--compile" in shown, command


def test_auto_takes_the_mode_measured_fastest_on_the_device_and_only_one_the_pass_can_use(tmp_path, monkeypatch):
    import json

    from ecgtwin.train import private

    table = {"cpu": {"fp32": {"twin": "functorch", "vae": "ghost"}, "bf16": {"vae": "ghost"}}}
    (tmp_path / "modes.json").write_text(json.dumps(table))
    monkeypatch.setattr(private, "MEASURED_MODES", tmp_path / "modes.json")
    one_row = private.PrivateStage(torch.nn.Linear(2, 2), [], None, one_row_per_unit=True)
    many_rows = private.PrivateStage(torch.nn.Linear(2, 2), [], None, one_row_per_unit=False)
    auto = _policy("auto")
    several = dataclasses.replace(auto, records_per_patient=3)
    assert private.resolved_mode("twin", one_row, auto) == "functorch"
    assert private.resolved_mode("vae", one_row, auto) == "ghost"
    assert private.resolved_mode("vae", many_rows, auto) == "hooks"  # ghost needs one forward row per patient
    assert private.resolved_mode("vae", one_row, several) == "hooks"
    assert private.resolved_mode("vae", one_row, auto, "bf16") == "hooks"  # ghost norms would be bf16
    assert private.resolved_mode("ibe", one_row, auto) == "hooks"  # nothing measured: hooks
    assert private.resolved_mode("twin", one_row, _policy("functorch")) == "functorch"  # a policy's own mode


def test_the_shipped_mode_table_names_only_real_modes():
    import json

    from ecgtwin.privacy.policy import GRAD_SAMPLE_MODES
    from ecgtwin.train.private import MEASURED_MODES

    table = json.loads(MEASURED_MODES.read_text())
    assert "cpu" in table
    for kind, entry in table.items():
        for precision, stages in entry.items():
            if precision == "provenance":
                continue
            assert precision in ("fp32", "bf16") and set(stages) <= {"vae", "ibe", "twin"}, (kind, precision)
            assert set(stages.values()) <= set(GRAD_SAMPLE_MODES) - {"auto"}, (kind, precision)
