"""Extreme points: the four outermost pixels of an object (top, left, bottom, right).

Order and axes follow ExtremeNet and the COCO ``extreme_points`` field: a (4, 2) array of
[x, y] pixel coordinates, rows = top, left, bottom, right; y grows downward.
"""
from __future__ import annotations

import numpy as np

TOP, LEFT, BOTTOM, RIGHT = 0, 1, 2, 3
POINT_NAMES = ("top", "left", "bottom", "right")


def derive_extreme_points(mask: np.ndarray) -> np.ndarray:
    """Extreme points of a binary mask, as ExtremeNet derives them.

    On the extreme row (top/bottom) or column (left/right) the point is the median of the
    object pixels on that line (the lower median, so it is always an object pixel):
    top = (median{x : mask[y_min, x]}, y_min), left = (x_min, median{y : mask[y, x_min]}), ...

    Args:
        mask: (H, W) array, non-zero = object.
    Returns:
        (4, 2) float64 array of [x, y], rows top, left, bottom, right.
    Raises:
        ValueError: if the mask is empty.
    """
    m = np.asarray(mask) != 0
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError("cannot derive extreme points from an empty mask")
    y_min, y_max, x_min, x_max = ys.min(), ys.max(), xs.min(), xs.max()

    def lower_median(values: np.ndarray) -> int:
        values = np.sort(values)
        return int(values[(values.size - 1) // 2])

    return np.array(
        [
            [lower_median(np.nonzero(m[y_min])[0]), y_min],
            [x_min, lower_median(np.nonzero(m[:, x_min])[0])],
            [lower_median(np.nonzero(m[y_max])[0]), y_max],
            [x_max, lower_median(np.nonzero(m[:, x_max])[0])],
        ],
        dtype=np.float64,
    )


def box_from_extreme_points(points: np.ndarray) -> tuple[float, float, float, float]:
    """COCO box [x, y, w, h] spanned by extreme points, in pixel-edge coordinates.

    Extreme points are pixel indices, so the box covering those pixels runs from
    x_left to x_right + 1 (and likewise in y): w = x_r - x_l + 1, h = y_b - y_t + 1.
    """
    p = np.asarray(points, dtype=np.float64)
    x0, y0 = p[LEFT, 0], p[TOP, 1]
    x1, y1 = p[RIGHT, 0], p[BOTTOM, 1]
    return float(x0), float(y0), float(x1 - x0 + 1.0), float(y1 - y0 + 1.0)
