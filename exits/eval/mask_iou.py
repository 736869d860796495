"""Per-object mask IoU between pseudo (predicted) masks and GT masks with the same id.

IoU(A, B) = |A ∧ B| / |A ∨ B| over pixels, computed on RLE by ``pycocotools.mask.iou``
(iscrowd=0) without decoding. Conventions:
- a GT id with no prediction scores 0 (the object was not labelled: a miss);
- two empty masks (empty union) score 1 (the prediction agrees exactly); pycocotools
  says 0 there, so that case is handled here;
- predictions whose id is not in ``gt`` are ignored.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import pycocotools.mask as mask_utils

from exits.eval.ground_truth import GtInstance
from exits.eval.rle import Rle, to_rle

# pycocotools.mask.iou(dt, gt) computes the full len(dt) x len(gt) matrix; only the diagonal
# is wanted. Blocks of 16 pairs keep the wasted off-diagonal work small while paying the
# Python call overhead once per block (measured ≈ 6 µs/pair vs ≈ 14 µs one pair per call,
# and ≈ 34 µs/pair for blocks of 256, on 480x640 masks).
_BLOCK = 16


def _gt_rle(value: GtInstance | Mapping[str, Any]) -> Rle:
    return value.rle if isinstance(value, GtInstance) else to_rle(dict(value))


def instance_ious(
    pred: Mapping[int, Mapping[str, Any]],
    gt: Mapping[int, GtInstance | Mapping[str, Any]],
) -> dict[int, float]:
    """IoU of ``pred[i]`` against ``gt[i]`` for every GT annotation id ``i``.

    Args:
        pred: ``{ann_id: RLE}``; compressed (str or bytes counts) or uncompressed RLE.
        gt: ``{ann_id: RLE or GtInstance}``.
    Returns:
        ``{ann_id: IoU in [0, 1]}`` with one entry per GT id (missing prediction -> 0.0).
    Raises:
        ValueError: a prediction whose size differs from its GT mask's.
    """
    out: dict[int, float] = {}
    # Pairs grouped by mask size: pycocotools needs equal sizes inside one iou call.
    groups: dict[tuple[int, int], list[tuple[int, Rle, Rle]]] = defaultdict(list)
    for ann_id, g in gt.items():
        g_rle = _gt_rle(g)
        p = pred.get(ann_id)
        if p is None:
            out[int(ann_id)] = 0.0
            continue
        p_rle = to_rle(dict(p))
        if list(p_rle["size"]) != list(g_rle["size"]):
            raise ValueError(
                f"annotation {ann_id}: predicted mask size {list(p_rle['size'])} differs from GT size {list(g_rle['size'])}"
            )
        groups[(int(g_rle["size"][0]), int(g_rle["size"][1]))].append((int(ann_id), p_rle, g_rle))

    for pairs in groups.values():
        ious = pair_ious([b[1] for b in pairs], [b[2] for b in pairs])
        for (ann_id, _, _), iou in zip(pairs, ious):
            out[ann_id] = iou
    return out


def pair_ious(pred: list[Rle], gt: list[Rle]) -> list[float]:
    """IoU of ``pred[k]`` against ``gt[k]`` for every k (canonical compressed RLEs, each pair of
    one size; pairs may differ in size from each other), in order; 1.0 for two empty masks."""
    out: list[float] = [0.0] * len(pred)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, g in enumerate(gt):
        by_size[(int(g["size"][0]), int(g["size"][1]))].append(k)
    for members in by_size.values():
        for start in range(0, len(members), _BLOCK):
            block = members[start : start + _BLOCK]
            p_rles = [pred[k] for k in block]
            g_rles = [gt[k] for k in block]
            matrix = mask_utils.iou(p_rles, g_rles, [0] * len(block))
            p_area = mask_utils.area(p_rles)
            g_area = mask_utils.area(g_rles)
            for j, k in enumerate(block):
                if p_area[j] == 0 and g_area[j] == 0:
                    out[k] = 1.0  # empty union: identical (empty) masks
                else:
                    out[k] = float(matrix[j, j])
    return out
