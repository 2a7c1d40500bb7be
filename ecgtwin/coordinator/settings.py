"""A federated run's settings: Flower's run config (flat keys with dashes, values str/int/float/bool)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from ecgtwin.config import STAGES, ConfigError, ExperimentConfig, load_config

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")


class FederationError(RuntimeError):
    """The run cannot go on (e.g. fewer sites replied than the configured minimum)."""


@dataclasses.dataclass
class FederationSettings:
    config: str = "configs/demo.yaml"
    out: str = "federation-output"
    run_name: str = "ecgtwin"
    rounds_vae: int = 1
    rounds_ibe: int = 1
    rounds_twin: int = 1
    strategy: str = "fedavg"
    min_nodes: int = 2
    node_wait: float = 120.0  # seconds to wait for min_nodes SuperNodes to connect
    rejoin_wait: float = 0.0  # seconds a round waits for the nodes that took part before to be back
    round_timeout: float = 3600.0  # seconds to wait for the replies of one round
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam's eta
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each tail
    sites_root: str = ""  # simulation only: <sites-root>/<site>/{store,privacy.yaml,state}
    foundation: str = ""  # an `ecgtwin pretrain` folder: stages start from its weights (rounds 0: used frozen)
    # distributed DP: each round through Flower's SecAgg+ (the server learns the sum of the sites' updates only)
    secure_aggregation: bool = False
    secagg_clipping_range: float = 16.0  # SecAgg+ quantises each update coordinate within +-this

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], base: Path | None = None) -> "FederationSettings":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in fields:
                kind = type(fields[name].default)
                values[name] = _boolean(key, value) if kind is bool else kind(value) if kind is not str else str(value)
        settings = cls(**values)
        if settings.strategy not in STRATEGIES:
            raise ConfigError(f"run config: strategy: must be one of {', '.join(STRATEGIES)}, got {settings.strategy!r}")
        if settings.min_nodes < 1:
            raise ConfigError(f"run config: min-nodes: must be >= 1, got {settings.min_nodes}")
        for stage in STAGES:
            if settings.rounds(stage) < 0:
                raise ConfigError(f"run config: rounds-{stage}: must be >= 0, got {settings.rounds(stage)}")
        if settings.secure_aggregation and settings.strategy != "fedadam":
            raise ConfigError(f"run config: secure-aggregation: the sites release noisy gradient sums and the server "
                              f"steps on their sum with fedadam; set strategy = \"fedadam\", not {settings.strategy!r}")
        if not settings.secagg_clipping_range > 0:
            raise ConfigError(f"run config: secagg-clipping-range: must be > 0, got {settings.secagg_clipping_range}")
        if not 0 <= settings.trim_beta < 0.5:
            raise ConfigError(f"run config: trim-beta: must be in [0, 0.5), got {settings.trim_beta}")
        return settings

    def rounds(self, stage: str) -> int:
        return getattr(self, f"rounds_{stage}")

    def to_run_config(self) -> dict[str, Any]:
        """Flower's run config of these settings (flat keys with dashes): what `flwr run --run-config`, the
        simulation and `from_run_config` take."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def config_path(self, base: Path | None = None) -> Path:
        """The experiment YAML: absolute, else relative to the working directory, else to `base` (the app)."""
        path = Path(self.config)
        if path.is_absolute() or path.is_file() or base is None:
            return path
        return base / path

    def load_config(self, base: Path | None = None) -> ExperimentConfig:
        return load_config(self.config_path(base))


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"run config: {key}: must be true or false, got {value!r}")


def simulation_settings(config: str | Path, out: str | Path, sites_root: str | Path,
                        rounds: Mapping[str, int] | Sequence[int], foundation: str | Path | None = None,
                        **settings: Any) -> FederationSettings:
    """The one way a command builds a simulated run (the CLI's federate, the demo, the benchmarks): paths
    made absolute, rounds per stage (a mapping, or one number per stage in STAGES order; absent: 0), and any
    other FederationSettings field by name."""
    per_stage = dict(rounds) if isinstance(rounds, Mapping) else dict(zip(STAGES, rounds))
    unknown = sorted(set(per_stage) - set(STAGES))
    if unknown:
        raise ConfigError(f"rounds: unknown stage {unknown[0]!r} (known: {', '.join(STAGES)})")
    return FederationSettings(config=str(Path(config).resolve()), out=str(Path(out).resolve()),
                              sites_root=str(Path(sites_root).resolve()),
                              foundation=str(Path(foundation).resolve()) if foundation else "",
                              **{f"rounds_{s}": int(per_stage.get(s, 0)) for s in STAGES}, **settings)
