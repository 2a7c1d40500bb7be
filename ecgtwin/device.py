"""Where a command computes: the one place that turns `--device auto|cpu|cuda[:N]` into a torch device.

Models, batches and the DP optimiser's noise live on that device. The per-patient random draws of a DP pass
and the training batches' generators stay on the CPU, so that a seed means the same numbers on any device.
"""

from __future__ import annotations

import numpy as np
import torch

from ecgtwin.errors import UserError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | None = "auto") -> torch.device:
    """`auto` takes the first CUDA device when there is one, else the CPU; `cuda[:N]` must exist."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise UserError(f"device {spec!r}: expected {CHOICES}")
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r}: this machine has no CUDA device (torch {torch.__version__}); "
                            "use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(spec)
    raise UserError(f"device {spec!r}: expected {CHOICES}")


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch read from a store, as float32 on `device`. To a GPU it goes through pinned host memory and
    an asynchronous copy, so the host does not wait for the transfer before it queues the step's kernels."""
    tensor = torch.as_tensor(array, dtype=torch.float32)
    if device.type != "cuda":
        return tensor
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's parameters live on (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))
