"""OpenCV GrabCut over initial labels in a window of an image: the mechanics shared by the
GrabCut pseudo-mask peer (:func:`exits.baselines.grabcut_mask`), the click-driven reference
of the click-model benchmark (:func:`exits.interactive.grabcut.grabcut_from_clicks`) and the
spot-fix GrabCut editor (:class:`exits.spotfix.editors.GrabCutEditor`).

Each caller decides its own initial labels (box, previous mask, click disks: that is what
differs between them); this module runs GrabCut on them the same way for all three:

- GrabCut fits one colour model per class and fails without samples of both, so a window
  whose labels are all (probable or sure) foreground gets its border's *probable*
  foreground pixels as probable background (:func:`ensure_background`);
- OpenCV's RNG (GrabCut's k-means initialisation draws from it) is seeded, so the same
  labels give the same mask;
- degenerate colour statistics (e.g. a flat window) make OpenCV raise; the caller learns it
  and keeps its fallback.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ensure_background", "run_grabcut", "is_foreground"]


def is_foreground(labels: np.ndarray) -> np.ndarray:
    """Bool mask of the pixels GrabCut labels sure or probable foreground."""
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def ensure_background(labels: np.ndarray) -> np.ndarray:
    """In place: when every pixel is (probable) foreground, the window border's probable
    foreground pixels become probable background. Returns ``labels``."""
    if is_foreground(labels).all():
        border = np.zeros(labels.shape, bool)
        border[[0, -1], :] = True
        border[:, [0, -1]] = True
        labels[border & (labels == cv2.GC_PR_FGD)] = cv2.GC_PR_BGD
    return labels


def run_grabcut(image_rgb: np.ndarray, labels: np.ndarray, x0: int, y0: int, *, iters: int = 5,
                seed: int | None = 0) -> bool:
    """GrabCut on the window ``image_rgb[y0:y0+h, x0:x0+w]`` (h, w = ``labels.shape``).

    ``labels`` (h, w) uint8 of ``cv2.GC_*`` values is updated in place (call
    :func:`ensure_background` first). Returns False when OpenCV rejected the labels'
    colour statistics (``labels`` then holds the initial labels unchanged).
    """
    h, w = labels.shape
    sub = np.ascontiguousarray(image_rgb[y0:y0 + h, x0:x0 + w, ::-1])  # OpenCV wants BGR
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    if seed is not None:
        cv2.setRNGSeed(seed)
    try:
        cv2.grabCut(sub, labels, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return False
    return True
