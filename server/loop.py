"""The federation loop: for stage in vae, ibe, twin; for each round: send, collect, filter, aggregate,
checkpoint. The state it keeps and writes lives in ecgtwin.coordinator (no Flower there)."""

from __future__ import annotations

import time
import traceback
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from ecgtwin.config import STAGES
from ecgtwin.checkpoint import Checkpoint
from ecgtwin.config import ExperimentConfig, config_text
from ecgtwin.coordinator.metrics import round_entry, write_metrics
from ecgtwin.coordinator.model import save_global_model
from ecgtwin.coordinator.settings import FederationError, FederationSettings
from ecgtwin.coordinator.state import RunState, open_run
from ecgtwin.coordinator.status import write_status
from ecgtwin.weights import FLAT, initial_weights, model_shapes, pack, start_from, trainable_shapes, unpack
from ecgtwin.site import ALLOWED_METRICS

APP_DIR = Path(__file__).resolve().parents[1]  # the FAB (or repository) root: relative config paths
POLL_S = 0.2  # between pulls of replies: short against a round, long against a SuperLink request


def make_strategy(settings: FederationSettings) -> FedAvg:
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                  min_available_nodes=1, weighted_by_key="num-examples", arrayrecord_key="arrays")
    if settings.strategy == "fedprox":
        return FedProx(**common, proximal_mu=settings.proximal_mu)
    if settings.strategy == "fedadam":
        return FedAdam(**common, eta=settings.server_lr)
    if settings.strategy == "fedmedian":
        return FedMedian(**common)
    if settings.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=settings.trim_beta)
    return FedAvg(**common)


def run_federation(grid: Grid, run_config: Mapping[str, Any], flower_run_id: int | None = None) -> Path:
    settings = FederationSettings.from_run_config(run_config)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model = _run(grid, settings, out)
    except Exception as exc:
        write_status(out, "failed", f"{type(exc).__name__}: {exc}", flower_run_id=flower_run_id,
                     traceback=traceback.format_exc())
        log(WARNING, "ecgtwin federation failed: %s", exc)
        raise
    write_status(out, "finished", f"global model in {model}", flower_run_id=flower_run_id, model=str(model))
    return model


def _run(grid: Grid, settings: FederationSettings, out: Path) -> Path:
    config = settings.load_config(APP_DIR)
    state, resumed = open_run(out, settings, config)
    write_status(out, "running", f"resumed after {state.last()}" if resumed else "started")
    if resumed:
        log(INFO, "ecgtwin: resuming %s from its checkpoint: rounds done %s", out, state.completed)
    for stage in STAGES:
        rounds = 0 if config.stage(stage).trainable == "frozen" else settings.rounds(stage)
        if stage not in state.weights and settings.foundation:  # public weights: the start, or frozen as they are
            state.weights[stage] = start_from(stage, config, Checkpoint(settings.foundation).load_arrays(stage))
        if rounds == 0:
            continue
        if stage not in state.weights:
            state.weights[stage] = initial_weights(stage, config)
        shapes = trainable_shapes(stage, config)  # a reply carries these only; the rest stays as sent
        strategy = make_strategy(settings)
        if isinstance(strategy, FedAdam) and stage in state.moments:
            strategy.m_t = state.moments[stage].get("m") or None
            strategy.v_t = state.moments[stage].get("v") or None
        for rnd in range(1, rounds + 1):
            if state.done(stage, rnd):
                continue
            _round(grid, settings, state, stage, rnd, config, shapes, strategy)
            if isinstance(strategy, FedAdam):
                state.moments[stage] = {"m": dict(strategy.m_t or {}), "v": dict(strategy.v_t or {})}
            state.completed.append((stage, rnd))
            state.save(out)  # atomic: the round is done only once this file is replaced
            write_metrics(out, state.history)
    trained = [s for s in STAGES if s in state.weights]
    model = save_global_model(out / "model", config, {s: state.weights[s] for s in trained})
    log(INFO, "ecgtwin: global model (%s) saved to %s", ", ".join(trained), model)
    return model


def _round(grid: Grid, settings: FederationSettings, state: RunState, stage: str, rnd: int,
           experiment: ExperimentConfig, shapes: dict, strategy: FedAvg) -> None:
    started = time.perf_counter()
    nodes = _wait_for_nodes(grid, settings.min_nodes, settings.node_wait)
    nodes = _wait_for_rejoin(grid, nodes, state.nodes_seen(), settings.rejoin_wait)
    if settings.secure_aggregation:
        state.weights[stage], reports, refused, failed = _secure_round(grid, settings, state, stage, rnd, experiment,
                                                                       shapes, strategy, nodes)
    else:
        state.weights[stage], reports, refused, failed = _plain_round(grid, settings, state, stage, rnd, experiment,
                                                                      shapes, strategy, nodes)
    entry = round_entry(stage, rnd, reports, refused, failed, time.perf_counter() - started, settings.strategy)
    state.history.append(entry)
    log(INFO, "ecgtwin: %s round %d done in %.1f s: %d sites, mean loss %s, epsilon %s", stage, rnd,
        entry["seconds"], len(reports), entry["loss"],
        {s: round(r["epsilon"], 3) for s, r in entry["sites"].items() if "epsilon" in r} or "n/a")


def _plain_round(grid: Grid, settings: FederationSettings, state: RunState, stage: str, rnd: int,
                 experiment: ExperimentConfig, shapes: dict, strategy: FedAvg, nodes: list[int]) -> tuple:
    """Send the global weights, collect and check each site's reply, aggregate: (weights, reports, refused,
    failed)."""
    text = config_text(experiment)
    content = RecordDict({s: ArrayRecord({FLAT: Array(pack(state.weights[s], model_shapes(s, experiment)))})
                          for s in STAGES[: STAGES.index(stage) + 1]})
    config = {"stage": stage, "round": rnd, "run-id": settings.run_name, "config-yaml": text}
    if settings.strategy == "fedprox":
        config["proximal-mu"] = settings.proximal_mu
    content["config"] = ConfigRecord(config)
    messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN, group_id=f"{stage}-{rnd}",
                        ttl=settings.round_timeout) for n in nodes]
    log(INFO, "ecgtwin: %s round %d/%d: sending to %d sites", stage, rnd, settings.rounds(stage), len(nodes))
    replies = exchange(grid, messages, settings.round_timeout)
    accepted, reports, refused, failed = [], [], {}, []
    for node, reply in replies.items():
        if reply is None:
            failed.append(f"node {node}: no reply within {settings.round_timeout:g} s")
            continue
        if reply.has_error():  # e.g. the node went away: the SuperLink answers for it (as node 0)
            failed.append(f"node {node}: {reply.error.reason.strip().splitlines()[-1] if reply.error.reason else reply.error.code}")
            continue
        site = str(reply.content["info"]["site"]) if "info" in reply.content.config_records else f"node {node}"
        metrics = dict(reply.content["metrics"]) if "metrics" in reply.content.metric_records else {}
        if metrics.get("refused"):
            refused[site] = str(reply.content["info"].get("reason", "no reason given"))
            continue
        problem = _check(reply, shapes, metrics)
        if problem:
            failed.append(f"{site} (node {node}): reply dropped: {problem}")
            continue
        accepted.append(reply)
        reports.append({"site": site, "node_id": node, **metrics})
    for site, reason in refused.items():
        log(WARNING, "ecgtwin: %s refused %s round %d: %s", site, stage, rnd, reason)
    for problem in failed:
        log(WARNING, "ecgtwin: %s round %d: %s", stage, rnd, problem)
    if len(accepted) < settings.min_nodes:
        raise FederationError(
            f"{stage} round {rnd}: only {len(accepted)} of {len(nodes)} sites returned weights, fewer than "
            f"min-nodes {settings.min_nodes} (refused: {refused or 'none'}; failed: {failed or 'none'}); the "
            f"checkpoint holds the last completed round, restart to resume")
    return _aggregate(strategy, rnd, state.weights[stage], accepted, shapes), reports, refused, failed


def _secure_round(grid: Grid, settings: FederationSettings, state: RunState, stage: str, rnd: int,
                  experiment: ExperimentConfig, shapes: dict, strategy: FedAvg, nodes: list[int]) -> tuple:
    """The round through SecAgg+ (server.secure): the strategy steps along the unmasked mean update."""
    from server.secure import secure_mean, step_reply

    log(INFO, "ecgtwin: %s round %d/%d: secure aggregation with %d sites", stage, rnd, settings.rounds(stage),
        len(nodes))
    mean, reports, errors = secure_mean(grid, settings, state.weights, stage, rnd, experiment, nodes)
    failed = [f"node {node}: {reason.strip().splitlines()[-1] if reason.strip() else 'error'}"
              for node, reason in errors.items()]
    size = sum(int(np.prod(shape)) for shape in shapes.values())
    problems = [p for p in (unlisted_metrics(r, also=frozenset({"site", "node_id"})) for r in reports) if p]
    if mean is None or len(reports) < max(2, settings.min_nodes) or problems:
        raise FederationError(
            f"{stage} round {rnd}: secure aggregation unmasked no sum of at least {max(2, settings.min_nodes)} "
            f"sites (failed: {failed or 'none'}; problems: {problems or 'none'}); the checkpoint holds the last "
            f"completed round, restart to resume")
    if mean.shape != (size,) or not np.all(np.isfinite(mean)):
        raise FederationError(f"{stage} round {rnd}: the unmasked mean is not {size} finite values")
    weights = _aggregate(strategy, rnd, state.weights[stage], [step_reply(pack(state.weights[stage], shapes), mean)],
                         shapes)
    return weights, reports, {}, failed


def exchange(grid: Grid, messages: list[Message], timeout: float, poll_s: float = POLL_S) -> dict[int, Message | None]:
    """Send, then collect each node's reply (None where none came within `timeout`), keyed by the node the
    message went to: a reply is matched to its message, not to its sender, because the SuperLink itself
    answers for a node that went away. Polls every `poll_s` (send_and_receive waits 3 s between pulls)."""
    pushed = set(grid.push_messages(messages)) - {None}  # a message that was not pushed gets no reply
    ids = [m.metadata.message_id for m in messages]
    node_of = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
    replies: dict[str, Message] = {}
    ids = [mid for mid in ids if mid in pushed]
    deadline = time.monotonic() + timeout
    while len(replies) < len(ids):
        for reply in grid.pull_messages([i for i in ids if i not in replies]):
            replies[reply.metadata.reply_to_message_id] = reply
        if len(replies) == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return {node: replies.get(mid) for mid, node in node_of.items()}


def unlisted_metrics(metrics: dict, also: frozenset[str] = frozenset()) -> str | None:
    """The server's allowlist of what a site reports (plus `also`: what the server itself adds)."""
    unknown = sorted(set(metrics) - ALLOWED_METRICS - also)
    return f"metrics outside the allowlist: {unknown}" if unknown else None


def _check(reply: Message, shapes: dict, metrics: dict) -> str | None:
    """The server's own check of a site's reply (the site checks before sending, too)."""
    if "arrays" not in reply.content.array_records:
        return "no weights"
    arrays = reply.content["arrays"]
    if set(arrays.keys()) != {FLAT}:
        return "array names are not the model's"
    try:
        unpack(arrays[FLAT].numpy(), shapes)
    except ValueError as exc:
        return f"weights: {exc}"
    if not np.all(np.isfinite(arrays[FLAT].numpy())):
        return "non-finite weights"
    if (problem := unlisted_metrics(metrics)) is not None:
        return problem
    if not metrics.get("num-examples", 0) > 0:
        return "num-examples missing or 0"
    return None


def _aggregate(strategy: FedAvg, rnd: int, current: dict, replies: list[Message], shapes: dict) -> dict:
    """The strategy's aggregate_train on the accepted replies (the trainable tensors, packed: every strategy
    here works element by element), reduced to weights and the weighting count, merged into the global
    weights (frozen tensors stay bit-identical)."""
    for reply in replies:
        reply.content = RecordDict({"arrays": reply.content["arrays"],
                                    "metrics": MetricRecord({"num-examples": reply.content["metrics"]["num-examples"]})})
    if hasattr(strategy, "current_arrays"):  # FedOpt family: the server optimiser steps from the global weights
        strategy.current_arrays = {FLAT: pack(current, shapes)}
    arrays, _ = strategy.aggregate_train(rnd, replies)
    if arrays is None:
        raise FederationError(f"round {rnd}: the strategy aggregated nothing")
    merged = unpack(np.asarray(arrays[FLAT].numpy()), shapes)
    return {**current, **{k: v.astype(current[k].dtype, copy=False) for k, v in merged.items()}}


def _wait_for_rejoin(grid: Grid, nodes: list[int], seen: set[int], wait: float) -> list[int]:
    """Up to `wait` s more for nodes that took part in earlier rounds and are not connected now (a restarted
    SuperNode comes back with its node id); the round goes ahead without those still away."""
    deadline = time.monotonic() + wait
    while not seen <= set(nodes) and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    return nodes


def _wait_for_nodes(grid: Grid, minimum: int, wait: float) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(nodes) < minimum:
        raise FederationError(f"only {len(nodes)} SuperNodes connected after {wait:g} s, min-nodes is {minimum}")
    return nodes
