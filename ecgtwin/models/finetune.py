"""What a stage fine-tunes when it starts from a public foundation (DP-LDM, Lyu et al. 2023; DPDM: fewer
trainable parameters means less noise on each of them for the same privacy).

    all        every parameter
    condition  the condition pathway only (each model names its own: CONDITION_PATHWAY)
    lora       low-rank adapters (Hu et al. 2021) on every attention and MLP projection; the base is frozen
    bias       the bias terms only (BitFit, Ben Zaken et al. 2022; DP-BiTFiT, Bu et al. 2022): about 1 % of the
               twin model's parameters, so the noise norm over them is about a tenth of full fine-tuning's,
               and the adaLN-Zero modulation biases still shift and scale every block
    modules    the parameters under the named modules only (`trainable_modules`: dotted name prefixes such
               as "blocks.1.cross_attn"), e.g. those that a non-private fine-tune on public data moved most
               (bench.weight_movement)
    frozen     nothing: the stage is used as it is (not trained, not sent, no privacy cost)

LoRA adapters are ordinary nn.Linear layers, so Opacus computes their per-sample gradients as for any
other layer; the frozen base weight keeps its name, so foundation weights load into an adapted model.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .layers import Attention, Mlp

MODES = ("all", "condition", "lora", "bias", "modules", "frozen")


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) B A x; B starts at zero, so an adapted model starts as its base."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 alpha: float | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(module: nn.Module, rank: int) -> int:
    """Replace every nn.Linear of every Attention and Mlp inside `module` by a LoRALinear that keeps its
    weight and bias (same names, same tensors). Returns how many projections were adapted."""
    adapted = 0
    for parent in list(module.modules()):
        if not isinstance(parent, (Attention, Mlp)):
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                lora = LoRALinear(child.in_features, child.out_features, rank, bias=child.bias is not None,
                                  ).to(child.weight.device)
                lora.weight, lora.bias = child.weight, child.bias
                setattr(parent, name, lora)
                adapted += 1
    return adapted


def trainable_names(module: nn.Module, mode: str, modules: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Names of the parameters a pass of `mode` trains (and a reply carries), in state-dict order; `modules`
    are the dotted prefixes of mode "modules" (each must name at least one parameter)."""
    names = [n for n, _ in module.named_parameters()]
    if mode == "modules":
        unknown = [m for m in modules if not any(n == m or n.startswith(m + ".") for n in names)]
        if not modules or unknown:
            raise ValueError(f"trainable_modules: {unknown[0]!r} names no parameter of {type(module).__name__}"
                             if unknown else "trainable: modules needs trainable_modules (dotted module names)")
        return [n for n in names if any(n == m or n.startswith(m + ".") for m in modules)]
    if mode == "all":
        return names
    if mode == "frozen":
        return []
    if mode == "lora":
        return [n for n in names if ".lora_a." in n or ".lora_b." in n]
    if mode == "bias":
        return [n for n in names if n.endswith(".bias")]
    if mode == "condition":
        pathway = getattr(module, "CONDITION_PATHWAY", ())
        return [n for n in names if any(part in pathway for part in n.split("."))]
    raise ValueError(f"unknown fine-tuning mode {mode!r} (known: {', '.join(MODES)})")


def train_only(module: nn.Module, names: list[str]) -> nn.Module:
    """Gradients for `names` only: every other parameter is frozen (never clipped, noised or changed)."""
    keep = set(names)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(name in keep)
    return module
