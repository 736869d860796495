"""Progressive mode (CDNet platform): a click changes only the region it touches.

Global re-prediction after every click also changes parts of the mask far from the click,
which annotators then have to fix again, and it would undo edits made with other tools.
Here the new prediction P is compared with the previous mask M; of the changed pixels
C = P xor M (8-connected components) only the components that touch the last click's disk
are taken over:

    out = M xor (C restricted to the components of C meeting the disk)

Pixels outside those components keep M exactly. Without a previous mask every pixel may
change (out = P).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from exits.interactive.clicks import Click, disk_index

__all__ = ["progressive_update"]


def progressive_update(prev_mask: np.ndarray | None, pred: np.ndarray, last_click: Click, radius: float = 0.0
                       ) -> np.ndarray:
    """(H, W) bool: ``prev_mask`` changed only in the changed regions touching ``last_click``.

    ``last_click`` = (x, y, positive) in the masks' pixel coords; ``radius`` its disk.
    """
    pred = np.asarray(pred, bool)
    if prev_mask is None:
        return pred.copy()
    prev = np.asarray(prev_mask, bool)
    changed = prev ^ pred
    labels, n = ndimage.label(changed, structure=np.ones((3, 3), bool))
    if n == 0:
        return prev.copy()
    x, y, _ = last_click
    rows, cols, disk = disk_index(float(x), float(y), max(float(radius), 0.5), *prev.shape)
    touched = np.unique(labels[rows, cols][disk])
    touched = touched[touched > 0]
    return prev ^ np.isin(labels, touched)
