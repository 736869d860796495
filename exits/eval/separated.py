"""Separated objects: GT masks split into several visible parts (Separated-COCO style).

Rule: an object is *separated* when its GT mask has at least 2 8-connected components
each of area >= max(min_part_pixels, min_part_fraction * total_area). The size floor keeps
annotation specks and thin slivers from turning an ordinary object into a separated one.
Crowd regions (``iscrowd``) are groups of objects, not objects, and are never separated.

Alternatively the set can be given explicitly (e.g. the official Separated-COCO id list)
with :func:`load_separated_ids`.
"""
from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from exits.eval.ground_truth import GtInstance
from exits.eval.rle import Rle

DEFAULT_MIN_PART_PIXELS = 16
DEFAULT_MIN_PART_FRACTION = 0.05


def count_mask_parts(
    mask: np.ndarray,
    min_part_pixels: int = DEFAULT_MIN_PART_PIXELS,
    min_part_fraction: float = DEFAULT_MIN_PART_FRACTION,
) -> int:
    """Number of 8-connected components of ``mask`` with area >= the part threshold.

    threshold = max(min_part_pixels, min_part_fraction * sum(mask)). An empty mask has 0.

    Args:
        mask: (H, W) array, non-zero = object.
    """
    m = np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    total = int(m.sum())
    if total == 0:
        return 0
    # OpenCV's labelling (with per-label areas) is several times faster than
    # scipy.ndimage.label + bincount on full-image masks; same 8-connectivity.
    n_labels, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    areas = stats[1:n_labels, cv2.CC_STAT_AREA]  # label 0 is the background
    threshold = max(float(min_part_pixels), float(min_part_fraction) * total)
    return int(np.count_nonzero(areas >= threshold))


def count_parts_rle(
    rle: Rle,
    min_part_pixels: int = DEFAULT_MIN_PART_PIXELS,
    min_part_fraction: float = DEFAULT_MIN_PART_FRACTION,
) -> int:
    """:func:`count_mask_parts` of a compressed RLE (labelled inside its bounding box only)."""
    mask = mask_utils.decode(rle)
    x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle))
    if w == 0 or h == 0:
        return 0
    return count_mask_parts(mask[y : y + h, x : x + w], min_part_pixels, min_part_fraction)


def count_parts(
    gt: Mapping[int, GtInstance],
    min_part_pixels: int = DEFAULT_MIN_PART_PIXELS,
    min_part_fraction: float = DEFAULT_MIN_PART_FRACTION,
) -> dict[int, int]:
    """``{ann_id: number of parts}`` for every GT instance."""
    return {ann_id: count_parts_rle(inst.rle, min_part_pixels, min_part_fraction) for ann_id, inst in gt.items()}


def separated_from_parts(parts: Mapping[int, int], gt: Mapping[int, GtInstance]) -> set[int]:
    """Ids with >= 2 parts, crowd regions excluded."""
    return {ann_id for ann_id, n in parts.items() if n >= 2 and not gt[ann_id].iscrowd}


def separated_ann_ids(
    gt: Mapping[int, GtInstance],
    min_part_pixels: int = DEFAULT_MIN_PART_PIXELS,
    min_part_fraction: float = DEFAULT_MIN_PART_FRACTION,
) -> set[int]:
    """Annotation ids of separated objects by the rule in the module docstring."""
    candidates = {k: v for k, v in gt.items() if not v.iscrowd}
    return separated_from_parts(count_parts(candidates, min_part_pixels, min_part_fraction), candidates)


_ID_KEYS = ("ann_ids", "annotation_ids")


def _check_ids(values: Any, path: Path) -> set[int]:
    if not isinstance(values, list):
        raise ValueError(f"{path}: expected a JSON list of annotation ids, got {type(values).__name__}")
    out: set[int] = set()
    for k, v in enumerate(values):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise ValueError(f"{path}: entry {k} is {v!r}, not an integer annotation id")
        out.add(int(v))
    return out


def load_separated_ids(path: str | os.PathLike) -> set[int]:
    """An explicit set of separated annotation ids from a file.

    Accepted formats:
    - JSON list: ``[1, 2, 3]``;
    - JSON object with key ``"ann_ids"`` or ``"annotation_ids"`` holding such a list;
    - text, one integer id per line (blank lines and ``#`` comments ignored).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file and the offending entry/line, for anything else.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from exc
        if isinstance(data, dict):
            for key in _ID_KEYS:
                if key in data:
                    return _check_ids(data[key], p)
            raise ValueError(f"{p}: JSON object has none of the keys {list(_ID_KEYS)}")
        return _check_ids(data, p)
    out: set[int] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            out.add(int(item))
        except ValueError:
            raise ValueError(f"{p}: line {lineno}: {item!r} is not an integer annotation id") from None
    return out
