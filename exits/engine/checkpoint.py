"""Training checkpoints: one ``last.pt`` per run folder, written atomically every epoch.

A checkpoint holds everything needed to continue a run as if it had never stopped: model,
EMA teacher, optimizer, LR scheduler and AMP grad-scaler states, the last finished epoch,
the global step, the per-epoch history and the random-number-generator states of python,
numpy and torch (CPU and CUDA), one set per rank.

Only plain containers, numbers, strings and tensors are stored (the numpy RNG state is
converted to a tensor), so checkpoints load with ``torch.load(weights_only=True)``: loading
one never runs pickled code.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exits.io import atomic_path

__all__ = ["LAST_CHECKPOINT", "capture_rng_state", "restore_rng_state", "save_checkpoint", "load_checkpoint"]

LAST_CHECKPOINT = "last.pt"


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of python ``random``, numpy, torch CPU and every CUDA device."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored when CUDA is present."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename over ``path``: a kill mid-save keeps
    the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors moved to ``map_location``)."""
    return torch.load(path, map_location=map_location, weights_only=True)
