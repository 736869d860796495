"""A GT segmentation (polygons, uncompressed or compressed RLE) decoded to its mask, guarded.

:class:`SegmentationDecoder` is what :class:`exits.data.point_labels.MaskToPoints` needs of a
dataset API (``annToMask``) when the reader clicks extreme points from a mask: it decodes
as pycocotools / lvis do, given only the image sizes, after checking that the polygons or
RLE counts are safe to rasterise and fit their image (a bad one is a ``ValueError``, the
record's rejection message).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from exits.data.ids import as_int_id
from exits.data.validation import short_repr


class SegmentationDecoder:
    """What :class:`MaskToPoints` needs of the dataset API: ``annToMask``, decoding a polygon,
    uncompressed or compressed RLE exactly as pycocotools' ``COCO.annToRLE`` and lvis'
    ``LVIS.ann_to_rle`` do, given the image sizes (no index over all annotations). An RLE
    whose ``size`` is not its image's is refused (its mask would be another image's pixels)."""

    def __init__(self, sizes: dict[int, tuple[int, int]]):
        self.sizes = sizes

    def annToMask(self, ann: dict) -> np.ndarray:  # noqa: N802 - the pycocotools name
        import pycocotools.mask as mask_utils

        h, w = self.sizes[ann["image_id"]]
        segm = ann["segmentation"]
        if isinstance(segm, list):
            _check_polygons(segm, h, w)
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        else:
            size = segm.get("size") if isinstance(segm, dict) else None
            if not isinstance(size, list) or [as_int_id(v) for v in size] != [h, w]:
                raise ValueError(f"RLE size {short_repr(size)} is not the image's [height, width] [{h}, {w}]")
            counts = segm.get("counts")
            if isinstance(counts, list):
                _check_counts(counts, h, w)
                rle = mask_utils.frPyObjects(segm, h, w)
            elif isinstance(counts, (str, bytes)):
                rle = segm
            else:
                raise ValueError(f"RLE counts {short_repr(counts)} is neither a list nor a string")
        return mask_utils.decode(rle)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_polygons(polygons: list, h: int, w: int) -> None:
    """Polygons pycocotools can rasterise safely: lists of >= 3 finite [x, y] number pairs
    within one image size of the image (its ``rleFrPoly`` walks every upsampled pixel along
    each edge: a coordinate like 1e9 exhausts memory, 1e308 crashes the process)."""
    for poly in polygons:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_is_number(v) for v in poly):
            raise ValueError(f"polygon {short_repr(poly)} is not a list of >= 3 [x, y] number pairs")
        xs, ys = np.asarray(poly[0::2], dtype=np.float64), np.asarray(poly[1::2], dtype=np.float64)
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            raise ValueError(f"polygon {short_repr(poly)} has non-finite coordinates")
        if xs.min() < -w or xs.max() > 2 * w or ys.min() < -h or ys.max() > 2 * h:
            raise ValueError(f"polygon {short_repr(poly)} reaches far outside the {w}x{h} image")


def _check_counts(counts: list, h: int, w: int) -> None:
    """Uncompressed RLE counts: non-negative integers adding up to the image's h * w."""
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2 ** 32 for c in counts):
        raise ValueError(f"RLE counts {short_repr(counts)} are not non-negative integers")
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts add up to {sum(counts)}, not the image's {h} x {w} = {h * w} pixels")
