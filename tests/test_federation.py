"""Federation: the site's side (refusals, the reply allowlist, what a message carries), the server loop
(aggregation, refusals, too few sites, checkpoint and resume) on an in-process grid, and a real simulation
in Flower's engine. The real TLS deployment and its faults are in test_loopback.py.

Everything runs on a tiny consortium (3 sites x 8 patients x 3 records, 256 samples per record, a tiny
model, fixed noise multipliers so that planning takes no time) with 1 round per stage and 2 local steps.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ecgtwin.config import load_config, save_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.config import STAGES, config_from_text, config_text
from ecgtwin.supervise.loopback import flower_env
from ecgtwin.coordinator.settings import FederationError
from ecgtwin.coordinator.state import RunState
from ecgtwin.errors import UserError
from ecgtwin.coordinator.status import read_status
from ecgtwin.weights import FLAT, initial_weights, model_shapes, pack, trainable_shapes, unpack
from ecgtwin.privacy import Ledger
from ecgtwin.site import ALLOWED_CONFIG, PRIVATE_METRICS, ReplyRejected, Site, check_reply

from conftest import TINY_SAMPLES as N_SAMPLES, tiny_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


def tiny_config():
    return tiny_experiment()


def policy(**overrides) -> dict:
    stages = {s: {"rounds": 1, "local_steps": 2, "batch_patients": 4, "noise_multiplier": 1.0}
              for s in ("vae", "ibe", "twin")}
    return {"epsilon": 50.0, "delta": 1e-3, "accountant": "rdp", "seed": 1, "population": 8, "stages": stages,
            **overrides}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> dict:
    """<root>/sites/<site>/{store, privacy.yaml} (no state yet) and the tiny experiment config."""
    root = tmp_path_factory.mktemp("federation")
    synthesize_consortium(root / "raw", sites=3, patients_per_site=8, records_per_patient=3, seed=3, progress=False)
    for site in SITES:
        prepare_store("synthetic", root / "raw" / site, root / "sites" / site / "store",
                      config=PreprocessConfig(n_samples=N_SAMPLES), progress=False)
        (root / "sites" / site / "privacy.yaml").write_text(yaml.safe_dump(policy(site=site)))
    config = tiny_config()
    save_config(config, root / "tiny.yaml")
    return {"root": root, "sites": root / "sites", "config": config, "config_path": root / "tiny.yaml"}


@pytest.fixture
def sites(consortium, tmp_path) -> Path:
    """A fresh copy of the sites (stores and policies copied, no ledgers: a store keeps its ledger's marker)."""
    for site in SITES:
        (tmp_path / "sites" / site).mkdir(parents=True)
        shutil.copytree(consortium["sites"] / site / "store", tmp_path / "sites" / site / "store")
        shutil.copy(consortium["sites"] / site / "privacy.yaml", tmp_path / "sites" / site / "privacy.yaml")
    return tmp_path / "sites"


def open_site(sites: Path, name: str) -> Site:
    return Site(sites / name / "store", sites / name / "privacy.yaml", sites / name / "state")


def global_weights(config, upto: str) -> dict:
    stages = ("vae", "ibe", "twin")
    return {s: initial_weights(s, config) for s in stages[: stages.index(upto) + 1]}


# --------------------------------------------------------------------------------------------------------
# the site


def test_site_trains_with_its_own_steps_and_refuses_beyond_its_budget(consortium, sites):
    config = consortium["config"]
    vae_only = policy(site="site_a")
    vae_only["stages"]["ibe"]["rounds"] = vae_only["stages"]["twin"]["rounds"] = 0
    (sites / "site_a" / "privacy.yaml").write_text(yaml.safe_dump(vae_only))
    site = open_site(sites, "site_a")
    new, metrics, refusal = site.train("vae", 1, "run-1", config_text(config), global_weights(config, "vae"))
    # a private site sends DP weights, epsilon and delta, and its PUBLIC population as the weight: no loss,
    # no count of its patients or records, no timing
    assert refusal is None and set(metrics) == {"num-examples", "epsilon", "delta"}
    assert metrics["num-examples"] == 8
    assert {k: v.shape for k, v in new.items()} == model_shapes("vae", config)
    assert any(not np.array_equal(new[k], v) for k, v in initial_weights("vae", config).items())
    ledger = Ledger(sites / "site_a" / "state" / "ledger.jsonl")
    assert [(e["stage"], e["round"], e["steps"], e["run"]) for e in ledger.entries()] == [("vae", 1, 2, "run-1")]

    # the privacy officer lowers the budget to what is spent: the next round is refused, nothing is charged
    vae_only["epsilon"] = ledger.entries()[-1]["epsilon"] * 1.001
    (sites / "site_a" / "privacy.yaml").write_text(yaml.safe_dump(vae_only))
    before = ledger.path.read_bytes()
    new, metrics, refusal = open_site(sites, "site_a").train("vae", 2, "run-1", config_text(config),
                                                             global_weights(config, "vae"))
    assert new is None and metrics == {}
    assert "privacy budget refused" in refusal and "vae round 2" in refusal
    assert ledger.path.read_bytes() == before

    # a stage the policy plans no rounds for is refused before anything is read or charged
    no_twin = policy(site="site_b")
    no_twin["stages"]["twin"]["rounds"] = 0
    (sites / "site_b" / "privacy.yaml").write_text(yaml.safe_dump(no_twin))
    new, _, refusal = open_site(sites, "site_b").train("twin", 1, "run-1", config_text(config),
                                                       global_weights(config, "twin"))
    assert new is None and "plans no rounds for stage twin" in refusal
    assert not (sites / "site_b" / "state" / "ledger.jsonl").exists()


def test_reply_allowlist(consortium):
    config = consortium["config"]
    good = initial_weights("ibe", config)
    metrics = {"num-examples": 7, "epsilon": 2.0, "delta": 1e-3}
    check_reply("ibe", config, good, metrics, {"site": "site_a"})
    plain = {"num-examples": 7, "patients": 7, "records": 9, "loss": 1.5, "train-seconds": 0.5}
    check_reply("ibe", config, good, plain, {"site": "site_a"}, private=False)  # a non-private site may
    for key in ("loss", "patients", "records", "train-seconds"):  # a private one may not
        with pytest.raises(ReplyRejected, match=f"reply metric '{key}' is not in the allowlist"):
            check_reply("ibe", config, good, {**metrics, key: plain[key]}, {"site": "site_a"})
    name = next(iter(good))
    bad_cases = [
        ({**good, "patient_latent": np.zeros((4, 32), np.float32)}, metrics, None, "unexpected"),
        ({k: v for k, v in good.items() if k != name}, metrics, None, "missing"),
        ({**good, name: np.zeros((*good[name].shape, 1), np.float32)}, metrics, None, "shape"),
        ({**good, name: good[name].astype(np.int64)}, metrics, None, "dtype"),
        ({**good, name: np.full(good[name].shape, np.nan, np.float32)}, metrics, None, "non-finite"),
        (good, {**metrics, "hr_mean": 71.0}, None, "allowlist"),
        (good, {**metrics, "epsilon": [1.0, 2.0]}, None, "single number"),
        (good, metrics, {"site": "site_a", "patients": "p0001,p0002"}, "allowlist"),
    ]
    for arrays, m, info, message in bad_cases:
        with pytest.raises(ReplyRejected, match=message):
            check_reply("ibe", config, arrays, m, info)


def inspect_reply(content, config, stage: str, store_patients: list[str]) -> None:
    """What may leave a site: the stage model's tensors, allowlisted numbers, the site name and a reason."""
    shapes = trainable_shapes(stage, config)
    for record_name, record in content.array_records.items():
        assert record_name == "arrays" and list(record) == [FLAT]
        value = record[FLAT].numpy()
        # one float32 vector exactly as long as the stage's trainable tensors: no room for anything else
        assert value.dtype == np.float32 and value.shape == (sum(int(np.prod(v)) for v in shapes.values()),)
        assert set(unpack(value, shapes)) == set(shapes)
    for record in content.metric_records.values():
        assert set(record) <= PRIVATE_METRICS  # every site of these tests is private
        assert all(isinstance(v, (int, float)) for v in record.values())
    for record in content.config_records.values():
        assert set(record) <= ALLOWED_CONFIG
        for value in record.values():
            assert not any(p in str(value) for p in store_patients), value


def test_client_messages_carry_only_weights_and_allowlisted_metrics(consortium, sites, flower_identity):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from client.app import make_app

    from ecgtwin.data.store import SiteStore

    config = consortium["config"]
    app = make_app()
    patients = list(SiteStore(sites / "site_a" / "store").patients)
    node_config = {"data-path": str(sites / "site_a" / "store"), "policy-path": str(sites / "site_a" / "privacy.yaml"),
                   "state-path": str(sites / "site_a" / "state")}
    weights = global_weights(config, "twin")
    for stage in ("vae", "ibe", "twin"):
        content = RecordDict({s: ArrayRecord({FLAT: Array(pack(weights[s], model_shapes(s, config)))})
                              for s in ("vae", "ibe", "twin")[: ("vae", "ibe", "twin").index(stage) + 1]})
        content["config"] = ConfigRecord({"stage": stage, "round": 1, "run-id": "t", "config-yaml": config_text(config)})
        message = Message(content, dst_node_id=7, message_type="train")
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
        reply = app(message, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        inspect_reply(reply.content, config, stage, patients)
        assert reply.content["metrics"]["num-examples"] > 0 and "epsilon" in reply.content["metrics"]
        weights[stage] = unpack(reply.content["arrays"][FLAT].numpy(), trainable_shapes(stage, config))
    # a refusal carries no arrays at all, only the flag and the reason
    spent = Ledger(sites / "site_a" / "state" / "ledger.jsonl").entries()[-1]["epsilon"]
    (sites / "site_a" / "privacy.yaml").write_text(yaml.safe_dump(policy(site="site_a", epsilon=spent * 1.001)))
    again = app(message, context)  # the same request again: the stored output, at no cost
    assert again.content["metrics"]["epsilon"] == reply.content["metrics"]["epsilon"]
    assert Ledger(sites / "site_a" / "state" / "ledger.jsonl").entries()[-1]["epsilon"] == spent
    content["config"] = ConfigRecord({"stage": "twin", "round": 2, "run-id": "t", "config-yaml": config_text(config)})
    reply = app(Message(content, dst_node_id=7, message_type="train"), context)  # a new round: refused
    assert len(reply.content.array_records) == 0
    assert reply.content["metrics"]["refused"] == 1 and "budget" in reply.content["info"]["reason"]
    inspect_reply(reply.content, config, "twin", patients)


# --------------------------------------------------------------------------------------------------------
# the server loop on an in-process grid (no Ray, no sockets)


class LocalGrid:
    """A Grid whose nodes run the real ClientApp in this process; `fail` makes nodes error or crash."""

    def __init__(self, sites: Path, fail=None):
        from client.app import make_app

        self.app = make_app()
        self.nodes = {100 + i: s for i, s in enumerate(SITES)}
        self.sites = sites
        self.fail = fail or (lambda node, stage, rnd: None)
        self.sent: list[tuple[str, int, int]] = []
        self.replies: list[tuple[dict, int]] = []  # (arrays, num-examples) of every reply with weights
        self.messages: list = []  # those replies
        self.pending: dict = {}  # message id -> reply not yet pulled

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Run each node's ClientApp on its message now; the replies wait to be pulled (as at a SuperLink)."""
        from uuid import uuid4

        from flwr.app import Context, Error, Message, RecordDict

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = mid = uuid4().hex
            ids.append(mid)
            node, config = message.metadata.dst_node_id, message.content["config"]
            self.sent.append((str(config["stage"]), int(config["round"]), node))
            action = self.fail(node, str(config["stage"]), int(config["round"]))
            if action == "crash":
                raise KeyboardInterrupt("server killed")
            if action == "error":  # what a SuperLink answers for a node that went away: sent by node 0
                reply = Message(Error(code=0, reason="node went away"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = 0
                self.pending[mid] = reply
                continue
            site = self.sites / self.nodes[node]
            context = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={"data-path": str(site / "store"), "policy-path": str(site / "privacy.yaml"),
                                           "state-path": str(site / "state")})
            reply = self.app(message, context)
            if "arrays" in reply.content.array_records:
                shapes = trainable_shapes(str(config["stage"]), config_from_text(str(config["config-yaml"])))
                self.replies.append((unpack(reply.content["arrays"][FLAT].numpy(), shapes),
                                     int(reply.content["metrics"]["num-examples"])))
                self.messages.append(reply)
            self.pending[mid] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(mid) for mid in list(message_ids) if mid in self.pending]


def run_config(consortium, out: Path, **overrides) -> dict:
    return {"config": str(consortium["config_path"]), "out": str(out), "rounds-vae": 1, "rounds-ibe": 1,
            "rounds-twin": 1, "min-nodes": 2, "node-wait": 1.0, **overrides}


def ledger_rounds(sites: Path, site: str) -> list[tuple[str, int]]:
    return [(e["stage"], e["round"]) for e in Ledger(sites / site / "state" / "ledger.jsonl").entries()]


def test_refusals_are_dropped_and_too_few_sites_stop_the_run(consortium, sites, tmp_path, flower_identity):
    from server.loop import run_federation

    no_ibe = policy(site="site_c")
    no_ibe["stages"]["ibe"]["rounds"] = 0
    (sites / "site_c" / "privacy.yaml").write_text(yaml.safe_dump(no_ibe))
    grid = LocalGrid(sites, fail=lambda node, stage, rnd: "error" if (node, stage) == (101, "ibe") else None)
    with pytest.raises(FederationError, match="only 1 of 3 sites returned weights, fewer than min-nodes 2"):
        run_federation(grid, run_config(consortium, tmp_path / "out", **{"rounds-twin": 0}))
    status = read_status(tmp_path / "out")
    assert status["status"] == "failed" and "min-nodes" in status["message"]
    failed = status["message"].split("failed: ")[1]
    assert failed.count("node 101: node went away") == 1 and "node 0" not in failed  # the node it was sent to
    history = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["round"], sorted(e["sites"])) for e in history] == [("vae", 1, list(SITES))]
    state = RunState.load(tmp_path / "out")
    assert state.completed == [("vae", 1)]


def test_every_strategy_aggregates_the_sites_weights(consortium, sites, tmp_path, flower_identity):
    from server.loop import _aggregate, make_strategy, run_federation

    from ecgtwin.coordinator.settings import FederationSettings

    grid = LocalGrid(sites)  # one real round (FedAvg), then every strategy on the same replies
    run_federation(grid, run_config(consortium, tmp_path / "out", **{"rounds-ibe": 0, "rounds-twin": 0}))
    start = initial_weights("vae", consortium["config"])
    mean = weighted_mean(grid.replies)
    result = RunState.load(tmp_path / "out").weights["vae"]
    for k in start:
        np.testing.assert_allclose(result[k], mean[k], rtol=1e-5, atol=1e-6)
    stacked = {k: np.stack([arrays[k] for arrays, _ in grid.replies]) for k in start}
    expected = {"fedprox": mean,  # the proximal term is the sites' business; the server averages
                "fedmedian": {k: np.median(v, axis=0) for k, v in stacked.items()},
                "fedtrimmedavg": {k: v.mean(axis=0) for k, v in stacked.items()}}  # 3 sites, beta 0.2: no trim
    for strategy in ("fedprox", "fedmedian", "fedtrimmedavg", "fedadam"):
        settings = FederationSettings.from_run_config({"strategy": strategy})
        got = _aggregate(make_strategy(settings), 1, start, [copy.deepcopy(m) for m in grid.messages],
                         trainable_shapes("vae", consortium["config"]))
        if strategy != "fedadam":
            for k in start:
                np.testing.assert_allclose(got[k], expected[strategy][k], rtol=1e-5, atol=1e-6, err_msg=strategy)
            continue
        # FedAdam: a server step from the global weights along the mean update, at most ~server-lr per coordinate
        step = {k: got[k] - start[k] for k in start}
        assert max(np.abs(v).max() for v in step.values()) <= 0.01
        agree = np.concatenate([(np.sign(step[k]) == np.sign(mean[k] - start[k])).ravel() for k in start])
        assert agree.mean() > 0.95


def test_resume_continues_with_the_next_round(consortium, sites, tmp_path, flower_identity):
    from server.loop import run_federation

    out = tmp_path / "out"
    config = run_config(consortium, out, **{"rounds-vae": 2, "strategy": "fedadam"})
    crash = LocalGrid(sites, fail=lambda node, stage, rnd: "crash" if (stage, rnd) == ("ibe", 1) else None)
    with pytest.raises(KeyboardInterrupt):
        run_federation(crash, config)
    after_crash = RunState.load(out)
    assert after_crash.completed == [("vae", 1), ("vae", 2)] and set(after_crash.moments["vae"]) == {"m", "v"}

    grid = LocalGrid(sites)
    run_federation(grid, config)
    assert sorted({(stage, rnd) for stage, rnd, _ in grid.sent}) == [("ibe", 1), ("twin", 1)]
    state = RunState.load(out)
    assert state.completed == [("vae", 1), ("vae", 2), ("ibe", 1), ("twin", 1)]
    assert all(np.array_equal(state.weights["vae"][k], v) for k, v in after_crash.weights["vae"].items())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["round"]) for e in lines] == state.completed
    assert read_status(out)["status"] == "finished" and (out / "metrics.png").stat().st_size > 10_000
    for site in SITES:  # every round trained once at every site (the crash came before ibe was sent)
        assert ledger_rounds(sites, site) == [("vae", 1), ("vae", 2), ("ibe", 1), ("twin", 1)]


# --------------------------------------------------------------------------------------------------------
# Flower's simulation engine and a real deployment


def generator_works(model: Path) -> None:
    from ecgtwin.twin import TwinGenerator

    generator = TwinGenerator(model)
    assert generator.config.data.n_samples == N_SAMPLES


def test_simulation_end_to_end(consortium, sites, tmp_path):
    out = tmp_path / "out"
    config = run_config(consortium, out, **{"sites-root": str(sites), "min-nodes": 3, "node-wait": 60.0})
    done = subprocess.run([sys.executable, "-m", "server.simulate", "--run-config", json.dumps(config)], cwd=ROOT,
                          env=flower_env(tmp_path / "flwr"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_status(out)["status"] == "finished"
    generator_works(out / "model")
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["stage"], sorted(e["sites"])) for e in history] == [(s, list(SITES)) for s in ("vae", "ibe", "twin")]
    for site in SITES:
        assert ledger_rounds(sites, site) == [("vae", 1), ("ibe", 1), ("twin", 1)]
        epsilons = [e["sites"][site]["epsilon"] for e in history]
        assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(open_site(sites, site).spent())
    # `ecgtwin export`: what may be shared of the global model and of a site's own checkpoint
    from ecgtwin.export import export_model

    card = export_model(out / "model", tmp_path / "bundle")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "card.json", "card.md", "conditioning.json", "config.yaml", "ibe.safetensors", "twin.safetensors",
        "vae.safetensors"]
    assert card["privacy"]["differentially_private"] is True
    assert set(card["privacy"]["federated_sites"]) == set(SITES)
    generator_works(tmp_path / "bundle")
    work = sites / "site_a" / "state" / "checkpoint"
    assert list(work.glob("dp_*_loss.jsonl"))  # the site's own logs exist ...
    site_card = export_model(work, tmp_path / "site_bundle", sites / "site_a" / "privacy.yaml",
                             sites / "site_a" / "state" / "ledger.jsonl")
    assert not list((tmp_path / "site_bundle").glob("*.jsonl"))  # ... and stay at the site
    assert site_card["privacy"]["epsilon_spent"] == pytest.approx(open_site(sites, "site_a").spent())
    import hashlib
    assert all(hashlib.sha256((tmp_path / "site_bundle" / name).read_bytes()).hexdigest() == digest
               for name, digest in site_card["files"].items())
    # what the server kept of the private sites: epsilon, delta and the public weight, nothing else
    for entry in history:
        for site, reported in entry["sites"].items():
            assert set(reported) - {"node_id"} == PRIVATE_METRICS - {"refused"}, (site, reported)
            assert reported["num-examples"] == 8


def weighted_mean(updates: list[tuple[dict, float]]) -> dict:
    """FedAvg by hand, in float64: the reference the strategies are checked against."""
    total = float(sum(w for _, w in updates))
    return {k: sum(u[k].astype(np.float64) * (w / total) for u, w in updates).astype(updates[0][0][k].dtype)
            for k in updates[0][0]}


def test_a_failure_at_a_site_reaches_the_server_as_a_category_only(consortium, sites, flower_identity):
    """A store whose records.csv lost rows: the exception names the store's path and its row counts; the
    reply carries only the site, a fixed category and no array; the text stays in the site's errors.log."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from client.app import make_app

    store = sites / "site_a" / "store"
    lines = (store / "records.csv").read_text().splitlines()
    (store / "records.csv").write_text("\n".join(lines[:5]) + "\n")
    config = consortium["config"]
    content = RecordDict({"vae": ArrayRecord({FLAT: Array(pack(initial_weights("vae", config), model_shapes("vae", config)))})})
    content["config"] = ConfigRecord({"stage": "vae", "round": 1, "run-id": "t", "config-yaml": config_text(config)})
    node_config = {"data-path": str(store), "policy-path": str(sites / "site_a" / "privacy.yaml"),
                   "state-path": str(sites / "site_a" / "state")}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    reply = make_app()(Message(content, dst_node_id=7, message_type="train"), context)
    assert not reply.has_error() and len(reply.content.array_records) == 0
    reason = reply.content["info"]["reason"]
    assert reason == "site_a: site error: the site's data or settings were refused (details in the site's state/errors.log)"
    assert str(sites) not in reason and not any(ch.isdigit() for ch in reason.replace("site_a", ""))
    assert "records.csv has 4 rows" in (sites / "site_a" / "state" / "errors.log").read_text()


def test_a_site_that_cannot_open_or_read_the_message_replies_with_a_category_only(consortium, sites, capsys,
                                                                                 flower_identity):
    """Opening the site (a store path that does not exist) and reading the message (a config the site
    refuses) fail before any training: the reply still carries a fixed category and no path or text."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from client.app import make_app

    config = consortium["config"]
    secret_path = sites / "site_a" / "no-such-store-p1234"

    def send(node_config: dict, config_yaml: str):
        content = RecordDict({"vae": ArrayRecord({FLAT: Array(pack(initial_weights("vae", config),
                                                                   model_shapes("vae", config)))})})
        content["config"] = ConfigRecord({"stage": "vae", "round": 1, "run-id": "t", "config-yaml": config_yaml})
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
        reply = make_app()(Message(content, dst_node_id=7, message_type="train"), context)
        assert not reply.has_error() and len(reply.content.array_records) == 0
        return reply.content["info"]["reason"], reply.content["info"]["site"]

    policy_path = str(sites / "site_a" / "privacy.yaml")
    reason, site = send({"data-path": str(secret_path), "policy-path": policy_path}, config_text(config))
    assert (reason, site) == ("site error: a file the site needs is missing (details in the SuperNode's log)", "unknown")
    assert str(secret_path) in capsys.readouterr().err  # the text stays in the SuperNode's own log
    reason, site = send({"data-path": str(sites / "site_a" / "store"), "policy-path": policy_path,
                         "state-path": str(sites / "site_a" / "state")}, "model: {vae: {lattent: 1}}\n")
    assert (reason, site) == ("site_a: site error: the configuration was refused (details in the site's "
                              "state/errors.log)", "site_a")
    assert "lattent" in (sites / "site_a" / "state" / "errors.log").read_text()


# --------------------------------------------------------------------------------------------------------
# the ledger: one per store, tamper-evident, and rounds that survive a crash without burning budget


def charged_site(sites: Path, config) -> Site:
    site = open_site(sites, "site_a")
    new, _, refusal = site.train("vae", 1, "run-1", config_text(config), global_weights(config, "vae"))
    assert refusal is None and new is not None
    return site


def test_a_deleted_or_edited_ledger_is_refused_not_restarted(consortium, sites):
    """Two releases, then each damage in turn (the intact ledger restored in between): refused every time."""
    config = consortium["config"]
    site = charged_site(sites, config)
    site.train("vae", 1, "run-2", config_text(config), global_weights(config, "vae"))  # two releases
    path = site.ledger.path
    intact = path.read_text()
    lines = intact.splitlines()
    assert len(lines) == 2
    edited = json.loads(lines[0])
    edited["steps"] = 0
    damages = {"delete": None, "empty": "", "drop_line": lines[1] + "\n",
               "edit_steps": json.dumps(edited) + "\n" + lines[1] + "\n"}
    for name, text in damages.items():
        path.unlink() if text is None else path.write_text(text)
        new, metrics, refusal = open_site(sites, "site_a").train("vae", 1, f"run-{name}", config_text(config),
                                                                 global_weights(config, "vae"))
        assert new is None and refusal.endswith("the privacy ledger is missing, truncated or edited; refusing to "
                                                "train (details in the site's state/errors.log)"), (name, refusal)
        path.write_text(intact)
    assert "refusing to account" in (sites / "site_a" / "state" / "errors.log").read_text()
    assert len(open_site(sites, "site_a").ledger.entries()) == 2  # intact again: accepted


def test_every_command_that_trains_a_store_uses_its_one_ledger(consortium, sites, tmp_path):
    """A federation round whose SuperNode keeps its state elsewhere, then the store prepared again from its
    records, then `ecgtwin train --policy SITE/privacy.yaml` (whose own default would be SITE/state): one
    ledger holds both charges, the re-prepared store still names it, and `privacy ledger` reads it.
    Re-preparing never resets the budget."""
    from ecgtwin.cli import main

    config = consortium["config"]
    site = Site(sites / "site_a" / "store", sites / "site_a" / "privacy.yaml", tmp_path / "elsewhere")
    new, _, refusal = site.train("vae", 1, "run-1", config_text(config), global_weights(config, "vae"))
    assert refusal is None and site.ledger.path == tmp_path / "elsewhere" / "ledger.jsonl"
    spent = site.spent()
    prepare_store("synthetic", consortium["root"] / "raw" / "site_a", sites / "site_a" / "store",
                  config=PreprocessConfig(n_samples=N_SAMPLES), progress=False)
    assert (sites / "site_a" / "store" / "ledger-marker.json").is_file()  # kept by the re-prepare
    assert open_site(sites, "site_a").spent() == spent
    config_path = tmp_path / "tiny.yaml"
    save_config(config, config_path)
    assert main(["train", "--config", str(config_path), "--stage", "vae", "--store", str(sites / "site_a" / "store"),
                 "--out", str(tmp_path / "ckpt"), "--policy", str(sites / "site_a" / "privacy.yaml"),
                 "--no-progress", "--json"]) == 0
    assert not (sites / "site_a" / "state" / "ledger.jsonl").exists() and not (sites / "site_a" / "ledger.jsonl").exists()
    assert open_site(sites, "site_a").ledger.path == site.ledger.path
    assert len(site.ledger.entries()) == 2 and open_site(sites, "site_a").spent() > spent
    assert main(["privacy", "ledger", "--site", str(sites / "site_a"), "--json"]) == 0


def unseeded(sites: Path, **overrides) -> None:
    """site_a's policy without the test seed: its passes draw from the site's secret, as in production."""
    text = policy(site="site_a", **overrides)
    del text["seed"]
    (sites / "site_a" / "privacy.yaml").write_text(yaml.safe_dump(text))


def test_a_retried_pass_releases_the_same_bytes(consortium, sites, tmp_path):
    """The charge of a pass is re-used by its retry, so the retry must release exactly what the first try
    did: from a second state folder, after state/passes was deleted, the noise (from the site's secret and
    the pass key) is the same and so are the bytes; one charge. A lost site secret is refused."""
    config = consortium["config"]
    unseeded(sites)
    request = ("vae", 1, "run-1", config_text(config), global_weights(config, "vae"))
    first, metrics, refusal = open_site(sites, "site_a").train(*request)
    assert refusal is None
    second_state = Site(sites / "site_a" / "store", sites / "site_a" / "privacy.yaml", tmp_path / "second-state")
    again, metrics_again, _ = second_state.train(*request)
    shutil.rmtree(sites / "site_a" / "state" / "passes")
    third, _, _ = open_site(sites, "site_a").train(*request)
    for retry in (again, third):
        assert all(np.array_equal(first[k], retry[k]) for k in first)
    assert metrics_again == metrics and len(second_state.ledger.entries()) == 1
    other, _, _ = open_site(sites, "site_a").train("vae", 1, "run-2", *request[3:])  # another pass: other noise
    assert any(not np.array_equal(first[k], other[k]) for k in first)

    (sites / "site_a" / "state" / "site-secret.key").unlink()
    shutil.rmtree(sites / "site_a" / "state" / "passes")
    new, _, refusal = open_site(sites, "site_a").train(*request)
    assert new is None and "ledger is missing, truncated or edited" in refusal
    assert "the site secret is missing" in (sites / "site_a" / "state" / "errors.log").read_text()


def test_a_refusal_is_stored_and_replayed_not_recomputed(consortium, sites, monkeypatch):
    """A pass whose weights come out non-finite is refused (nothing sent) after its charge: the refusal is
    stored like a reply, and the retry gets it back without training again; after state/passes is gone the
    retry trains again with the same noise and is refused the same way, with one charge."""
    config = consortium["config"]
    unseeded(sites)
    real_pass, calls = Site._pass, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        result = real_pass(self, *args, **kwargs)
        result.weights[next(iter(result.weights))][...] = np.nan  # forced: the pass "diverged"
        return result

    monkeypatch.setattr(Site, "_pass", poisoned)
    request = ("vae", 1, "run-1", config_text(config), global_weights(config, "vae"))
    outcomes = [open_site(sites, "site_a").train(*request) for _ in range(2)]
    assert [o[2] for o in outcomes] == ["site_a: the pass produced non-finite weights; nothing was sent"] * 2
    assert len(calls) == 1 and all(o[0] is None for o in outcomes)
    shutil.rmtree(sites / "site_a" / "state" / "passes")
    assert open_site(sites, "site_a").train(*request)[2] == outcomes[0][2]
    assert len(calls) == 2 and len(open_site(sites, "site_a").ledger.entries()) == 1


def test_no_refusal_depends_on_the_private_count(consortium, sites):
    """More training patients than the policy's public population, and an IBE stage with a single pair: both
    train (the count stays at the site) instead of refusing with a reason that would reveal it."""
    config = consortium["config"]
    (sites / "site_a" / "privacy.yaml").write_text(yaml.safe_dump(policy(site="site_a", population=3)))
    new, metrics, refusal = open_site(sites, "site_a").train("vae", 1, "run-1", config_text(config),
                                                              global_weights(config, "vae"))
    assert refusal is None and metrics["num-examples"] == 3

    import pandas as pd

    store = sites / "site_b" / "store"
    records = pd.read_csv(store / "records.csv")
    rank = records.groupby("patient_id").cumcount()
    keep = (rank == 0) | ((records.patient_id == records.patient_id.iloc[0]) & (rank == 1))  # one pair in all
    records.loc[~keep, "patient_id"] = [f"solo{i}" for i in range(int((~keep).sum()))]
    records.to_csv(store / "records.csv", index=False)
    new, metrics, refusal = open_site(sites, "site_b").train("ibe", 1, "run-1", config_text(config),
                                                              global_weights(config, "ibe"))
    assert refusal is None and new is not None and metrics["num-examples"] == 8


CRASHING_PASS = r"""
import sys
from pathlib import Path
import numpy as np
from ecgtwin.config import config_text, load_config
from ecgtwin.site import Site
from ecgtwin.weights import initial_weights
sites, config_path, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = load_config(config_path)
site = Site(sites / "site_a" / "store", sites / "site_a" / "privacy.yaml", sites / "site_a" / "state")
new, metrics, refusal = site.train("vae", 1, "run-1", config_text(config), {"vae": initial_weights("vae", config)})
np.savez(out, **new)
print("done", refusal)
"""


def test_a_pass_killed_mid_round_is_retried_without_a_second_charge(consortium, sites, tmp_path):
    """kill -9 of the process training a round (after its charge, before its output): the retry re-uses the
    charge; a repeated request then gets the very same output, also at no cost."""
    config = consortium["config"]
    slow = policy(site="site_a", epsilon=1e4)
    slow["stages"]["vae"]["local_steps"] = 400  # long enough to be killed in the middle
    (sites / "site_a" / "privacy.yaml").write_text(yaml.safe_dump(slow))
    ledger_file = sites / "site_a" / "state" / "ledger.jsonl"
    child = subprocess.Popen([sys.executable, "-c", CRASHING_PASS, str(sites), str(consortium["config_path"]),
                              str(tmp_path / "never.npz")], cwd=ROOT, env=flower_env(tmp_path / "flwr"))
    deadline = time.monotonic() + 240
    while not (ledger_file.is_file() and ledger_file.read_text().strip()) and time.monotonic() < deadline:
        assert child.poll() is None, "the pass ended (or failed) before its charge"
        time.sleep(0.2)
    time.sleep(1.0)  # inside the pass now
    assert child.poll() is None, "the pass ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert not (tmp_path / "never.npz").exists() and len(ledger_file.read_text().splitlines()) == 1
    site = open_site(sites, "site_a")
    first, metrics, refusal = site.train("vae", 1, "run-1", config_text(config), global_weights(config, "vae"))
    assert refusal is None and len(site.ledger.entries()) == 1  # the retry re-used the interrupted charge
    again, metrics_again, _ = open_site(sites, "site_a").train("vae", 1, "run-1", config_text(config),
                                                                global_weights(config, "vae"))
    assert all(np.array_equal(first[k], again[k]) for k in first) and metrics_again == metrics
    assert len(site.ledger.entries()) == 1


# --------------------------------------------------------------------------------------------------------
# a public foundation: pretrained once, frozen where the run says so


@pytest.fixture(scope="module")
def foundation(consortium, tmp_path_factory) -> Path:
    """A foundation of the tiny config, pretrained on the simulator's public population."""
    from ecgtwin.foundation import pretrain

    config = copy.deepcopy(consortium["config"])
    config.vae.steps, config.ibe.steps, config.twin.steps = 40, 20, 40
    out = tmp_path_factory.mktemp("foundation") / "f"
    pretrain(config, "synthetic", out, patients=12, records_per_patient=2)
    return out


def test_pretrain_lowers_every_loss_and_its_card_matches_the_weights(foundation):
    import hashlib

    card = json.loads((foundation / "card.json").read_text())
    assert card["source"] == "synthetic" and card["patients"] == 12 and card["records"] == 24
    for stage in STAGES:
        losses = card["stages"][stage]
        assert losses["final_loss"] < losses["first_loss"], (stage, losses)
        digest = hashlib.sha256((foundation / f"{stage}.safetensors").read_bytes()).hexdigest()
        assert card["sha256"][f"{stage}.safetensors"] == digest
    assert "Foundation model card" in (foundation / "card.md").read_text()
    from ecgtwin.foundation import FOUNDATION_SEED
    assert card["seed"] == FOUNDATION_SEED not in (0, 1, 3, 5, 7, 11, 101)  # no site of the project uses it
    generator_works(foundation)


def test_pretrain_on_a_real_public_corpus_reads_it_through_the_readers(consortium, ptbxl_root, tmp_path):
    """The real path: PTB-XL (CC-BY 4.0) from ../shared/data, its 100 Hz copy, through the PTB-XL reader; the
    card names the corpus and counts its real records and patients, and its model generates."""
    import pandas as pd

    from ecgtwin.foundation import pretrain

    config = copy.deepcopy(consortium["config"])
    config.vae.steps, config.ibe.steps, config.twin.steps = 3, 2, 3
    card = pretrain(config, "ptbxl", tmp_path / "f", root=ptbxl_root, rate=100)
    database = pd.read_csv(ptbxl_root / "ptbxl_database.csv")
    assert card["source"] == "ptbxl" and card["root"] == str(ptbxl_root) and card["seed"] is None
    assert 0.9 * len(database) <= card["records"] <= len(database)
    assert card["patients"] <= database.patient_id.nunique()
    assert not (tmp_path / "f" / "public-store").exists() and not list((tmp_path / "f").glob("*_state.pt"))
    generator_works(tmp_path / "f")


def test_pretrain_continues_a_foundation_on_pooled_real_corpora(consortium, foundation, challenge_root, ptbdb_root,
                                                                tmp_path):
    """`pretrain --continue-from F --corpus challenge=... --corpus wfdb=...`: the simulator's foundation trained
    on further with real public databases pooled in: every record of each corpus is counted (the Challenge's
    50 recordings, PTB's long recordings cut into 10 s windows, counted here from the headers), each stage
    starts from F's weights (its first loss is F's final loss' size, not a random model's), and it generates."""
    import wfdb

    from ecgtwin.foundation import Corpus, pretrain

    config = copy.deepcopy(consortium["config"])
    config.vae.steps, config.ibe.steps, config.twin.steps = 3, 2, 3
    card = pretrain(config, "synthetic", tmp_path / "f", patients=4, records_per_patient=2,
                    corpora=[Corpus.parse(f"challenge={challenge_root}"), Corpus.parse(f"wfdb={ptbdb_root}")],
                    continue_from=foundation)
    windows = sum(int(h.sig_len / h.fs // 10) for h in (wfdb.rdheader(str(p.with_suffix("")))
                                                         for p in sorted(ptbdb_root.rglob("*.hea"))))
    signals = [wfdb.rdrecord(str(p.with_suffix(""))).p_signal for p in sorted(challenge_root.glob("*.hea"))]
    flat = sum(bool((np.abs(x) == 0).all(axis=0).any()) for x in signals)  # a lead of zeros: refused, and said so
    assert card["records_per_corpus"] == {"synthetic": 8, "challenge": len(signals) - flat, "wfdb": windows}
    assert card["records"] == sum(card["records_per_corpus"].values()) and card["rejected"] == flat > 0
    assert card["patients"] == 4 + len(signals) - flat + 1  # the Challenge: one per recording; PTB: one folder
    start = json.loads((foundation / "card.json").read_text())
    assert card["continued_from"] == {"path": str(foundation), "sha256": start["sha256"]}
    for stage in ("vae", "twin"):  # a random model starts far above where the foundation ended
        assert card["stages"][stage]["first_loss"] < 0.5 * start["stages"][stage]["first_loss"], stage
    assert "continued from" in (tmp_path / "f" / "card.md").read_text()
    generator_works(tmp_path / "f")
    with pytest.raises(UserError, match="SOURCE=FOLDER"):
        Corpus.parse("cinc2021")


def test_a_frozen_foundation_stage_is_sent_never_trained_and_costs_nothing(consortium, sites, tmp_path, foundation,
                                                                           flower_identity):
    """Rounds vae=0, ibe=0, twin=1 from a foundation: the VAE and IBE reach the sites and the global model
    bit-identical, no reply carries them, and the sites' ledgers charge the twin stage only."""
    from safetensors.numpy import load_file
    from server.loop import run_federation

    grid = LocalGrid(sites)
    run_federation(grid, run_config(consortium, tmp_path / "out", **{"rounds-vae": 0, "rounds-ibe": 0,
                                                                      "foundation": str(foundation)}))
    for stage in ("vae", "ibe"):
        frozen, final = load_file(str(foundation / f"{stage}.safetensors")), load_file(
            str(tmp_path / "out" / "model" / f"{stage}.safetensors"))
        assert all(np.array_equal(frozen[k], final[k]) for k in frozen)
    twin_names = set(model_shapes("twin", consortium["config"]))
    assert grid.replies and all(set(arrays) == twin_names for arrays, _ in grid.replies)
    for site in SITES:
        assert ledger_rounds(sites, site) == [("twin", 1)]


def test_train_from_a_foundation_starts_from_its_weights(consortium, sites, tmp_path, foundation):
    from safetensors.numpy import load_file

    from ecgtwin.train.centralised import train_stage

    config = copy.deepcopy(consortium["config"])
    config.twin.steps, config.twin.lr = 1, 1e-12  # one step that cannot move the weights measurably
    train_stage("twin", config, sites / "site_a" / "store", tmp_path / "ckpt", progress=False, foundation=foundation)
    for stage in STAGES:
        start, got = load_file(str(foundation / f"{stage}.safetensors")), load_file(str(tmp_path / "ckpt" /
                                                                                        f"{stage}.safetensors"))
        for k in start:
            np.testing.assert_allclose(got[k], start[k], atol=1e-8, err_msg=f"{stage}/{k}")
    assert (tmp_path / "ckpt" / "conditioning.json").read_text() == (foundation / "conditioning.json").read_text()


def fine_tuning_config(consortium, tmp_path: Path, **trainable) -> Path:
    """The tiny experiment with `stage=mode` fine-tuning settings, as a config file."""
    config = copy.deepcopy(consortium["config"])
    for stage, mode in trainable.items():
        config.stage(stage).trainable = mode
        if mode == "modules":  # the twin stage's: one block's cross-attention and the output layer
            config.stage(stage).trainable_modules = ["blocks.0.cross_attn", "final_layer"]
    path = tmp_path / f"fine-tune-{'-'.join(f'{s}-{m}' for s, m in trainable.items())}.yaml"
    save_config(config, path)
    return path


@pytest.mark.parametrize("stage,mode", [("ibe", "condition"), ("twin", "condition"), ("twin", "lora"), ("twin", "bias"),
                                        ("twin", "modules")])
def test_a_condition_or_lora_dp_pass_changes_only_the_chosen_parameters(consortium, sites, tmp_path, foundation,
                                                                         stage, mode):
    """From a foundation's weights, a DP pass of `mode` moves its chosen tensors, leaves every other tensor
    bit-identical, and the reply carries the chosen tensors only."""
    from safetensors.numpy import load_file

    from ecgtwin.checkpoint import Checkpoint
    from ecgtwin.config import load_config
    from ecgtwin.models.finetune import trainable_names as pattern_names
    from ecgtwin.weights import build_module, start_from, trainable_names

    config = load_config(fine_tuning_config(consortium, tmp_path, **{stage: mode}))
    sent = {s: start_from(s, config, Checkpoint(foundation).load_arrays(s))
            for s in STAGES[: STAGES.index(stage) + 1]}
    site = open_site(sites, "site_a")
    reply, metrics, refusal = site.train(stage, 1, "run-ft", config_text(config), sent)
    assert refusal is None and set(metrics) == {"num-examples", "epsilon", "delta"}
    chosen = set(trainable_names(stage, config))
    module = build_module(stage, config)
    assert chosen == set(pattern_names(module, mode, config.stage(stage).trainable_modules))
    assert 0 < len(chosen) < len(sent[stage])
    if mode == "lora":
        assert all(".lora_" in n for n in chosen)
    elif mode == "modules":
        assert chosen == {n for n, _ in module.named_parameters()
                          if n.startswith(("blocks.0.cross_attn.", "final_layer."))}
    elif mode == "bias":  # every bias, the adaLN-Zero modulation's among them, and nothing else
        assert chosen == {n for n, p in module.named_parameters() if n.endswith(".bias")}
        assert "blocks.0.adaLN_modulation.1.bias" in chosen and "blocks.0.adaLN_modulation.1.weight" not in chosen
    else:
        pathway = type(module).CONDITION_PATHWAY
        assert all(any(part in pathway for part in n.split(".")) for n in chosen)
    assert set(reply) == chosen  # frozen tensors never leave the site
    kept = load_file(str(site.work / f"{stage}.safetensors"))  # the site's full weights after the pass
    frozen_names = set(sent[stage]) - chosen
    assert all(np.array_equal(kept[k], sent[stage][k]) for k in frozen_names)
    moved = [k for k in chosen if not np.array_equal(kept[k], sent[stage][k])]
    assert len(moved) == len(chosen), f"{len(chosen) - len(moved)} chosen tensors did not move"
    assert all(np.array_equal(reply[k], kept[k]) for k in chosen)


def test_a_federation_resumed_keeps_the_foundation_and_the_trainable_set(consortium, sites, tmp_path, foundation,
                                                                         flower_identity):
    """A LoRA fine-tuning of the twin stage from a foundation (VAE and IBE frozen): replies carry the
    adapters only, the base stays the foundation's bit for bit through a resumed second round, and a resume
    with another trainable set or another foundation is refused."""
    from safetensors.numpy import load_file
    from server.loop import run_federation

    from ecgtwin.config import ConfigError, load_config
    from ecgtwin.weights import trainable_names

    lora = fine_tuning_config(consortium, tmp_path, twin="lora")
    out = tmp_path / "out"
    settings = {"config": str(lora), "rounds-vae": 0, "rounds-ibe": 0, "foundation": str(foundation)}
    grid = LocalGrid(sites)
    run_federation(grid, run_config(consortium, out, **settings))
    run_federation(grid, run_config(consortium, out, **{**settings, "rounds-twin": 2}))  # resumed: round 2 only
    assert [(s, r) for s, r, _ in grid.sent][::3] == [("twin", 1), ("twin", 2)]
    adapters = set(trainable_names("twin", load_config(lora)))
    assert grid.replies and all(set(arrays) == adapters for arrays, _ in grid.replies)
    base, final = load_file(str(foundation / "twin.safetensors")), load_file(str(out / "model" / "twin.safetensors"))
    assert all(np.array_equal(base[k], final[k]) for k in base)
    assert any(not np.array_equal(final[k], 0 * final[k]) for k in adapters if ".lora_b." in k)  # B moved from 0
    assert RunState.load(out).start["trainable"] == {"vae": "frozen", "ibe": "frozen", "twin": "lora-r4"}
    generator_works(out / "model")
    condition = fine_tuning_config(consortium, tmp_path, twin="condition")
    with pytest.raises(ConfigError, match="another trainable set"):
        run_federation(LocalGrid(sites), run_config(consortium, out, **{**settings, "config": str(condition),
                                                                        "rounds-twin": 3}))
    other = tmp_path / "other-foundation"
    shutil.copytree(foundation, other)
    weights = load_file(str(other / "ibe.safetensors"))
    from safetensors.numpy import save_file
    save_file({k: v + 1e-3 for k, v in weights.items()}, str(other / "ibe.safetensors"))
    with pytest.raises(ConfigError, match="another foundation"):
        run_federation(LocalGrid(sites), run_config(consortium, out, **{**settings, "foundation": str(other),
                                                                        "rounds-twin": 3}))
    for site in SITES:
        assert ledger_rounds(sites, site) == [("twin", 1), ("twin", 2)]


def test_one_run_config_builder_for_every_command(tmp_path):
    """The CLI's federate, the demo and the benchmarks build their run through simulation_settings: paths
    absolute, rounds per stage (missing: 0), and a run config the server reads back to the same settings."""
    from ecgtwin.config import ConfigError
    from ecgtwin.coordinator.settings import FederationSettings, simulation_settings

    settings = simulation_settings("configs/demo.yaml", tmp_path / "run", "sites", {"ibe": 2}, None,
                                   strategy="fedprox", min_nodes=3)
    run_config = settings.to_run_config()
    assert run_config["rounds-vae"] == 0 and run_config["rounds-ibe"] == 2 and run_config["rounds-twin"] == 0
    assert Path(run_config["sites-root"]).is_absolute() and run_config["foundation"] == ""
    assert FederationSettings.from_run_config(run_config) == settings
    assert all(isinstance(v, (str, int, float, bool)) for v in run_config.values())  # Flower's value types
    with pytest.raises(ConfigError, match="unknown stage 'vea'"):
        simulation_settings("c.yaml", "o", "s", {"vea": 1})


def test_train_with_a_policy_is_a_pass_through_the_site(consortium, sites, tmp_path):
    """`ecgtwin train --policy` runs each round as Site.train does in a federation: the same request again
    (the same start, into another folder) is the same keyed pass, answered with its kept outcome at no
    second charge and with the same bytes; --steps cannot override the officer's local steps."""
    from safetensors.numpy import load_file

    from ecgtwin.cli import main

    unseeded(sites)
    config_path = tmp_path / "tiny.yaml"
    save_config(consortium["config"], config_path)
    args = ["train", "--config", str(config_path), "--stage", "vae", "--store", str(sites / "site_a" / "store"),
            "--policy", str(sites / "site_a" / "privacy.yaml"), "--no-progress", "--json"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    ledger = open_site(sites, "site_a").ledger
    assert [(e["run"], e["stage"]) for e in ledger.entries()] == [("train --policy", "vae")]
    assert main([*args, "--out", str(tmp_path / "two")]) == 0
    assert len(ledger.entries()) == 1
    one, two = (load_file(str(tmp_path / d / "vae.safetensors")) for d in ("one", "two"))
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert main([*args, "--out", str(tmp_path / "three"), "--steps", "5"]) == 1
