"""What a spot-fix session reviews: one pseudo-labelled object and the image it is on.

:class:`ReviewObject` is one object as the review pages show it (pseudo mask as RLE, score,
visible parts of the pseudo mask, extreme points, stage-1 crop window), :class:`ImageInfo`
its image's file and size. :func:`review_object_from_json` makes one from a
``pseudo_labels.json`` annotation (older runs, without the Parquet columns that
:mod:`exits.spotfix.catalog_columns` reads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from exits.spotfix.masks import rle_parts

# Crop margins of the demo/paper configs, used only when instances.parquet is absent.
FALLBACK_MARGIN, FALLBACK_MIN_MARGIN_PX = 0.15, 4


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class ReviewObject:
    """One pseudo-labelled object; ``rle`` is its pseudo mask, ``score`` its quality score
    (``None`` when the run has none), ``parts`` the visible parts of the pseudo mask."""

    ann_id: int
    image_id: int
    category_id: int
    score: float | None
    parts: int
    extreme_points: tuple[tuple[float, float], ...]
    crop_box: tuple[int, int, int, int]
    rle: dict[str, Any]

    @property
    def separated(self) -> bool:
        return self.parts >= 2

    @property
    def sort_key(self) -> tuple[float, int]:
        # Worst first; objects without a score are unknown quality, so they come first too.
        return (-math.inf if self.score is None else self.score, self.ann_id)


def review_object_from_json(ann: dict[str, Any], images: dict[int, ImageInfo], geometry: dict) -> ReviewObject | None:
    """A json annotation -> ReviewObject; ``None`` for objects that cannot be reviewed
    (no RLE pseudo mask, no extreme points, unknown image). ``geometry``: the run's
    ``{ann_id: object geometry}`` (its crop window), from
    :func:`exits.report.run_files.read_object_geometry`; an object missing there gets the
    crop window of the fallback margins."""
    seg, points = ann.get("segmentation"), ann.get("extreme_points")
    info = images.get(int(ann.get("image_id", -1)))
    if not isinstance(seg, dict) or points is None or info is None or "id" not in ann:
        return None
    pts = np.asarray(points, dtype=np.float64).reshape(4, 2)
    ann_id = int(ann["id"])
    geo = geometry.get(ann_id)
    if geo is not None:
        box = geo.crop_box
    else:
        from exits.data.crops import crop_window

        box = tuple(crop_window(pts, info.width, info.height, margin=FALLBACK_MARGIN,
                                min_margin_px=FALLBACK_MIN_MARGIN_PX, size=1).as_list())
    score = ann.get("score")
    rle = {"size": list(seg["size"]), "counts": seg["counts"]}
    return ReviewObject(
        ann_id=ann_id, image_id=info.image_id, category_id=int(ann.get("category_id", 0)),
        score=None if score is None else float(score), parts=rle_parts(rle),
        extreme_points=tuple((float(x), float(y)) for x, y in pts), crop_box=tuple(int(v) for v in box), rle=rle,
    )
