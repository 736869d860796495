"""mIoU summaries of pseudo masks: all, separated, non-separated, per category, per size.

mIoU of a set S of objects = (1 / |S|) * sum_{i in S} IoU_i, IoU as a fraction in [0, 1]
(not a percentage; only :func:`format_summary_markdown` prints percentages). An empty set
has mIoU ``None`` (JSON null). The evaluated objects are the keys of ``ious``; with
:func:`exits.eval.mask_iou.instance_ious` that is every GT object, a missing prediction
counting 0. Crowd regions are left out unless ``include_crowd``: they are groups of objects.

Size buckets follow COCO, by the GT ``area``: small < 32², medium 32² <= area < 96²,
large >= 96².
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from exits.eval.ground_truth import GtInstance
from exits.eval.separated import DEFAULT_MIN_PART_FRACTION, DEFAULT_MIN_PART_PIXELS, count_parts_rle

SMALL_MAX_AREA = 32**2
MEDIUM_MAX_AREA = 96**2
SIZE_BUCKETS = ("small", "medium", "large")


def size_bucket(area: float) -> str:
    """COCO size bucket of a GT area: "small" (< 32²), "medium" (< 96²) or "large"."""
    if area < SMALL_MAX_AREA:
        return "small"
    if area < MEDIUM_MAX_AREA:
        return "medium"
    return "large"


def _mean_stats(values: Iterable[float]) -> dict[str, Any]:
    vals = list(values)
    return {"count": len(vals), "miou": (sum(vals) / len(vals)) if vals else None}


def _evaluated_ids(ious: Mapping[int, float], gt: Mapping[int, GtInstance], include_crowd: bool) -> list[int]:
    missing = [i for i in ious if i not in gt]
    if missing:
        raise KeyError(f"{len(missing)} evaluated annotation ids have no GT instance, e.g. {sorted(missing)[:5]}")
    return sorted(i for i in ious if include_crowd or not gt[i].iscrowd)


def summarize_miou(
    ious: Mapping[int, float],
    gt: Mapping[int, GtInstance],
    separated: set[int],
    category_names: Mapping[int, str] | None = None,
    include_crowd: bool = False,
) -> dict[str, Any]:
    """mIoU summary as plain JSON-able values.

    Args:
        ious: ``{ann_id: IoU}`` (fractions), the objects to evaluate.
        gt: GT instances; must hold every id of ``ious``.
        separated: ids of separated objects (ids not evaluated are ignored).
        category_names: ``{category_id: name}``; the id as a string when absent.
        include_crowd: evaluate crowd regions too.
    Returns:
        ``{"iou_unit": "fraction", "all"|"separated"|"non_separated": {"count", "miou"},
        "per_size": {bucket: {"count", "miou", "separated_count", "separated_miou"}},
        "per_category": [{"category_id", "name", "count", "miou", "separated_count",
        "separated_miou"}, ...] (by category id), "crowd_excluded": int,
        "size_thresholds": {...}}``.
    """
    ids = _evaluated_ids(ious, gt, include_crowd)
    names = category_names or {}
    is_sep = {i: i in separated for i in ids}

    by_size: dict[str, list[int]] = {b: [] for b in SIZE_BUCKETS}
    by_cat: dict[int, list[int]] = defaultdict(list)
    for i in ids:
        by_size[size_bucket(gt[i].area)].append(i)
        by_cat[gt[i].category_id].append(i)

    def split_stats(members: list[int]) -> dict[str, Any]:
        whole = _mean_stats(float(ious[i]) for i in members)
        sep = _mean_stats(float(ious[i]) for i in members if is_sep[i])
        return {
            "count": whole["count"],
            "miou": whole["miou"],
            "separated_count": sep["count"],
            "separated_miou": sep["miou"],
        }

    per_category = []
    for cat_id in sorted(by_cat):
        row = {"category_id": int(cat_id), "name": str(names.get(cat_id, cat_id))}
        row.update(split_stats(by_cat[cat_id]))
        per_category.append(row)

    return {
        "iou_unit": "fraction",
        "all": _mean_stats(float(ious[i]) for i in ids),
        "separated": _mean_stats(float(ious[i]) for i in ids if is_sep[i]),
        "non_separated": _mean_stats(float(ious[i]) for i in ids if not is_sep[i]),
        "per_size": {b: split_stats(by_size[b]) for b in SIZE_BUCKETS},
        "per_category": per_category,
        "crowd_excluded": sum(1 for i in ious if gt[i].iscrowd) if not include_crowd else 0,
        "size_thresholds": {"small_below_area": SMALL_MAX_AREA, "medium_below_area": MEDIUM_MAX_AREA},
    }


def sum_in_order(values: np.ndarray) -> float | int:
    """``sum(list(values))`` of a float column, without the list: Python's own ``sum`` over the
    values in order (so exactly the number the per-object summaries add up, whichever
    summation Python uses), fed in chunks so memory stays flat."""
    def items() -> Iterator[float]:
        for start in range(0, values.size, _SUM_CHUNK):
            yield from values[start : start + _SUM_CHUNK].tolist()

    return sum(items())


_SUM_CHUNK = 1 << 16


def _column_stats(values: np.ndarray) -> dict[str, Any]:
    n = int(values.size)
    return {"count": n, "miou": (sum_in_order(values) / n) if n else None}


def summarize_miou_columns(
    iou: np.ndarray,
    iscrowd: np.ndarray,
    separated: np.ndarray,
    area: np.ndarray,
    category_id: np.ndarray,
    category_names: Mapping[int, str] | None = None,
    include_crowd: bool = False,
) -> dict[str, Any]:
    """:func:`summarize_miou` of per-object columns (n,) sorted by annotation id, e.g. those of
    a report's metrics.parquet: the same dict, the same numbers (every mean adds the same
    floats in the same order), no Python object per object.

    Args:
        iou: float IoUs; iscrowd, separated: bool; area: the GT area (size bucket);
            category_id: int.
    """
    iou = np.asarray(iou, dtype=np.float64)
    iscrowd = np.asarray(iscrowd, dtype=bool)
    keep = np.ones(iou.size, dtype=bool) if include_crowd else ~iscrowd
    iou_k = iou[keep]
    sep_k = np.asarray(separated, dtype=bool)[keep]
    area_k = np.asarray(area, dtype=np.float64)[keep]
    cat_k = np.asarray(category_id, dtype=np.int64)[keep]
    names = category_names or {}

    def split_stats(members: np.ndarray) -> dict[str, Any]:
        whole = _column_stats(iou_k[members])
        sep = _column_stats(iou_k[members[sep_k[members]]])
        return {"count": whole["count"], "miou": whole["miou"], "separated_count": sep["count"],
                "separated_miou": sep["miou"]}

    # size_bucket's comparisons, element-wise (a NaN area is "large" there too)
    bucket = np.where(area_k < SMALL_MAX_AREA, 0, np.where(area_k < MEDIUM_MAX_AREA, 1, 2))
    per_size = {b: split_stats(np.flatnonzero(bucket == k)) for k, b in enumerate(SIZE_BUCKETS)}
    per_category = []
    order = np.argsort(cat_k, kind="stable")  # by category, table order inside each
    cats, starts = np.unique(cat_k[order], return_index=True)
    for cat_id, members in zip(cats.tolist(), np.split(order, starts[1:])):
        row = {"category_id": int(cat_id), "name": str(names.get(cat_id, cat_id))}
        row.update(split_stats(members))
        per_category.append(row)
    return {
        "iou_unit": "fraction",
        "all": _column_stats(iou_k),
        "separated": _column_stats(iou_k[sep_k]),
        "non_separated": _column_stats(iou_k[~sep_k]),
        "per_size": per_size,
        "per_category": per_category,
        "crowd_excluded": int(np.count_nonzero(iscrowd)) if not include_crowd else 0,
        "size_thresholds": {"small_below_area": SMALL_MAX_AREA, "medium_below_area": MEDIUM_MAX_AREA},
    }


def per_object_table(
    ious: Mapping[int, float],
    gt: Mapping[int, GtInstance],
    separated: set[int],
    parts: Mapping[int, int] | None = None,
    min_part_pixels: int = DEFAULT_MIN_PART_PIXELS,
    min_part_fraction: float = DEFAULT_MIN_PART_FRACTION,
) -> list[dict[str, Any]]:
    """One row per evaluated object (crowd included, flagged), sorted by annotation id.

    Rows: ``{"ann_id", "image_id", "category_id", "area", "size", "iscrowd", "parts",
    "separated", "iou"}``. ``parts`` comes from the given mapping, else it is counted from
    the GT mask with the part thresholds (decodes each mask: pass ``parts`` when you
    already have it).
    """
    rows = []
    for i in sorted(ious):
        if i not in gt:
            raise KeyError(f"annotation {i} has an IoU but no GT instance")
        inst = gt[i]
        n_parts = parts[i] if parts is not None and i in parts else count_parts_rle(
            inst.rle, min_part_pixels, min_part_fraction
        )
        rows.append(
            {
                "ann_id": int(i),
                "image_id": inst.image_id,
                "category_id": inst.category_id,
                "area": float(inst.area),
                "size": size_bucket(inst.area),
                "iscrowd": bool(inst.iscrowd),
                "parts": int(n_parts),
                "separated": i in separated,
                "iou": float(ious[i]),
            }
        )
    return rows


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f}"


def format_summary_markdown(summary: Mapping[str, Any], max_categories: int | None = 20) -> str:
    """Markdown tables of a :func:`summarize_miou` result (mIoU printed as percentages).

    Categories are listed most numerous first, at most ``max_categories`` (all if None).
    """
    lines = ["| Subset | Objects | mIoU (%) |", "|---|---:|---:|"]
    for label, key in (("All", "all"), ("Separated", "separated"), ("Non-separated", "non_separated")):
        s = summary[key]
        lines.append(f"| {label} | {s['count']} | {_pct(s['miou'])} |")
    for bucket in SIZE_BUCKETS:
        s = summary["per_size"][bucket]
        lines.append(f"| {bucket.capitalize()} | {s['count']} | {_pct(s['miou'])} |")
    if summary.get("crowd_excluded"):
        lines.append("")
        lines.append(f"{summary['crowd_excluded']} crowd regions not evaluated.")

    cats = sorted(summary["per_category"], key=lambda r: (-r["count"], r["category_id"]))
    shown = cats if max_categories is None else cats[:max_categories]
    if shown:
        lines += [
            "",
            "| Category | Objects | mIoU (%) | Separated | Separated mIoU (%) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in shown:
            name = str(r["name"]).replace("|", "\\|")
            lines.append(
                f"| {name} | {r['count']} | {_pct(r['miou'])} | {r['separated_count']} | {_pct(r['separated_miou'])} |"
            )
        if len(cats) > len(shown):
            lines.append("")
            lines.append(f"{len(cats) - len(shown)} more categories in the JSON summary.")
    return "\n".join(lines) + "\n"
