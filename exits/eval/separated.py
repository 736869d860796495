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
from exits.eval.rle import Rle, compressed_counts_to_runs

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
    return _count_labelled_parts(m, total, min_part_pixels, min_part_fraction)


def _count_labelled_parts(m: np.ndarray, total: int, min_part_pixels: float, min_part_fraction: float) -> int:
    """Parts of a C-contiguous uint8 0/1 image ``m`` holding ``total`` > 0 object pixels."""
    # OpenCV's labelling is several times faster than scipy.ndimage.label on full-image
    # masks; same 8-connectivity. Areas by bincount of the labels: connectedComponentsWithStats
    # also computes boxes and centroids, which costs ~3x the labelling itself.
    n_labels, labels = cv2.connectedComponents(m, connectivity=8, ltype=cv2.CV_32S)
    threshold = max(float(min_part_pixels), float(min_part_fraction) * total)
    if n_labels <= 2:  # one component (most objects): its area is the total
        return int(n_labels == 2 and total >= threshold)
    areas = np.bincount(labels.ravel(), minlength=n_labels)[1:]  # label 0 is the background
    return int(np.count_nonzero(areas >= threshold))


def count_parts_rle(
    rle: Rle,
    min_part_pixels: int = DEFAULT_MIN_PART_PIXELS,
    min_part_fraction: float = DEFAULT_MIN_PART_FRACTION,
) -> int:
    """:func:`count_mask_parts` of a compressed RLE (labelled inside its bounding box only).

    ``counts`` as str or bytes: the runs are decoded (:func:`exits.eval.rle.compressed_counts_to_runs`)
    and only the columns and rows of the mask's box are drawn, transposed (column-major, as
    the RLE runs): 8-connected parts and their areas do not change under a transpose, and
    no part lies outside the box. Same count as decoding the whole mask, at a fraction of
    the time on objects much smaller than their image.
    """
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if isinstance(counts, (str, bytes)):
        height, width = (int(v) for v in rle["size"])
        return count_parts_runs(compressed_counts_to_runs(counts), height, width, min_part_pixels, min_part_fraction)
    mask = mask_utils.decode(rle)
    x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle))
    if w == 0 or h == 0:
        return 0
    return count_mask_parts(mask[y : y + h, x : x + w], min_part_pixels, min_part_fraction)


def count_parts_runs(
    runs: np.ndarray,
    height: int,
    width: int,
    min_part_pixels: int = DEFAULT_MIN_PART_PIXELS,
    min_part_fraction: float = DEFAULT_MIN_PART_FRACTION,
) -> int:
    """:func:`count_mask_parts` of a (height, width) mask given as column-major run lengths
    (background first). Runs past height * width are ignored."""
    runs = np.asarray(runs, dtype=np.int64)
    n_pixels = int(height) * int(width)
    if runs.size < 2 or n_pixels == 0:
        return 0
    bounds = np.minimum(np.cumsum(runs), n_pixels)
    fg_end = bounds[1::2]
    fg_start = bounds[0::2][: fg_end.size]
    keep = fg_end > fg_start
    if not keep.any():
        return 0
    fg_start, fg_end = fg_start[keep], fg_end[keep]
    total = int((fg_end - fg_start).sum())
    h = int(height)
    col0, col1 = int(fg_start[0]) // h, (int(fg_end[-1]) - 1) // h + 1
    first_col, last_col = fg_start // h, (fg_end - 1) // h
    if bool((first_col != last_col).any()):  # a run across a column boundary covers rows 0 and h - 1
        row0, row1 = 0, h
    else:
        row0, row1 = int((fg_start % h).min()), int(((fg_end - 1) % h).max()) + 1
    offset = col0 * h
    n_strip = (col1 - col0) * h
    # the columns col0..col1-1 as one column-major strip: background / object runs in turn
    edges = np.empty(2 * fg_start.size + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, n_strip
    edges[1:-1:2], edges[2:-1:2] = fg_start - offset, fg_end - offset
    values = np.zeros(edges.size - 1, dtype=np.uint8)
    values[1::2] = 1
    strip = np.repeat(values, np.diff(edges))
    columns = strip.reshape(col1 - col0, h)[:, row0:row1]  # the box, transposed
    return _count_labelled_parts(np.ascontiguousarray(columns), total, min_part_pixels, min_part_fraction)


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
