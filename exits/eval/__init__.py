"""Evaluation of pseudo masks against ground truth (the only side that reads GT masks).

See :mod:`exits.eval.ground_truth` for the leak boundary.
"""
from exits.eval.ground_truth import (
    GtFormatError,
    GtInstance,
    GtJsonStream,
    category_names_from_coco,
    gt_instances_from_coco,
    load_gt_masks,
    read_gt_json,
)
from exits.eval.mask_iou import instance_ious, pair_ious
from exits.eval.miou import (
    format_summary_markdown,
    per_object_table,
    size_bucket,
    sum_in_order,
    summarize_miou,
    summarize_miou_columns,
)
from exits.eval.separated import (
    count_mask_parts,
    count_parts,
    count_parts_rle,
    count_parts_runs,
    load_separated_ids,
    separated_ann_ids,
    separated_from_parts,
)

__all__ = [
    "GtFormatError",
    "GtInstance",
    "GtJsonStream",
    "category_names_from_coco",
    "count_mask_parts",
    "count_parts",
    "count_parts_rle",
    "count_parts_runs",
    "format_summary_markdown",
    "gt_instances_from_coco",
    "instance_ious",
    "load_gt_masks",
    "load_separated_ids",
    "pair_ious",
    "per_object_table",
    "read_gt_json",
    "separated_ann_ids",
    "separated_from_parts",
    "size_bucket",
    "sum_in_order",
    "summarize_miou",
    "summarize_miou_columns",
]
