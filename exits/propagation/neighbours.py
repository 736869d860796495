"""Background seeds from the other objects of the same image.

Visible instance masks do not overlap: a pixel belongs to at most one object. So where
another object j of the same image is known to be, object i is not. EXITS's FG seeds of j
(its extreme points moved delta crop pixels inwards, ``seeds.move_points_inwards``) are the
patches of j it trusts most; mapped into i's crop they are BG evidence for i, also inside
i's box, and they exist even when i's box fills its crop (an object spanning the image,
whose crop has no patch outside the box).

Scope: the neighbours are the objects of the same dataset, i.e. of one retrieval shard
(rows of the instances table, ordered by image): an image whose objects straddle a shard
boundary gives each side only its own objects' seeds.

Coordinates: j's seed points go crop_j -> image (``CropWindow.crop_to_image``) -> crop_i
(``CropWindow.image_to_crop``); a point falling outside crop i's [0, S) square is dropped.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from exits.data.crops import CropWindow
from exits.propagation.seeds import move_points_inwards, patch_index_of_points


def neighbour_bg_seeds(
    groups: Sequence[object],
    windows: Sequence[CropWindow],
    points_crop: np.ndarray,
    boxes_crop: np.ndarray,
    grid: int,
    delta: float,
) -> Tensor:
    """(num_objects, N*N) bool: patches of each object's crop holding another object's FG seed.

    Args:
        groups: per object, the key of its image (objects with equal keys share an image).
        windows: per object, its crop window (all of one ``size`` S).
        points_crop: (num_objects, 4, 2) extreme points in each object's own crop pixels.
        boxes_crop: (num_objects, 4) extreme-point boxes in crop pixel-edge coordinates.
        grid: N, patches per side.
        delta: the inward move of P_FG, crop pixels (same value as for the FG seeds).
    """
    n_obj = len(windows)
    out = torch.zeros((n_obj, grid * grid), dtype=torch.bool)
    if n_obj == 0:
        return out
    size = windows[0].size
    inner = move_points_inwards(torch.from_numpy(np.asarray(points_crop, np.float32)),
                                torch.from_numpy(np.asarray(boxes_crop, np.float32)), delta).numpy()
    # Seed points of every object in image pixel coordinates, (num_objects, 4, 2).
    image_pts = np.stack([windows[j].crop_to_image(inner[j]) for j in range(n_obj)])
    by_group: dict[object, list[int]] = defaultdict(list)
    for i, key in enumerate(groups):
        by_group[key].append(i)
    for members in by_group.values():
        if len(members) < 2:
            continue
        for i in members:
            others = np.concatenate([image_pts[j] for j in members if j != i])  # (4 (K-1), 2)
            uv = windows[i].image_to_crop(others)
            inside = (uv >= 0).all(axis=1) & (uv < size).all(axis=1)
            if inside.any():
                idx = patch_index_of_points(torch.from_numpy(uv[inside]).float(), size, grid)
                out[i, idx] = True
    return out
