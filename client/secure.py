"""Distributed DP through Flower's SecAgg+ at the site: the ClientApp's side of a secure round.

A site whose policy sets `distributed_sites: K` adds only its share sigma / sqrt(K) of the noise, so its update
must never be seen alone: it trains only inside a SecAgg+ round (Flower's `secaggplus_mod`, which masks the
reply so that the server learns the sum only), and before it hands over the key shares that unmask the sum it
checks that the sum holds at least K sites, none of them dropped (a dropped site's masks would be removed and
the sum would carry less noise), and that this pass was never unmasked with another set of sites (two sums
over different sets would tell the difference). Everything a refusal sends is the site's fixed text.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from ecgtwin.checkpoint import atomic_write
from ecgtwin.config import config_from_text
from ecgtwin.site import Site, check_reply
from ecgtwin.weights import model_shapes, pack, trainable_shapes, unpack

ERROR_CODE = 0  # flwr.common.constant.ErrorCode.UNKNOWN: a refusal is the site's decision, not a crash
PASS_RECORD = "ecgtwin.secure"  # in the node's context state: the pass this Flower run's secure round trains
FITINS_CONFIG = "fitins.config"  # what compat.fitins_to_recorddict names the instructions


class Refused(Exception):
    """The site does not take part in this secure round; the text is the reason the server gets."""


def is_secure_round(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation_mod(site_of: Callable[[Context], Site]):
    """The ClientApp mod: plain messages pass through; SecAgg+ ones go through Flower's secaggplus_mod, with
    the site's checks before it unmasks. Any failure becomes an error reply with a fixed text."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        if not is_secure_round(msg):
            return call_next(msg, ctxt)
        try:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            if configs.get(Key.STAGE) == Stage.UNMASK:
                check_unmask(site_of(ctxt), ctxt, configs)
            return secaggplus_mod(msg, ctxt, call_next)
        except Refused as refusal:
            return Message(Error(code=ERROR_CODE, reason=str(refusal)), reply_to=msg)
        except Exception as exc:  # noqa: BLE001  its text may hold paths or data: it stays at the site
            print(f"client.secure: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return Message(Error(code=ERROR_CODE, reason="site error: secure aggregation failed"), reply_to=msg)

    return mod


def check_unmask(site: Site, ctxt: Context, configs: ConfigRecord) -> None:
    """Raise Refused unless the sum to be unmasked holds at least the policy's K sites, none dropped, and the
    same set as any earlier unmasking of this pass (a retried round)."""
    need = site.policy.distributed_sites or 2
    active = sorted(int(n) for n in configs.get(Key.ACTIVE_NODE_ID_LIST, []))
    dead = list(configs.get(Key.DEAD_NODE_ID_LIST, []))
    if dead or len(active) < need:
        raise Refused(f"{site.name}: secure aggregation: the sum would hold {len(active)} sites "
                      f"({len(dead)} dropped); the site's policy needs {need} and none dropped: not unmasking")
    if PASS_RECORD not in ctxt.state.config_records:
        raise Refused(f"{site.name}: secure aggregation: no pass of this site in this round: not unmasking")
    record = site.folder.passes / str(ctxt.state.config_records[PASS_RECORD]["key"]) / "unmasked.json"
    if record.is_file() and json.loads(record.read_text()) != active:
        raise Refused(f"{site.name}: secure aggregation: this pass was unmasked with another set of sites; "
                      "a second sum would tell the difference: not unmasking")
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record, json.dumps(active).encode())


def secure_train(site: Site, msg: Message, ctxt: Context) -> Message:
    """The COLLECT stage's pass (called by secaggplus_mod): the legacy FitIns in, the site's update (its new
    weights minus the received ones) out as FitRes for the mod to mask; weight 1, so no count is in the sum."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    stage, config_yaml = str(config["stage"]), str(config["config-yaml"])
    experiment = config_from_text(config_yaml)
    names = str(config["stages"]).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    weights = {s: unpack(a, model_shapes(s, experiment)) for s, a in zip(names, arrays, strict=True)}
    new, metrics, refusal = site.train(stage, int(config["round"]), str(config["run-id"]), config_yaml, weights,
                                       secure=True)
    if refusal is not None:
        raise Refused(refusal)
    ctxt.state.config_records[PASS_RECORD] = ConfigRecord({"key": str(site.last_key)})
    check_reply(stage, experiment, new, metrics, private=site.policy.private)
    shapes = trainable_shapes(stage, experiment)
    update = pack(new, shapes).astype(np.float64) - pack({k: weights[stage][k] for k in shapes}, shapes)
    res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters([update]),
                 num_examples=1, metrics={**metrics, "site": site.name})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def is_fitins(msg: Message) -> bool:
    return FITINS_CONFIG in msg.content.config_records

