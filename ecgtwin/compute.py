"""How a command computes on its device: mixed precision, TF32 matmuls, the fused optimiser, torch.compile.

bf16 autocast covers the forward passes of the VAE, the IBE and the DiT (their matmuls and convolutions);
the backward runs in the dtypes autocast chose. Everything DP-SGD relies on stays in fp32: the weights and
the optimiser state, the per-patient gradients before they are clipped (cast up in ecgtwin.train.private),
the clipping, the Gaussian noise and the accounting. A diffusion sampler's arithmetic stays in fp32 too:
only the denoiser's forward is autocast.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from ecgtwin.errors import UserError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The forward-pass context of `precision` on `device`: bf16 autocast, or nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def use_tf32(device: torch.device | str, enabled: bool) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and newer); nothing on the CPU. It is torch's
    process-wide switch, set once by the command that chose the device."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
          device: torch.device | str) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on CUDA (one launch for all parameters instead of several per tensor);
    torch's default implementation elsewhere, so that CPU results stay what they were."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, fused=fused or None)


def compile_module(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Compile `module`'s forward in place with torch.compile when enabled (its first calls compile, later
    ones run faster; the weights and their names are unchanged). Not for DP passes: Opacus' per-sample
    hooks need the eager module."""
    if enabled:
        module.compile()
    return module
