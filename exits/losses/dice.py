"""Dice loss, the building block of every EXITS loss (MIL, point, CRF).

The squared-denominator (V-Net) form is used, as in BoxInst and the EXITS code base:

    L_dice(p, t) = 1 - (2 * sum_i w_i p_i t_i + eps) / (sum_i w_i p_i^2 + sum_i w_i t_i^2 + eps)

Why squared: since sum p^2 + sum t^2 - 2 sum p t = sum (p - t)^2 >= 0, the loss is >= 0
and is zero exactly at p = t, also for *soft* targets (the CRF loss uses a soft CRF
output as target). The linear form (sum p + sum t) has no such minimum at p = t for
soft t. ``eps`` sits in numerator and denominator so that an empty prediction against an
empty target costs 0 instead of 1; it is small so it does not blur the loss on the
tiny N x N point grids (a handful of labelled cells).
"""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a per-sample loss (B,) with ``"none"`` (keep (B,)), ``"mean"`` or ``"sum"``."""
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def dice_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-sample squared Dice loss.

    L_b = 1 - (2 sum_i w_i p_i t_i + eps) / (sum_i w_i p_i^2 + sum_i w_i t_i^2 + eps),
    sums over every non-batch element i of sample b.

    Args:
        pred: (B, ...) probabilities in [0, 1].
        target: (B, ...) same shape as ``pred``, in [0, 1] (binary or soft); gradients
            flow into it too if it requires grad (detach it yourself when it is a target).
        weight: optional (B, ...) (or broadcastable to ``pred``) non-negative per-element
            weight; 0 excludes an element. For a binary mask K this equals
            ``dice(pred * K, target * K)``.
        eps: smoothing added to numerator and denominator.
        reduction: ``"none"`` -> (B,), ``"mean"`` or ``"sum"`` -> scalar.
    Returns:
        (B,) per-sample losses in [0, 1] or their mean/sum.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() < 1:
        raise ValueError("pred needs a batch dimension")
    target = target.to(pred.dtype)
    p = pred.flatten(1)
    t = target.flatten(1)
    if weight is None:
        inter = (p * t).sum(1)
        denom = (p * p).sum(1) + (t * t).sum(1)
    else:
        w = torch.broadcast_to(weight.to(pred.dtype), pred.shape).flatten(1)
        inter = (w * p * t).sum(1)
        denom = (w * p * p).sum(1) + (w * t * t).sum(1)
    loss = 1.0 - (2.0 * inter + eps) / (denom + eps)
    return reduce_loss(loss, reduction)
