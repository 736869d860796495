"""The labelling step: where an annotation has no extreme points, click them from its mask.

This simulates the annotator (as ExtremeNet did for COCO). It is the only place on the
training side that may look at a segmentation, it does so only for annotations that lack
``extreme_points``, and it returns points, never the mask.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from exits.data.extreme_points import derive_extreme_points


class MaskToPoints:
    """Derive extreme points from an annotation's polygon/RLE via the dataset API.

    ``api`` is a pycocotools ``COCO`` (``annToMask``) or an ``lvis.LVIS`` (``ann_to_mask``);
    both decode polygons and RLE the same way the official tools do.
    """

    def __init__(self, api: Any):
        self._api = api
        self._to_mask = getattr(api, "annToMask", None) or getattr(api, "ann_to_mask")

    def __call__(self, ann: dict) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:
            raise ValueError("annotation has neither extreme_points nor a segmentation")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                mask = self._to_mask(ann)
        except Exception as exc:  # pycocotools raises bare TypeError/KeyError on bad input
            raise ValueError(f"segmentation cannot be decoded: {type(exc).__name__}: {exc}") from exc
        if not mask.any():
            raise ValueError("segmentation decodes to an empty mask")
        return derive_extreme_points(mask)
