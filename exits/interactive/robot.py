"""Simulated users: the evaluation robot (RITM / f-BRS convention) and the training clicker.

Evaluation robot (``next_click``), as in RITM's ``Clicker._get_next_click``:

    FN = gt & ~pred,  FP = ~gt & pred
    D_FN = EDT(pad(FN)),  D_FP = EDT(pad(FP))          (exact Euclidean distance transform)
    D_* <- D_* restricted to the unpadded image, and 0 at pixels clicked before
    positive = max D_FN > max D_FP; the click is the first (row-major) pixel where the
    chosen map reaches its maximum.

``pad`` surrounds the error with one row/column of zeros, so the image border counts as
boundary: an error touching the border gets distance 1 there, and the robot clicks deep
inside the region, not on the frame. Ties (max D_FN == max D_FP) give a negative click,
and no error at all gives no click (``None``).

Training clicker (``largest_error_click``): the centre of the largest connected error
region (8-connectivity), i.e. the pixel of that region farthest from its boundary,
positive when the region is a false negative (the "largest error region" rule of the
similarity-constrained network and of RITM's iterative training).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from exits.interactive.clicks import Click

__all__ = ["next_click", "largest_error_click", "padded_distance"]


def padded_distance(region: np.ndarray) -> np.ndarray:
    """(H, W) float32 distance of each region pixel to the nearest non-region pixel, the
    image border counting as non-region (one pixel of zero padding)."""
    padded = np.pad(np.asarray(region, np.uint8), 1, mode="constant")
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(gt: np.ndarray, pred: np.ndarray, clicked: np.ndarray | None = None) -> Click | None:
    """The robot user's next click ``(x, y, positive)`` in pixel indices, or ``None``.

    Args:
        gt, pred: (H, W) bool masks.
        clicked: (H, W) bool, True at pixels clicked before (they are never clicked again).
    """
    gt = np.asarray(gt, bool)
    pred = np.asarray(pred, bool)
    d_fn = padded_distance(gt & ~pred)
    d_fp = padded_distance(~gt & pred)
    if clicked is not None:
        d_fn[clicked] = 0.0
        d_fp[clicked] = 0.0
    fn_max, fp_max = float(d_fn.max()), float(d_fp.max())
    if max(fn_max, fp_max) <= 0.0:
        return None
    positive = fn_max > fp_max
    dist = d_fn if positive else d_fp
    ys, xs = np.nonzero(dist == dist.max())
    return float(xs[0]), float(ys[0]), bool(positive)


def largest_error_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """Centre ``(x, y, positive)`` of the largest connected error region, or ``None``."""
    gt = np.asarray(gt, bool)
    pred = np.asarray(pred, bool)
    best: tuple[int, np.ndarray, bool] | None = None
    structure = np.ones((3, 3), bool)
    for error, positive in ((gt & ~pred, True), (~gt & pred, False)):
        labels, n = ndimage.label(error, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), labels == k + 1, positive)
    if best is None:
        return None
    dist = padded_distance(best[1])
    ys, xs = np.nonzero(dist == dist.max())
    return float(xs[0]), float(ys[0]), best[2]
