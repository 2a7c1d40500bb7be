"""Distributed DP through Flower's SecAgg+: each site adds sigma / sqrt(K), the server unmasks only the mean.

The sites run the real ClientApp (with Flower's secaggplus_mod) and the server the real SecAggPlusWorkflow, on
an in-process grid whose nodes keep their context across messages as a SuperNode does; the last test runs a
secure round in Flower's simulation engine. Tiny consortium: 3 sites x 8 patients x 3 records.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from ecgtwin.config import save_config
from ecgtwin.coordinator.settings import FederationError, FederationSettings
from ecgtwin.coordinator.state import RunState
from ecgtwin.coordinator.status import read_status
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.errors import UserError
from ecgtwin.privacy import Ledger
from ecgtwin.privacy.policy import PrivacyPolicy
from ecgtwin.privacy.reports import ledger_report
from ecgtwin.site import PRIVATE_METRICS, Site
from ecgtwin.supervise.loopback import flower_env
from ecgtwin.weights import FLAT, initial_weights, pack, trainable_shapes

from conftest import TINY_SAMPLES as N_SAMPLES, tiny_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")
SIGMA = 1.0
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


def policy(site: str, sites: int = 3) -> dict:
    stages = {s: {"rounds": 1, "local_steps": 1, "batch_patients": 4, "noise_multiplier": SIGMA}
              for s in ("vae", "ibe", "twin")}
    return {"site": site, "epsilon": 50.0, "delta": 1e-3, "accountant": "rdp", "seed": 1, "population": 8,
            "distributed_sites": sites, "stages": stages}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("secure")
    synthesize_consortium(root / "raw", sites=3, patients_per_site=8, records_per_patient=3, seed=3, progress=False)
    for site in SITES:
        prepare_store("synthetic", root / "raw" / site, root / "stores" / site,
                      config=PreprocessConfig(n_samples=N_SAMPLES), progress=False)
    config = tiny_experiment()
    save_config(config, root / "tiny.yaml")
    return {"root": root, "config": config, "config_path": root / "tiny.yaml"}


@pytest.fixture
def sites(consortium, tmp_path) -> Path:
    for site in SITES:
        shutil.copytree(consortium["root"] / "stores" / site, tmp_path / "sites" / site / "store")
        (tmp_path / "sites" / site / "privacy.yaml").write_text(yaml.safe_dump(policy(site)))
    return tmp_path / "sites"


class SecureGrid:
    """Each node runs the real ClientApp in this process with ONE context for the run (a SuperNode keeps the
    SecAgg+ state there between stages); every message and reply is recorded."""

    def __init__(self, sites: Path):
        from flwr.app import Context, RecordDict

        from client.app import make_app

        self.app = make_app()
        self.nodes = {100 + i: s for i, s in enumerate(SITES)}
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={}, node_config={
            "data-path": str(sites / s / "store"), "policy-path": str(sites / s / "privacy.yaml")})
            for node, s in self.nodes.items()}
        self.exchanged: list[tuple[int, object, object]] = []  # (node, message, reply)
        self.pending: dict = {}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from uuid import uuid4

        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex
            node = message.metadata.dst_node_id
            reply = self.app(copy.deepcopy(message), self.contexts[node])  # a transport's copy: the mod pops keys
            self.exchanged.append((node, message, reply))
            replies.append(reply)
        return replies

    def push_messages(self, messages):  # the plain round's path
        ids = []
        for reply in self.send_and_receive(messages):
            self.pending[reply.metadata.reply_to_message_id] = reply
            ids.append(reply.metadata.reply_to_message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(mid) for mid in list(message_ids) if mid in self.pending]


def run_config(consortium, out: Path, **overrides) -> dict:
    return {"config": str(consortium["config_path"]), "out": str(out), "rounds-vae": 1, "rounds-ibe": 0,
            "rounds-twin": 0, "min-nodes": 3, "node-wait": 1.0, "strategy": "fedadam",
            "secure-aggregation": True, **overrides}


def kept_update(sites: Path, site: str, start: dict, shapes: dict) -> np.ndarray:
    """What the site computed and kept (state/passes/<key>/weights.safetensors) minus what it received."""
    (weights,) = (sites / site / "state" / "passes").glob("*/weights.safetensors")
    return pack(load_file(str(weights)), shapes).astype(np.float64) - pack(start, shapes)


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus' RDP accountant on its own, outside the ledger."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_a_secure_round_unmasks_only_the_mean_of_the_sites_updates(consortium, sites, tmp_path, flower_identity):
    from server.loop import run_federation

    grid = SecureGrid(sites)
    run_federation(grid, run_config(consortium, tmp_path / "out"))
    config = consortium["config"]
    shapes = trainable_shapes("vae", config)
    start = initial_weights("vae", config)
    updates = [kept_update(sites, s, start, shapes) for s in SITES]
    # the server's one view of the sites: FedAdam's first moment after one round is (1 - beta1) x the mean
    m = RunState.load(tmp_path / "out").moments["vae"]["m"][FLAT]
    quantum = 2 * FederationSettings().secagg_clipping_range / (1 << 22)
    np.testing.assert_allclose(m / 0.1, np.mean(updates, axis=0), atol=2 * quantum)
    assert not np.allclose(updates[0], updates[1], atol=0.1)  # the sites' updates differ: a mean was formed
    # each update is the site's clipped sum plus ITS share of the noise: sigma / sqrt(3) per coordinate
    share = np.std(np.concatenate(updates))
    assert share == pytest.approx(SIGMA / math.sqrt(3), rel=0.1)
    # what reached the server: no array, masked vectors that look uniform on SecAgg+'s 2^32 modulus (an
    # unmasked quantised update lies below 2^22 x its weight), and allowlisted numbers with the site's name
    for node, message, reply in grid.exchanged:
        assert not reply.has_error(), reply.error
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records["secaggplus_configs"]
        if "masked_parameters" in configs:
            from flwr.common import bytes_to_ndarray

            masked = np.concatenate([bytes_to_ndarray(b).ravel() for b in configs["masked_parameters"]])
            assert 0.4 < np.mean(masked > (1 << 31)) < 0.6
            metrics = dict(reply.content.config_records["fitres.metrics"])
            assert set(metrics) == (PRIVATE_METRICS - {"refused"}) | {"site"}
            assert metrics["site"] == grid.nodes[node]
    # the ledger charges sigma (the sum's noise) and records the guarantee without secure aggregation
    for site in SITES:
        (entry,) = Ledger(sites / site / "state" / "ledger.jsonl").entries()
        assert (entry["noise_multiplier"], entry["distributed_sites"]) == (SIGMA, 3)
        assert entry["noise_multiplier_site"] == pytest.approx(SIGMA / math.sqrt(3))
        q = entry["sample_rate"]
        assert q == pytest.approx(4 / 8)
        assert entry["epsilon"] == pytest.approx(rdp_epsilon(SIGMA, q, 1, 1e-3), rel=1e-6)
        assert entry["epsilon_local"] == pytest.approx(rdp_epsilon(SIGMA / math.sqrt(3), q, 1, 1e-3), rel=1e-6)
        assert entry["epsilon_local"] > 2 * entry["epsilon"]
        report = ledger_report(Ledger(sites / site / "state" / "ledger.jsonl"), sites / site / "privacy.yaml",
                               tmp_path / f"{site}.png")
        assert (report["epsilon_spent"], report["epsilon_spent_local"]) == (entry["epsilon"], entry["epsilon_local"])
    history = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history[0]["sites"]) == list(SITES)
    assert {k for r in history[0]["sites"].values() for k in r} == {"num-examples", "epsilon", "delta", "node_id"}


def test_a_site_does_not_unmask_a_sum_of_fewer_sites_than_its_policy_needs(consortium, sites, tmp_path,
                                                                             flower_identity):
    from server.loop import run_federation

    (sites / "site_c" / "privacy.yaml").write_text(yaml.safe_dump(policy("site_c", sites=4)))
    grid = SecureGrid(sites)
    with pytest.raises(FederationError, match="secure aggregation unmasked no sum"):
        run_federation(grid, run_config(consortium, tmp_path / "out"))
    message = read_status(tmp_path / "out")["message"]
    assert "site_c: secure aggregation: the sum would hold 3 sites (0 dropped); the site's policy needs 4" in message
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no round completed


def test_a_distributed_site_trains_only_inside_secure_aggregation(consortium, sites, tmp_path, flower_identity):
    from server.loop import run_federation

    grid = SecureGrid(sites)
    with pytest.raises(FederationError, match="only 0 of 3 sites returned weights"):
        run_federation(grid, run_config(consortium, tmp_path / "out", **{"secure-aggregation": False}))
    assert "releases updates only through secure aggregation of at least 3 sites" in read_status(tmp_path / "out")["message"]
    for site in SITES:  # nothing was charged
        assert not Ledger(sites / site / "state" / "ledger.jsonl").entries()


def test_distributed_dp_settings_that_break_the_guarantee_are_refused(tmp_path):
    from ecgtwin.privacy import load_policy

    path = tmp_path / "privacy.yaml"
    several = policy("site_a")
    several["stages"]["twin"]["local_steps"] = 2
    path.write_text(yaml.safe_dump(several))
    with pytest.raises(UserError, match="privacy.yaml.*stages twin plan local_steps > 1; set local_steps: 1"):
        load_policy(path)
    path.write_text(yaml.safe_dump(policy("site_a", sites=1)))
    with pytest.raises(UserError, match="privacy.yaml.*distributed_sites: must be >= 2"):
        load_policy(path)
    with pytest.raises(UserError, match="distributed DP needs a private site"):
        PrivacyPolicy(private=False, distributed_sites=3)
    from ecgtwin.config import ConfigError

    with pytest.raises(ConfigError, match='secure-aggregation: .* set strategy = "fedadam"'):
        FederationSettings.from_run_config({"secure-aggregation": True})
    with pytest.raises(ConfigError, match="secure-aggregation: must be true or false"):
        FederationSettings.from_run_config({"secure-aggregation": "yes", "strategy": "fedadam"})
    assert FederationSettings.from_run_config({"secure-aggregation": "false"}).secure_aggregation is False


def test_a_secure_round_in_the_simulation_engine(consortium, sites, tmp_path):
    out = tmp_path / "out"
    config = run_config(consortium, out, **{"sites-root": str(sites), "node-wait": 60.0, "rounds-ibe": 1})
    done = subprocess.run([sys.executable, "-m", "server.simulate", "--run-config", json.dumps(config)], cwd=ROOT,
                          env=flower_env(tmp_path / "flwr"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["stage"], sorted(e["sites"])) for e in history] == [("vae", list(SITES)), ("ibe", list(SITES))]
    for site in SITES:
        entries = Ledger(sites / site / "state" / "ledger.jsonl").entries()
        assert [(e["stage"], e["distributed_sites"]) for e in entries] == [("vae", 3), ("ibe", 3)]
        assert Site(sites / site / "store", sites / site / "privacy.yaml").spent() == pytest.approx(
            history[-1]["sites"][site]["epsilon"])


def test_federate_refuses_secure_aggregation_with_a_strategy_that_needs_each_update(consortium, sites, tmp_path,
                                                                                     capsys):
    from ecgtwin.cli import main

    code = main(["federate", "--config", str(consortium["config_path"]), "--sites-root", str(sites), "--out",
                 str(tmp_path / "out"), "--secure-aggregation", "--strategy", "fedmedian", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and 'secure-aggregation: the sites release noisy gradient sums' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_pass_is_unmasked_only_with_one_set_of_sites(sites):
    """Two sums of one pass over different sets of sites would give away the difference: refused."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from client.secure import PASS_RECORD, Refused, check_unmask

    site = Site(sites / "site_a" / "store", sites / "site_a" / "privacy.yaml")
    context = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records[PASS_RECORD] = ConfigRecord({"key": "pass-1"})

    def unmask(active, dead=()):
        check_unmask(site, context, ConfigRecord({Key.ACTIVE_NODE_ID_LIST: list(active),
                                                  Key.DEAD_NODE_ID_LIST: list(dead)}))

    with pytest.raises(Refused, match="the sum would hold 2 sites .0 dropped.; the site's policy needs 3"):
        unmask([100, 101])
    with pytest.raises(Refused, match="1 dropped"):
        unmask([100, 101, 102], dead=[103])
    unmask([102, 100, 101])
    unmask([100, 101, 102])  # the same set again (a retried round): allowed
    with pytest.raises(Refused, match="unmasked with another set of sites"):
        unmask([100, 101, 103])
    context.state.config_records[PASS_RECORD] = ConfigRecord({"key": "pass-2"})
    unmask([100, 101, 103])  # another pass: its own first set
