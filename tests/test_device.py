"""Where commands compute: --device auto|cpu|cuda[:N] resolved in one place, and a training step, a DP step
and a generation through the device path (on CUDA where the machine has it, else on the CPU)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ecgtwin.config import load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.device import resolve_device
from ecgtwin.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 256


def test_auto_takes_cuda_when_present_and_bad_devices_are_one_line():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:99"):
        with pytest.raises(UserError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    synthesize_consortium(root / "raw", sites=1, patients_per_site=6, records_per_patient=2, seed=5)
    prepare_store("synthetic", root / "raw" / "site_a", root / "store", config=PreprocessConfig(n_samples=N_SAMPLES),
                  progress=False)
    config = load_config(ROOT / "configs" / "demo.yaml")
    config.data.n_samples = N_SAMPLES
    config.model.vae.base_channels = 8
    for model in (config.model.ibe, config.model.dit):
        model.n_tokens, model.width, model.depth, model.heads, model.base_dim = N_SAMPLES // 8, 32, 1, 2, 32
    config.vae.steps, config.ibe.steps, config.twin.steps = 2, 2, 2
    config.ibe.batch_size = config.twin.batch_size = 4
    return root, config


def test_a_training_step_a_dp_step_and_a_generation_run_through_the_device_path(tiny):
    from ecgtwin.privacy import Ledger, PrivacyPolicy
    from ecgtwin.privacy.policy import StagePlan, StagePlans
    from ecgtwin.train.centralised import train_stage
    from ecgtwin.train.private import private_pass
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store

    root, config = tiny
    device = resolve_device("auto")
    for stage in ("vae", "ibe", "twin"):
        summary = train_stage(stage, config, root / "store", root / "ckpt", progress=False, device=device)
        assert np.isfinite(summary["final_loss"])
    generator = TwinGenerator(root / "ckpt", device=device)
    assert all(p.device.type == device.type for p in generator.denoiser.parameters())
    store = SiteStore(root / "store")
    reference = reference_from_store(store, 0)
    twins = generator.generate(reference, Condition("Sinus rhythm.", 70.0, 50.0, "F"), n=2, seed=0)
    assert twins.shape == (2, 12, N_SAMPLES) and np.isfinite(twins).all()
    plans = StagePlans(**{s: StagePlan(rounds=1, local_steps=2, batch_patients=3, noise_multiplier=1.0)
                          for s in ("vae", "ibe", "twin")})
    policy = PrivacyPolicy(site="device", epsilon=50.0, delta=1e-3, population=6, stages=plans)
    weights = {s: generator.checkpoint.load_arrays(s) for s in ("vae", "ibe", "twin")}
    result = private_pass("twin", config, store, weights, policy, Ledger(root / "ledger.jsonl"), device=device)
    assert result.summary["steps"] == 2 and all(np.isfinite(v).all() for v in result.weights.values())


def test_every_computing_command_takes_device():
    for command in ("train", "pretrain", "generate", "cohort", "evaluate"):
        shown = subprocess.run([str(Path(sys.executable).parent / "ecgtwin"), command, "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout
        assert "--device" in shown, command


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device on this machine: the GPU smoke test runs where one is (bench/gpu.sh)")
def test_gpu_smoke_a_dp_twin_step_keeps_its_noise_on_the_gpu(tiny):
    from ecgtwin.train.randomness import PatientRandomness

    generator = PatientRandomness.from_seed(1, "smoke").pass_generator(torch.device("cuda"))
    assert generator.device.type == "cuda"
    test_a_training_step_a_dp_step_and_a_generation_run_through_the_device_path(tiny)
