"""One configuration schema for experiments, loaded from YAML and validated with clear errors.

The schema is a tree of small dataclasses (nanoGPT style). Unknown keys, wrong types and values out of
range are errors that name the file and the key, e.g. `configs/demo.yaml: twin.lr: must be > 0, got -1`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ecgtwin.compute import PRECISIONS
from ecgtwin.errors import UserError
from ecgtwin.models import ModelConfig
from ecgtwin.models.diffusion import SAMPLERS
from ecgtwin.models.dit import INJECTORS
from ecgtwin.models.finetune import MODES as FINETUNE_MODES

T = TypeVar("T")

# The training stages, in the order they are trained and depend on each other: the one definition.
STAGES = ("vae", "ibe", "twin")


class ConfigError(UserError):
    """A configuration that cannot be used; the message names the file and the key."""


@dataclasses.dataclass
class DataConfig:
    n_samples: int = 1024
    duration_s: float = 10.0
    held_out_fraction: float = 0.1  # patients kept out of training, for the tests of generalisation
    # seed of the patient-level held-out split: ONE split for every stage and for the privacy planner, so
    # that all stages train on (and the accountant counts) the same patients
    split_seed: int = 0


@dataclasses.dataclass
class TextConfig:
    encoder: str = "bundled:all-MiniLM-L6-v2"  # or a local sentence-transformers model folder
    max_statements: int = 8  # condition tokens per record


@dataclasses.dataclass
class StageConfig:
    """What every stage's local pass has: optimiser, schedule, logging, and the seed of its initial weights
    (and of its non-private batches)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    # what a pass trains (ecgtwin.models.finetune): all | condition | lora | bias | modules | frozen (used as is, e.g.
    # from a foundation: not trained, not sent, no privacy cost); lora_rank is the adapters' rank,
    # trainable_modules the dotted module names that `modules` trains
    trainable: str = "all"
    lora_rank: int = 4
    trainable_modules: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.trainable == "modules" and not self.trainable_modules:
            raise ValueError("trainable: modules needs trainable_modules (dotted module names, e.g. blocks.1.cross_attn)")
        if self.trainable_modules and self.trainable != "modules":
            raise ValueError(f"trainable_modules is only read by trainable: modules, not {self.trainable!r}")


@dataclasses.dataclass
class VAEStageConfig(StageConfig):
    kl_max: float = 1e-4  # KL weight, reached after a linear ramp
    kl_ramp_steps: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trainable in ("condition", "lora"):  # a convolutional auto-encoder of the signal alone
            raise ValueError(f"trainable: the VAE has no condition pathway and no attention or MLP projections "
                             f"for {self.trainable!r}; use all or frozen")


@dataclasses.dataclass
class IBEStageConfig(StageConfig):
    temperature: float = 0.1  # InfoNCE (non-private) and the public-negative objective (DP)


@dataclasses.dataclass
class TwinStageConfig(StageConfig):
    cond_dropout: float = 0.1  # classifier-free guidance: drop the condition / the person
    base_dropout: float = 0.1
    noise_draws: int = 1  # (t, noise) draws per record, averaged before clipping ("noise multiplicity")


@dataclasses.dataclass
class GenerateConfig:
    sampler: str = "dpm++"  # ddpm (all 1000 steps) | ddim | dpm++ (DPM-Solver++ 2M)
    steps: int = 25
    guidance_condition: float = 1.0
    guidance_person: float = 1.0
    out_fs: float = 500.0
    # derived: project the decoder's six limb leads onto the plane that Einthoven's and Goldberger's
    # laws allow (ecgtwin.data.signal.project_limb_leads); raw: the decoder's leads as they are.
    limb_leads: str = "derived"


@dataclasses.dataclass
class ComputeConfig:
    """How the passes compute on their device (ecgtwin.compute); the device itself is each command's --device."""

    precision: str = "fp32"  # fp32 | bf16: autocast of the forward passes; DP clipping and noise stay in fp32
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (no effect on the CPU)
    compile: bool = False  # torch.compile the denoiser for generation and non-private training


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "demo"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vae: VAEStageConfig = dataclasses.field(default_factory=VAEStageConfig)
    ibe: IBEStageConfig = dataclasses.field(default_factory=IBEStageConfig)
    twin: TwinStageConfig = dataclasses.field(default_factory=TwinStageConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise UserError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")
        return getattr(self, name)


_POSITIVE = {"n_samples", "duration_s", "steps", "batch_size", "lr", "log_every", "checkpoint_every",
             "temperature", "noise_draws", "max_statements", "out_fs", "lora_rank"}
_FRACTIONS = {"held_out_fraction", "cond_dropout", "base_dropout"}
LIMB_LEADS = ("derived", "raw")  # generate.limb_leads: project twins onto Einthoven's relations, or not
# every vocabulary is defined once, where it is used; the schema checks against those definitions
_CHOICES = {"sampler": set(SAMPLERS), "injector": set(INJECTORS), "trainable": set(FINETUNE_MODES),
            "limb_leads": set(LIMB_LEADS), "precision": set(PRECISIONS)}


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    return load_yaml(ExperimentConfig, path, "configuration file")


def load_yaml(cls: type[T], path: str | Path, what: str) -> T:
    """Read YAML file `path` into dataclass `cls`, with errors that name the file. A file may name a base
    file (`base: demo.yaml`, relative to its own folder): it then holds only what differs from it."""
    path = Path(path)
    return from_dict(cls, _read_with_base(path, what, ()), str(path))


def _read_with_base(path: Path, what: str, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        raise ConfigError(f"{path}: {what} is empty")
    if not isinstance(data, dict) or "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: must be the name of a YAML file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base: {base} names a file that is based on this one (a cycle)")
    return _merged(_read_with_base(base_path, f"base file of {path}", (*seen, path.resolve())), data)


def _merged(base: dict, override: dict) -> dict:
    """`base` with `override`'s values in place of its own, mapping by mapping (lists are replaced whole)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML would let the
    last one win silently)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    twice = sorted({str(k) for k in keys if keys.count(k) > 1})
    if twice:
        raise yaml.constructor.ConstructorError(None, None, f"key {twice[0]!r} given twice", node.start_mark)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def to_dict(config: Any) -> dict:
    """Plain data for YAML (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(config_text(config))


def config_text(config: ExperimentConfig) -> str:
    """The config as YAML text (what the server sends to the sites)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_from_text(text: str, where: str = "the server's config") -> ExperimentConfig:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    return from_dict(ExperimentConfig, data, where)


def from_dict(cls: type[T], data: Any, where: str, prefix: str = "") -> T:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: {prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, where, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # a dataclass's own cross-field check
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'}: {exc}") from exc


def _convert(kind: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where, key + ".")
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        kind = options[0]
        origin = typing.get_origin(kind)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        inner = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        items = [_convert(inner, v, where, key) for v in value]
        return tuple(items) if origin is tuple else items
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind in (int, float, str, bool) and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key}: expected {kind.__name__}, got {value!r}")
    _check_range(key.rsplit(".", 1)[-1], value, where, key)
    return value


def _check_range(name: str, value: Any, where: str, key: str) -> None:
    if name in _POSITIVE and not value > 0:
        raise ConfigError(f"{where}: {key}: must be > 0, got {value}")
    if name in _FRACTIONS and not 0 <= value < 1:
        raise ConfigError(f"{where}: {key}: must be in [0, 1), got {value}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{where}: {key}: must be one of {', '.join(sorted(_CHOICES[name]))}, got {value!r}")
