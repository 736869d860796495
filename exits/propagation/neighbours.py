"""Background seeds from the other objects of the same image.

Visible instance masks do not overlap: a pixel belongs to at most one object. So where
another object j of the same image is known to be, object i is not. EXITS's FG seeds of j
(its extreme points moved delta crop pixels inwards, ``seeds.move_points_inwards``) are the
patches of j it trusts most; mapped into i's crop they are BG evidence for i, also inside
i's box, and they exist even when i's box fills its crop (an object spanning the image,
whose crop has no patch outside the box).

Scope: the neighbours of an object are ALL the objects of its image in the run, not only
those of the same retrieval shard. A shard is a row range of the instances table, and an
image's objects may straddle a shard boundary (or, in json order, lie anywhere in the
table); a neighbour's FG seeds need only its extreme points and crop window (table
columns), no retrieval result, so the shard passes the image's other objects as
``others`` (:func:`exits.stages.point_retrieval.image_neighbours` reads them with
:func:`exits.data.instances_table.read_image_rows`) and the seeds are the same for any
``flows.shard_size``. Without ``others`` the neighbours are the objects passed in.

Coordinates: j's seed points go crop_j -> image (``CropWindow.crop_to_image``) -> crop_i
(``CropWindow.image_to_crop``); a point falling outside crop i's [0, S) square is dropped.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from exits.data.crops import CropWindow
from exits.propagation.seeds import move_points_inwards, patch_index_of_points


@dataclass(frozen=True)
class NeighbourObjects:
    """Objects that only give seeds (the image's objects outside the shard): per object the
    key of its image, its crop window, extreme points (K, 4, 2) in its own crop pixels and
    box (K, 4) in crop pixel-edge coordinates, computed as for the shard's own objects
    (``ObjectCropDataset.points_crop`` / ``boxes``: float32), so a seed is the same
    wherever its object sits."""

    groups: Sequence[object]
    windows: Sequence[CropWindow]
    points_crop: np.ndarray
    boxes_crop: np.ndarray

    def __len__(self) -> int:
        return len(self.windows)


def neighbour_bg_seeds(
    groups: Sequence[object],
    windows: Sequence[CropWindow],
    points_crop: np.ndarray,
    boxes_crop: np.ndarray,
    grid: int,
    delta: float,
    others: NeighbourObjects | None = None,
) -> Tensor:
    """(num_objects, N*N) bool: patches of each object's crop holding another object's FG seed.

    Args:
        groups: per object, the key of its image (objects with equal keys share an image).
        windows: per object, its crop window (all of one ``size`` S).
        points_crop: (num_objects, 4, 2) extreme points in each object's own crop pixels.
        boxes_crop: (num_objects, 4) extreme-point boxes in crop pixel-edge coordinates.
        grid: N, patches per side.
        delta: the inward move of P_FG, crop pixels (same value as for the FG seeds).
        others: more objects whose FG seeds count for the objects of their image (the
            image's objects outside this shard); they get no seeds themselves. They must not
            repeat an object given above (its seeds would count for itself).
    """
    n_obj = len(windows)
    out = torch.zeros((n_obj, grid * grid), dtype=torch.bool)
    if n_obj == 0:
        return out
    size = windows[0].size
    if others is not None and len(others):
        if any(w.size != size for w in others.windows):
            raise ValueError("neighbour windows must share the crop size of the objects")
        groups = list(groups) + list(others.groups)
        windows = list(windows) + list(others.windows)
        points_crop = np.concatenate([np.asarray(points_crop, np.float32), np.asarray(others.points_crop, np.float32)])
        boxes_crop = np.concatenate([np.asarray(boxes_crop, np.float32), np.asarray(others.boxes_crop, np.float32)])
    n_all = len(windows)
    inner = move_points_inwards(torch.from_numpy(np.asarray(points_crop, np.float32)),
                                torch.from_numpy(np.asarray(boxes_crop, np.float32)), delta).numpy()
    # Seed points of every object in image pixel coordinates, (n_all, 4, 2).
    image_pts = np.stack([windows[j].crop_to_image(inner[j]) for j in range(n_all)])
    by_group: dict[object, list[int]] = defaultdict(list)
    for i, key in enumerate(groups):
        by_group[key].append(i)
    for members in by_group.values():
        if len(members) < 2:
            continue
        for i in members:
            if i >= n_obj:  # a neighbour from outside: gives seeds only
                continue
            seeds = np.concatenate([image_pts[j] for j in members if j != i])  # (4 (K-1), 2)
            uv = windows[i].image_to_crop(seeds)
            inside = (uv >= 0).all(axis=1) & (uv < size).all(axis=1)
            if inside.any():
                idx = patch_index_of_points(torch.from_numpy(uv[inside]).float(), size, grid)
                out[i, idx] = True
    return out
