"""Device choice, batch transfer and mixed-precision settings for the training loop."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["resolve_device", "move_to_device", "amp_dtype"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    Raises ``RuntimeError`` when CUDA is asked for explicitly but is not available, rather
    than silently training on the CPU for days.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Copy every tensor inside ``batch`` to ``device``, keeping the container structure.

    Handles tensors, mappings (-> dict of the same keys), lists, tuples (named tuples keep
    their type) and dataclass instances (rebuilt with ``dataclasses.replace``, so frozen
    dataclasses work; fields with ``init=False`` are recomputed by the class). Anything
    else (numbers, strings, numpy arrays, None) is returned unchanged.
    """
    non_blocking = device.type == "cuda"
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Autocast dtype for training and stage-1d inference: bf16 on CUDA when supported, else fp16; None = no AMP.

    AMP is CUDA-only here: CPU autocast (bf16) is slow on most CPUs and changes numerics of
    the CPU tests. fp16 needs a ``GradScaler`` (its range underflows small gradients);
    bf16 has fp32's exponent range and does not.
    """
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
