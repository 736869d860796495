"""Reference pseudo-mask baselines that need no training: the box, and GrabCut.

They are what EXITS is measured against (bench/bench_stage1.py): (a) the extreme-point box
filled as a mask, (b) OpenCV GrabCut initialised from the box with the extreme points as
sure foreground.
"""
from __future__ import annotations

import cv2
import numpy as np

from exits.data.crops import CropWindow


def box_mask_full(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of the box spanned by the extreme points (pixel indices inclusive)."""
    p = np.asarray(points).round().astype(int)
    m = np.zeros((height, width), np.uint8)
    m[p[0, 1]:p[2, 1] + 1, p[1, 0]:p[3, 0] + 1] = 1
    return m


def grabcut_mask(image_rgb: np.ndarray, points: np.ndarray, window: CropWindow, *, iters: int = 5,
                 point_radius: int = 2) -> np.ndarray:
    """GrabCut inside the crop window; returns an (H, W) uint8 mask of the whole image.

    Init: outside the extreme-point box = sure background, inside = probable foreground,
    a disk of ``point_radius`` px around each extreme point = sure foreground.
    """
    h, w = image_rgb.shape[:2]
    x0, y0, ww, wh = window.as_list()
    sub = np.ascontiguousarray(image_rgb[y0:y0 + wh, x0:x0 + ww, ::-1])  # OpenCV wants BGR
    p = np.asarray(points).round().astype(int) - np.array([x0, y0])
    init = np.full((wh, ww), cv2.GC_BGD, np.uint8)
    init[p[0, 1]:p[2, 1] + 1, p[1, 0]:p[3, 0] + 1] = cv2.GC_PR_FGD
    for x, y in p:
        cv2.circle(init, (int(x), int(y)), point_radius, int(cv2.GC_FGD), -1)
    out = np.zeros((h, w), np.uint8)
    if (init == cv2.GC_BGD).sum() == 0:
        # GrabCut needs background samples; with the box filling the window use its border.
        init[[0, -1], :] = cv2.GC_PR_BGD
        init[:, [0, -1]] = cv2.GC_PR_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(sub, init, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        # Degenerate colour statistics (e.g. a flat crop): fall back to the box.
        return box_mask_full(points, h, w)
    fg = ((init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)).astype(np.uint8)
    out[y0:y0 + wh, x0:x0 + ww] = fg
    return out
