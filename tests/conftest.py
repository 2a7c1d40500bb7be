"""Shared fixtures: where the real PhysioNet records are, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the explicit test-only switch that lets a private policy FILE fix its seed (ecgtwin.privacy.policy)
os.environ["ECGTWIN_ALLOW_TEST_SEED"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs the suite in 2 pytest-xdist workers (whole files each) on a 2-core machine: each
    worker, and every process it starts, computes with one thread, so that two torch thread pools never
    fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def shared_data_dir() -> Path:
    return Path(os.environ.get("ECGTWIN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def missing_data(reason: str) -> None:
    """Skip the test, or fail it where ECGTWIN_REQUIRE_DATA=1 (.ci/run): there the real records must be present."""
    if os.environ.get("ECGTWIN_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason}; ECGTWIN_REQUIRE_DATA=1 requires the real records (unset it to skip instead)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        missing_data(f"real PhysioNet records not found at {path} (set ECGTWIN_SHARED_DATA to their folder)")
    return path


@pytest.fixture(scope="session")
def ptbxl_root(shared_data: Path) -> Path:
    path = shared_data / "ptbxl"
    if not (path / "ptbxl_database.csv").is_file():
        missing_data(f"PTB-XL subset not found at {path}")
    return path


@pytest.fixture(scope="session")
def challenge_root(shared_data: Path) -> Path:
    path = shared_data / "cinc2021"
    if not path.is_dir():
        missing_data(f"Challenge 2021 records not found at {path}")
    return path


@pytest.fixture(scope="session")
def ptbdb_root(shared_data: Path) -> Path:
    path = shared_data / "ptbdb"
    if not path.is_dir():
        missing_data(f"PTB Diagnostic records not found at {path}")
    return path


TINY_SAMPLES = 256  # the tiny model's record length


def tiny_experiment():
    """The demo config shrunk to 256 samples a record and a tiny model: the federation and fault tests' model."""
    from ecgtwin.config import load_config

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.data.n_samples = TINY_SAMPLES
    config.model.vae.base_channels = 8
    for model in (config.model.ibe, config.model.dit):
        model.n_tokens, model.width, model.depth, model.heads, model.base_dim = TINY_SAMPLES // 8, 48, 1, 2, 32
    return config


@pytest.fixture(scope="module")
def one_thread():
    """Sites train with one thread each (as in the simulation engine): on a shared 2-core machine torch's
    thread pool makes a DP step 50x slower. Modules use it with pytest.mark.usefixtures."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def flower_identity():
    """Messages built outside a Flower runtime need a task identity (set by the runtime otherwise)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
