"""ecgtwin ClientApp: one local (DP) pass of a stage at this site, per train message.

The node config of the SuperNode says where the site's data and policy are (data-path, policy-path,
optional state-path); in simulation the paths come from the partition-id and the run config's sites-root.
The site's own policy decides steps and noise (ecgtwin.site.Site); the server only sends weights, the stage,
the round, the run name and the experiment config. A site with distributed DP trains only inside a SecAgg+
round (client.secure). Every reply passes ecgtwin.site.check_reply: arrays
whose names and shapes are the model's, and allowlisted aggregate metrics, nothing else.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure import is_fitins, secure_aggregation_mod, secure_train
from ecgtwin.config import STAGES, ExperimentConfig, config_from_text
from ecgtwin.site import Site, check_reply, site_failure
from ecgtwin.weights import FLAT, model_shapes, pack, trainable_shapes, unpack


def make_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; `run_config` fills in run-config keys the context lacks (flwr.simulation.run_simulation
    gives the apps an empty run config)."""
    defaults = dict(run_config or {})
    app = ClientApp(mods=[secure_aggregation_mod(lambda context: _site(context, defaults))])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if is_fitins(msg):  # a SecAgg+ round's pass (client.secure): its failures are the mod's to answer
            return secure_train(_site(context, defaults), msg, context)
        site = None
        try:  # everything, opening the site and reading the message too: no exception text leaves the site
            site = _site(context, defaults)
            stage, server_round, run_id, config_yaml, experiment, weights = _read(msg)
            mu = float(msg.content["config"].get("proximal-mu", 0.0))  # FedProx; 0 for the other strategies
            new, metrics, refusal = site.train(stage, server_round, run_id, config_yaml, weights, proximal_mu=mu)
            content = reply_content(stage, experiment, site.name, new, metrics, refusal, site.policy.private)
        except Exception as exc:  # noqa: BLE001  its text may hold paths or data: it stays at the site
            content = refusal_content(site.name if site is not None else "unknown", site_failure(site, exc))
        return Message(content, reply_to=msg)

    return app


def refusal_content(site: str, reason: str) -> RecordDict:
    """A reply that trains nothing: the flag, the site's name and the reason, checked like any other."""
    info = {"site": site, "reason": reason}
    check_reply("", None, None, {"refused": 1}, info)  # type: ignore[arg-type]  no arrays: no model needed
    return RecordDict({"metrics": MetricRecord({"refused": 1}), "info": ConfigRecord(info)})


def reply_content(stage: str, config: ExperimentConfig, site: str, new: Mapping | None, metrics: Mapping,
                  refusal: str | None, private: bool = True) -> RecordDict:
    """The whole reply: checked against the allowlist right before it is built."""
    if refusal is not None:
        return refusal_content(site, refusal)
    info = {"site": site}
    check_reply(stage, config, new, metrics, info, private=private)
    packed = pack(new, trainable_shapes(stage, config))  # the checked tensors, in the model's order
    return RecordDict({"arrays": ArrayRecord({FLAT: Array(packed)}),
                       "metrics": MetricRecord(dict(metrics)), "info": ConfigRecord(info)})


def _site(context: Context, defaults: Mapping[str, Any]) -> Site:
    run_config = {**defaults, **dict(context.run_config)}
    return Site.from_node_config(dict(context.node_config), run_config)


def _read(msg: Message) -> tuple[str, int, str, str, ExperimentConfig, dict]:
    """The message's stage, round, run id, experiment config (as sent and parsed) and global weights."""
    content = msg.content
    config = content["config"]
    stage, config_yaml = str(config["stage"]), str(config["config-yaml"])
    experiment = config_from_text(config_yaml)
    weights = {s: unpack(content[s][FLAT].numpy(), model_shapes(s, experiment))
               for s in STAGES if s in content.array_records}
    return stage, int(config["round"]), str(config["run-id"]), config_yaml, experiment, weights


app = make_app()
