"""Importing ecgtwin changes nothing global; library code leaves the caller's random state alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, pkgutil, sys
import matplotlib
import torch
backend_before = matplotlib.rcParams._get_backend_or_none()
rng_before = torch.random.get_rng_state().clone()
import ecgtwin
for m in pkgutil.walk_packages(ecgtwin.__path__, "ecgtwin."):
    importlib.import_module(m.name)
assert "matplotlib.pyplot" not in sys.modules, "an ecgtwin module imported pyplot"
assert matplotlib.rcParams._get_backend_or_none() == backend_before, "an ecgtwin module selected a backend"
assert torch.equal(torch.random.get_rng_state(), rng_before), "importing ecgtwin drew from the global RNG"

# library calls that make seeded weights, pictures and a local pass leave the global RNG alone
import tempfile
from pathlib import Path
import numpy as np
from ecgtwin.config import load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.plot import plot_ecg_paper
from ecgtwin.train.local import local_pass
from ecgtwin.weights import build_module, initial_weights

config = load_config(sys.argv[1])
config.model.vae.base_channels = 8
a = build_module("vae", config, seed=5).state_dict()
b = build_module("vae", config, seed=5).state_dict()
assert all(torch.equal(a[k], b[k]) for k in a), "a seeded build is not reproducible"
initial_weights("twin", config)
with tempfile.TemporaryDirectory() as tmp:
    plot_ecg_paper([("x", np.zeros((12, 1024)), 102.4)], Path(tmp) / "x.png")
assert "matplotlib.pyplot" not in sys.modules, "plotting imported pyplot"
# (NeuroKit2, which prepare_store uses for R peaks, imports pyplot itself: checked before it loads)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    synthesize_consortium(tmp / "raw", sites=1, patients_per_site=4, records_per_patient=2, seed=2, fs=250.0,
                          progress=False)
    prepare_store("synthetic", tmp / "raw", tmp / "store", on_reject=lambda r: None, progress=False)
    store = SiteStore(tmp / "store")
    local_pass("vae", config, store, {}, steps=2)
assert torch.equal(torch.random.get_rng_state(), rng_before), "library code drew from the global RNG"
print("clean")
"""


def test_imports_and_library_calls_have_no_global_side_effects(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "configs" / "demo.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("clean"), done.stderr[-3000:]
