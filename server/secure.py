"""A round through Flower's SecAgg+ (distributed DP): the server learns only the mean of the sites' updates.

Each site with `distributed_sites: K` releases one noisy clipped gradient sum with its noise share sigma /
sqrt(K); SecAgg+ masks every update so that only their mean is ever unmasked, and that mean carries the noise
sigma the sites charge. Flower's SecAggPlusWorkflow drives the four stages (setup, share keys, collect masked
vectors, unmask) on a LegacyContext; the legacy strategy below only hands it the instructions and keeps the
unmasked mean, and the run's FedAdam then steps from the global weights along it (post-processing). Every
sampled site must take part (reconstruction threshold: all), so a sum without a site's noise is never formed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from ecgtwin.config import STAGES, ExperimentConfig, config_text
from ecgtwin.coordinator.settings import FederationSettings
from ecgtwin.weights import FLAT, model_shapes, pack

QUANTIZATION_RANGE = 1 << 22  # SecAgg+'s levels per coordinate (its default): K sites x 2^22 < its 2^32 modulus


@dataclasses.dataclass
class _Node:  # what the workflow needs of a legacy ClientProxy: the node id
    node_id: int


class _SecureMean(Strategy):
    """Legacy strategy for SecAggPlusWorkflow: the same instructions to every node; keeps the unmasked mean."""

    def __init__(self, nodes: list[int], fitins: FitIns) -> None:
        self.nodes, self.fitins = nodes, fitins
        self.mean: np.ndarray | None = None
        self.metrics: list[tuple[int, dict]] = []

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001  (Flower's signature)
        return [(_Node(n), self.fitins) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001
        if results:  # every result carries the same unmasked mean (the workflow's backward compatibility)
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
            self.metrics = [(proxy.node_id, dict(res.metrics)) for proxy, res in results]
        return None, {}

    def initialize_parameters(self, client_manager):  # noqa: ANN001
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001
        return None


class _Recorded:
    """The grid, recording each node's error reply (a site's refusal reason, or its fixed failure text)."""

    def __init__(self, grid: Any) -> None:
        self.grid, self.errors = grid, {}

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            if reply.has_error():
                node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.errors[node] = reply.error.reason or str(reply.error.code)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def secure_mean(grid: Any, settings: FederationSettings, weights: dict, stage: str, rnd: int,
                experiment: ExperimentConfig, nodes: list[int]) -> tuple[np.ndarray | None, list[dict], dict[int, str]]:
    """One SecAgg+ round of `stage` on `nodes`: (the mean of the sites' updates, flat over the stage's
    trainable tensors, or None if nothing was unmasked; each site's reported metrics; each node's error)."""
    sent = [s for s in STAGES[: STAGES.index(stage) + 1] if s in weights]
    config = {"stage": stage, "round": rnd, "run-id": settings.run_name, "config-yaml": config_text(experiment),
              "stages": ",".join(sent)}
    fitins = FitIns(ndarrays_to_parameters([pack(weights[s], model_shapes(s, experiment)) for s in sent]), config)
    strategy = _SecureMean(nodes, fitins)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    recorded = _Recorded(grid)
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=1.0, max_weight=1.0,
                       clipping_range=settings.secagg_clipping_range, quantization_range=QUANTIZATION_RANGE,
                       timeout=settings.round_timeout)(recorded, context)
    reports = [{"site": str(m.pop("site", f"node {node}")), "node_id": node, **m} for node, m in strategy.metrics]
    return strategy.mean, reports, recorded.errors


def step_reply(current_flat: np.ndarray, mean: np.ndarray) -> Message:
    """The unmasked mean as one reply for the run's strategy (FedAdam: its pseudo-gradient is `mean`)."""
    arrays = (current_flat.astype(np.float64) + mean).astype(current_flat.dtype)
    return Message(RecordDict({"arrays": ArrayRecord({FLAT: Array(arrays)}),
                               "metrics": MetricRecord({"num-examples": 1})}), dst_node_id=0,
                   message_type=MessageType.TRAIN)

