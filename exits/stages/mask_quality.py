"""Signals of a final pseudo mask's quality that need no ground truth (the triage score).

The extreme points are four pixels *on* the object's outline: the leftmost, topmost,
rightmost and bottommost. A correct mask therefore (a) spans exactly the extreme-point box
and (b) reaches every extreme point. Both hold for the GT mask by construction and are
broken by the typical failures of a pseudo mask (a part cut off, the mask collapsing onto
the background inside the box, an occluder's region taken instead of the object). A third
signal is how much the final refinement (the image CRF) had to move the generator's mask.

All functions take the mask in image pixels (H, W) bool and the extreme points as (4, 2)
``[x, y]`` pixel coordinates; they are pure and cheap (O(mask pixels)).
"""
from __future__ import annotations

import numpy as np

__all__ = ["box_fit", "extreme_point_reach", "mask_agreement", "final_mask_signals", "REACH_TAU"]

# Distance scale of extreme_point_reach, as a fraction of the box diagonal: a point 5 % of the
# diagonal away from the mask counts e^-1.
REACH_TAU = 0.05


def _extreme_box(points: np.ndarray) -> tuple[float, float, float, float]:
    p = np.asarray(points, dtype=np.float64).reshape(4, 2)
    return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())


def box_fit(mask: np.ndarray, points: np.ndarray) -> float:
    """IoU of the mask's tight box with the extreme-point box, both inclusive pixel boxes:

        fit = |B_mask ∩ B_ext| / |B_mask ∪ B_ext|,  |[x0, x1] x [y0, y1]| = (x1 - x0 + 1)(y1 - y0 + 1)

    1 when the mask spans the box exactly (as the GT mask does); 0 for an empty mask.
    mask: (H, W) bool; points: (4, 2) [x, y].
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return 0.0
    ex0, ey0, ex1, ey1 = (round(v) for v in _extreme_box(points))
    mx0, my0, mx1, my1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    iw = min(ex1, mx1) - max(ex0, mx0) + 1
    ih = min(ey1, my1) - max(ey0, my0) + 1
    inter = max(0, iw) * max(0, ih)
    union = (ex1 - ex0 + 1) * (ey1 - ey0 + 1) + (mx1 - mx0 + 1) * (my1 - my0 + 1) - inter
    return inter / union if union > 0 else 0.0


def extreme_point_reach(mask: np.ndarray, points: np.ndarray, tau: float = REACH_TAU) -> float:
    """How well the mask reaches the four extreme points:

        reach = 1/4 Σ_k exp(-d_k / (tau · diag)),   d_k = min_{q ∈ mask} ||q - e_k||₂

    with diag the extreme-point box's diagonal. 1 when every point is a mask pixel; 0 for
    an empty mask. mask: (H, W) bool; points: (4, 2) [x, y].
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return 0.0
    x0, y0, x1, y1 = _extreme_box(points)
    diag = max(1.0, float(np.hypot(x1 - x0 + 1, y1 - y0 + 1)))
    p = np.asarray(points, dtype=np.float64).reshape(4, 2)
    # Pixel centres of the mask vs each point: (4, n) distances, n = mask pixels.
    d = np.sqrt((xs[None, :] - p[:, :1]) ** 2 + (ys[None, :] - p[:, 1:]) ** 2).min(axis=1)
    return float(np.exp(-d / (tau * diag)).mean())


def mask_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two masks of one shape, |a ∧ b| / |a ∨ b| (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def final_mask_signals(mask: np.ndarray, points: np.ndarray, generator_mask: np.ndarray | None) -> dict[str, float]:
    """``box_fit``, ``point_reach`` and ``refine_agreement`` (IoU of the final mask with the
    generator's own pasted mask; NaN when there was no refinement after the generator)."""
    return {"box_fit": box_fit(mask, points), "point_reach": extreme_point_reach(mask, points),
            "refine_agreement": mask_agreement(mask, generator_mask) if generator_mask is not None else float("nan")}
