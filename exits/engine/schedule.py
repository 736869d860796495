"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``, per iteration.

The schedule is a pure function of the step index so it can be tested on its own and so a
resumed run (which only restores the step counter) follows exactly the same curve.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["lr_at", "build_scheduler"]


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate used by optimizer update number ``step`` (0-based).

    Warm-up, for ``step < warmup_steps``:
        lr = base_lr * (step + 1) / warmup_steps
    (``step + 1`` so the first update already moves the weights; the last warm-up update
    uses exactly ``base_lr``.)
    Cosine, for ``warmup_steps <= step <= total_steps``, with p = (step - warmup) / (total - warmup):
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * p))
    so lr = base_lr at the first cosine step and min_lr at ``step == total_steps`` (one past
    the last update; the last update uses a value just above ``min_lr``). Steps beyond
    ``total_steps`` stay at ``min_lr``.

    Args:
        step: update index, >= 0.
        total_steps: number of updates in the whole run, >= 1.
        warmup_steps: number of warm-up updates, 0 <= warmup_steps <= total_steps.
        base_lr: peak learning rate.
        min_lr: final learning rate.
    """
    if step < 0 or total_steps < 1:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_at`; call ``.step()`` once after every optimizer step.

    Every parameter group is scaled by the same factor ``lr_at(step, ..., base_lr=1)``, so
    groups keep their own base ``lr``. Its ``state_dict`` holds only the step counter.
    """
    return LambdaLR(optimizer, lambda step: lr_at(step, total_steps, warmup_steps, 1.0))
