"""Detections -> COCO results, shared by every backend."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from exits.eval.rle import encode_rle_json


def coco_results(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, category_ids: Sequence[int],
                 masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO results of one image.

    Args:
        boxes_xyxy: (N, 4) detector boxes [x1, y1, x2, y2] (written as [x, y, w, h]).
        scores: (N,). category_ids: N dataset category ids.
        masks: (N, H, W) binary masks at the original image size (RLE, str counts, so the
            results serialise to json).
    """
    results = []
    for k in range(len(scores)):
        x1, y1, x2, y2 = (float(v) for v in boxes_xyxy[k])
        results.append({
            "image_id": int(image_id),
            "category_id": int(category_ids[k]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[k]),
            "segmentation": encode_rle_json(masks[k]),
        })
    return results
