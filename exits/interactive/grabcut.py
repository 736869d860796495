"""OpenCV GrabCut driven by the same clicks: the reference the click model is compared with.

Inside the object's crop window, GrabCut's initial labels are

    previous mask given:   probable fg inside it, probable bg elsewhere
    else, box given:       probable fg inside the extreme-point box, probable bg elsewhere
    else:                  probable bg everywhere
    click disks:           definite fg (positive) / definite bg (negative), later clicks win

then ``iters`` GrabCut iterations (GMM colour models + graph cut). Outside the window the
previous mask is kept (False without one), as the click model does. GrabCut needs samples
of both classes: without any background label the window border is made probable bg;
without any foreground label the result is the previous mask unchanged.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from exits.data.crops import CropWindow
from exits.grabcut import ensure_background, is_foreground, run_grabcut
from exits.interactive.clicks import Click, disk_index

__all__ = ["grabcut_from_clicks"]


def grabcut_from_clicks(image_rgb: np.ndarray, clicks: Sequence[Click], window: CropWindow,
                        prev_mask: np.ndarray | None = None, *, box: np.ndarray | None = None,
                        radius: float = 3.0, iters: int = 5) -> np.ndarray:
    """(H, W) bool mask. ``image_rgb`` (H, W, 3) uint8; clicks ``(x, y, positive)`` in image
    pixels; ``box`` [x0, y0, x1, y1] inclusive pixel indices; ``radius`` in image pixels."""
    h, w = image_rgb.shape[:2]
    x0, y0, ww, wh = window.as_list()
    prev = np.zeros((h, w), bool) if prev_mask is None else np.asarray(prev_mask, bool)
    init = np.full((wh, ww), cv2.GC_PR_BGD, np.uint8)
    if prev_mask is not None:
        init[prev[y0:y0 + wh, x0:x0 + ww]] = cv2.GC_PR_FGD
    elif box is not None:
        bx0, by0, bx1, by1 = (int(round(v)) for v in box)
        init[max(0, by0 - y0):max(0, by1 + 1 - y0), max(0, bx0 - x0):max(0, bx1 + 1 - x0)] = cv2.GC_PR_FGD
    for x, y, positive in clicks:
        rows, cols, disk = disk_index(float(x) - x0, float(y) - y0, radius, wh, ww)
        init[rows, cols][disk] = cv2.GC_FGD if positive else cv2.GC_BGD
    if not is_foreground(init).any():
        return prev.copy()
    # A failed GrabCut (one colour in a class) leaves the initial labels: they are the answer.
    run_grabcut(image_rgb, ensure_background(init), x0, y0, iters=iters)
    out = prev.copy()
    out[y0:y0 + wh, x0:x0 + ww] = is_foreground(init)
    return out
