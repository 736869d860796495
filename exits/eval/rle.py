"""COCO segmentations to one canonical form: compressed RLE with ``bytes`` counts.

Everything in ``exits.eval`` hands masks around as pycocotools' own compressed RLE,
``{"size": [height, width], "counts": b"..."}`` (``counts`` always ``bytes``, as
``pycocotools.mask.encode`` / ``frPyObjects`` / ``merge`` return it). Inputs may come in
any of the three COCO forms (polygons, uncompressed RLE, compressed RLE with ``str`` or
``bytes`` counts); :func:`segmentation_to_rle` turns them into the canonical form the way
``COCO.annToRLE`` does. Errors are ``ValueError`` with a message saying what is wrong;
callers add where (file, annotation id).
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

Rle = dict[str, Any]
"""Compressed RLE: ``{"size": [h, w], "counts": bytes}``."""


def _check_size(size: Any) -> tuple[int, int]:
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)
        or min(size) < 0
    ):
        raise ValueError(f"RLE 'size' must be [height, width] non-negative integers, got {size!r}")
    return int(size[0]), int(size[1])


def polygons_to_rle(polygons: list[Any], height: int, width: int) -> Rle | None:
    """Polygons ``[[x1, y1, x2, y2, ...], ...]`` to one merged RLE (union of the polygons).

    Polygons with fewer than 3 points (< 6 numbers) enclose no area and are dropped, as
    Detectron2 does; pycocotools would otherwise read a 4-number polygon as a *box*.
    Returns ``None`` when no polygon is left (the caller treats that as "no segmentation").

    Raises:
        ValueError: a polygon that is not a flat list of finite numbers of even length.
    """
    kept: list[list[float]] = []
    for k, poly in enumerate(polygons):
        if not isinstance(poly, (list, tuple)):
            raise ValueError(f"polygon {k} is a {type(poly).__name__}, expected a list of numbers")
        # the exact-type test first: ~10x cheaper than the ABC check for json's ints and floats
        if not (all(type(v) is float or type(v) is int for v in poly)
                or all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in poly)):
            raise ValueError(f"polygon {k} holds non-numeric coordinates")
        if len(poly) % 2 != 0:
            raise ValueError(f"polygon {k} has an odd number of coordinates ({len(poly)})")
        coords = np.asarray(poly, dtype=np.float64)
        if not np.all(np.isfinite(coords)):
            raise ValueError(f"polygon {k} holds non-finite coordinates")
        # pycocotools' rleFrPoly walks every up-sampled pixel along each edge: a coordinate
        # like 1e9 exhausts memory and 1e308 crashes the process. Nothing real lies that far out.
        xs, ys = coords[0::2], coords[1::2]
        if xs.size and (xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height):
            raise ValueError(f"polygon {k} reaches far outside the {width}x{height} image")
        if len(poly) >= 6:
            kept.append([float(v) for v in poly])
    if not kept:
        return None
    return mask_utils.merge(mask_utils.frPyObjects(kept, height, width))


def uncompressed_rle_to_rle(segmentation: dict[str, Any]) -> Rle:
    """``{"size": [h, w], "counts": [int, ...]}`` (column-major run lengths) to compressed RLE.

    Raises:
        ValueError: bad size, non-integer / negative runs, or runs not summing to h * w.
    """
    h, w = _check_size(segmentation.get("size"))
    counts = segmentation["counts"]
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in counts):
        raise ValueError("uncompressed RLE 'counts' must be non-negative integers")
    total = int(sum(int(v) for v in counts))
    if total != h * w:
        raise ValueError(f"uncompressed RLE runs sum to {total}, but size {h}x{w} has {h * w} pixels")
    return mask_utils.frPyObjects({"size": [h, w], "counts": [int(v) for v in counts]}, h, w)


def compressed_rle_to_rle(segmentation: dict[str, Any]) -> Rle:
    """``{"size": [h, w], "counts": "str or bytes"}`` to the canonical form (bytes counts)."""
    h, w = _check_size(segmentation.get("size"))
    counts = segmentation["counts"]
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError as exc:
            raise ValueError("compressed RLE 'counts' must be ASCII") from exc
    if not isinstance(counts, bytes):
        raise ValueError(f"compressed RLE 'counts' must be str or bytes, got {type(counts).__name__}")
    return {"size": [h, w], "counts": counts}


def to_rle(rle: dict[str, Any]) -> Rle:
    """Any RLE dict (compressed with str/bytes counts, or uncompressed) to canonical form."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError("an RLE must be a dict with 'size' and 'counts'")
    if isinstance(rle["counts"], (list, tuple)):
        return uncompressed_rle_to_rle(rle)
    return compressed_rle_to_rle(rle)


def segmentation_to_rle(segmentation: Any, height: int | None, width: int | None) -> Rle | None:
    """A COCO/LVIS ``segmentation`` field to compressed RLE, like ``COCO.annToRLE``.

    Args:
        segmentation: polygons (list of lists), uncompressed RLE (dict, list counts) or
            compressed RLE (dict, str/bytes counts).
        height, width: the image size; required for polygons, checked against an RLE's
            ``size`` when given.
    Returns:
        The RLE, or ``None`` when the segmentation is empty or every polygon is degenerate.
    Raises:
        ValueError: malformed segmentation or an RLE whose size differs from the image.
    """
    if segmentation is None:
        return None
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            return None
        if height is None or width is None:
            raise ValueError("polygon segmentation needs the image height and width")
        return polygons_to_rle(segmentation, height, width)
    if isinstance(segmentation, dict):
        rle = to_rle(segmentation)
        if height is not None and width is not None and tuple(rle["size"]) != (height, width):
            raise ValueError(f"RLE size {rle['size']} differs from the image size [{height}, {width}]")
        return rle
    raise ValueError(f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}")


def rle_area(rle: Rle) -> int:
    """Number of foreground pixels of an RLE (no decoding)."""
    return int(mask_utils.area(rle))


def encode_mask(mask: np.ndarray) -> Rle:
    """(H, W) binary array to compressed RLE."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    return mask_utils.encode(np.asfortranarray(m != 0, dtype=np.uint8))


def encode_rle_json(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) binary array to a JSON-safe compressed RLE: ``{"size": [H, W], "counts": str}``
    (the form COCO json files and results carry)."""
    rle = encode_mask(mask)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: Rle) -> np.ndarray:
    """Compressed RLE to an (H, W) bool array."""
    return mask_utils.decode(rle).astype(bool)


def compressed_counts_to_runs(counts: bytes | str) -> np.ndarray:
    """The run lengths (int64, background first, column-major) of compressed RLE ``counts``.

    The inverse of pycocotools' ``rleToString`` (``rleFrString`` in numpy): each value is
    written in 5-bit groups, low first, as characters ``48 + group`` with bit 0x20 set while
    more groups follow and bit 0x10 of the last group its sign; from the fourth value on, a
    value is stored as its difference to the value two places before it.
    """
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero((c & 0x20) == 0)  # the last character of each value
    if ends.size == 0:
        return np.zeros(0, np.int64)
    n_chars = int(ends[-1]) + 1  # a value cut off at the end of the string is dropped
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    shift = 5 * (np.arange(n_chars, dtype=np.int64) - np.repeat(starts, lengths))
    x = np.add.reduceat((c[:n_chars] & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(np.int64(1), 5 * lengths[negative])
    runs = x
    if runs.size > 3:
        runs = x.copy()
        runs[1::2] = np.cumsum(x[1::2])
        runs[2::2] = np.cumsum(x[2::2])
    return runs
