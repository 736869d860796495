"""Interactive segmentation metrics from per-object IoU curves.

``ious[k]`` is the IoU after k clicks, k = 0..K (``ious[0]`` = before any click: the pseudo
mask's IoU in the edit protocol, 0 from scratch).

    NoC@t   = mean over objects of  min{k >= 0 : ious[k] >= t}, or K when never reached
    NoF@t   = number of objects with ious[k] < t for every k <= K (failures)
    mIoU@k  = mean over objects of ious[min(k, len-1)] (a finished curve is carried on)

The edit protocol can give NoC = 0 (the pseudo mask is already good enough); from scratch
``ious[0] = 0`` so NoC >= 1. RITM counts NoC == K as a failure even when reached on click K;
here a failure is "never reached" (the usual reading of NoF and of this project's issue).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["mask_iou", "number_of_clicks", "summarize_curves"]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| for bool masks; 1.0 when both are empty."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b)) / union


def number_of_clicks(ious: Sequence[float], threshold: float, max_clicks: int) -> tuple[int, bool]:
    """(NoC, failed) for one curve ``ious[0..K]``; NoC = ``max_clicks`` when never reached."""
    arr = np.asarray(ious, dtype=np.float64)[: max_clicks + 1]
    hit = np.nonzero(arr >= threshold)[0]
    if hit.size == 0:
        return max_clicks, True
    return int(hit[0]), False


def summarize_curves(curves: Iterable[Sequence[float]], max_clicks: int = 20,
                     thresholds: Sequence[float] = (0.85, 0.9), at_clicks: Sequence[int] = (0, 1, 2, 3, 5, 10, 20)
                     ) -> dict[str, float | int]:
    """NoC@t, NoF@t for each threshold and mIoU@k for each k over all curves."""
    curves = [list(c) for c in curves]
    out: dict[str, float | int] = {"objects": len(curves)}
    if not curves:
        return out
    for t in thresholds:
        results = [number_of_clicks(c, t, max_clicks) for c in curves]
        tag = f"{round(t * 100)}"
        out[f"NoC@{tag}"] = float(np.mean([r[0] for r in results]))
        out[f"NoF@{tag}"] = int(sum(r[1] for r in results))
    for k in at_clicks:
        out[f"mIoU@{k}"] = float(np.mean([c[min(k, len(c) - 1)] for c in curves]))
    return out
