"""Per-object metrics table, score-vs-IoU calibration and the report summary (pure functions).

The mIoU math itself is :mod:`exits.eval.miou`; here the per-object rows get their
category name, pseudo-label score and points source, and the summary gets what a report
reader asks next: how many objects are separated, and whether the pseudo-label score ranks
masks the way their IoU does (the spot-fix queue is ordered by that score).

Crowd regions stay in the table (``iscrowd=True``) but, as in the mIoU summary, are left out
of calibration and of the worst-object gallery: they are groups of objects.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from exits.eval.miou import sum_in_order

METRICS_SCHEMA = pa.schema(
    [
        ("ann_id", pa.int64()),
        ("image_id", pa.int64()),
        ("category_id", pa.int64()),
        ("category", pa.string()),
        ("area", pa.float64()),
        ("size", pa.string()),
        ("iscrowd", pa.bool_()),
        ("parts", pa.int32()),
        ("separated", pa.bool_()),
        ("iou", pa.float64()),
        ("score", pa.float64()),
        ("points_source", pa.string()),
    ]
)

DEFAULT_SCORE_BINS = 10
WORST_FRACTION = 0.1


def finite_or_none(value: float | None) -> float | None:
    """``None`` for NaN/inf/None (JSON has no NaN), else the value as float."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def object_metrics_table(rows: Sequence[Mapping[str, Any]], category_names: Mapping[int, str],
                         scores: Mapping[int, float], points_source: Mapping[int, str] | None = None) -> pa.Table:
    """One row per evaluated object (``METRICS_SCHEMA``), in the order of ``rows``.

    Args:
        rows: :func:`exits.eval.per_object_table` rows.
        category_names: ``{category_id: name}`` (the id as text when absent).
        scores: ``{ann_id: pseudo-label score}``; missing -> NaN.
        points_source: ``{ann_id: "annotated" | "derived" ...}`` from the instances table;
            missing -> null.
    """
    sources = points_source or {}
    cols: dict[str, list[Any]] = {name: [] for name in METRICS_SCHEMA.names}
    for r in rows:
        ann_id = int(r["ann_id"])
        cols["ann_id"].append(ann_id)
        cols["image_id"].append(int(r["image_id"]))
        cols["category_id"].append(int(r["category_id"]))
        cols["category"].append(str(category_names.get(int(r["category_id"]), r["category_id"])))
        cols["area"].append(float(r["area"]))
        cols["size"].append(str(r["size"]))
        cols["iscrowd"].append(bool(r["iscrowd"]))
        cols["parts"].append(int(r["parts"]))
        cols["separated"].append(bool(r["separated"]))
        cols["iou"].append(float(r["iou"]))
        cols["score"].append(float(scores.get(ann_id, float("nan"))))
        cols["points_source"].append(sources.get(ann_id))
    return pa.table(cols, schema=METRICS_SCHEMA)


def spearman_rank_correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho = Pearson correlation of the ranks of x and y (ties: average ranks).

    x, y: (n,) finite values. ``None`` when n < 3 or either side is constant (undefined).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return finite_or_none(stats.spearmanr(x, y).statistic)


def score_calibration(scores: np.ndarray, ious: np.ndarray, n_bins: int = DEFAULT_SCORE_BINS) -> dict[str, Any]:
    """How well the pseudo-label score predicts the mask's IoU.

    Objects with a non-finite score are left out. With n objects sorted by score (stable:
    ties keep their given order), the bins are ``np.array_split`` of that order into
    ``min(n_bins, n)`` equal-count groups (score quantiles, deciles by default: scores tend
    to crowd near 1, so fixed-width bins would leave most of them empty).

    Returns:
        ``{"count", "spearman" (rho of score vs IoU), "pearson", "binning",
        "bins": [{"bin", "count", "score_min", "score_max", "score_mean", "miou"}],
        "worst_decile_overlap"}``, where worst_decile_overlap = |L_s ∩ L_iou| / k with
        k = ceil(0.1 n) and L_s, L_iou the k lowest-score and k lowest-IoU objects (ties by
        given order): the share of a score-ordered fix queue's first tenth that are truly
        among the worst tenth (≈ 0.1 for a random score, 1 for a perfect one). None-valued
        when undefined (too few objects, constant inputs).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    v = np.asarray(ious, dtype=np.float64).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"scores {s.shape} and ious {v.shape} differ in length")
    keep = np.isfinite(s) & np.isfinite(v)
    s, v = s[keep], v[keep]
    n = int(s.size)
    out: dict[str, Any] = {"count": n, "spearman": spearman_rank_correlation(s, v), "pearson": None,
                           "binning": "equal-count score quantiles", "bins": [], "worst_decile_overlap": None}
    if n == 0:
        return out
    if n >= 3 and np.ptp(s) > 0 and np.ptp(v) > 0:
        out["pearson"] = finite_or_none(np.corrcoef(s, v)[0, 1])
    order = np.argsort(s, kind="stable")
    for b, members in enumerate(np.array_split(order, min(int(n_bins), n))):
        out["bins"].append({
            "bin": b,
            "count": int(members.size),
            "score_min": float(s[members].min()),
            "score_max": float(s[members].max()),
            "score_mean": float(s[members].mean()),
            "miou": float(v[members].mean()),
        })
    k = math.ceil(WORST_FRACTION * n)
    if n >= 2:
        low_score = set(order[:k].tolist())
        low_iou = set(np.argsort(v, kind="stable")[:k].tolist())
        out["worst_decile_overlap"] = len(low_score & low_iou) / k
    return out


def group_miou(table: pa.Table, column: str) -> dict[str, dict[str, Any]]:
    """``{value: {"count", "miou"}}`` of the non-crowd rows grouped by ``column`` (nulls skipped),
    by ``str(value)``; each mean adds the group's IoUs in table order. ``column`` may be
    dictionary-encoded (as metrics.parquet is read for a large run)."""
    rows = table.filter(pc.invert(table["iscrowd"]))
    ious = np.asarray(rows["iou"].to_numpy(zero_copy_only=False), dtype=np.float64)
    col = rows[column]
    if pa.types.is_dictionary(col.type):  # row groups may carry different dictionaries
        col = col.cast(col.type.value_type)
    col = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    codes = np.asarray(pc.fill_null(col.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    codes_of: dict[str, list[int]] = {}
    for code, value in enumerate(col.dictionary.to_pylist()):
        if value is not None:
            codes_of.setdefault(str(value), []).append(code)
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(codes_of):
        vals = ious[np.isin(codes, codes_of[key])]
        if vals.size:
            out[key] = {"count": int(vals.size), "miou": sum_in_order(vals) / vals.size}
    return out


def worst_objects(table: pa.Table, n: int) -> list[int]:
    """Ann ids of the ``n`` non-crowd objects with the lowest IoU (ties: lower ann id first)."""
    rows = table.filter(pc.invert(table["iscrowd"]))
    ids = np.asarray(rows["ann_id"].to_numpy(zero_copy_only=False))
    ious = np.asarray(rows["iou"].to_numpy(zero_copy_only=False))
    order = np.lexsort((ids, ious))
    return [int(i) for i in ids[order[: max(int(n), 0)]]]


def calibration_of(table: pa.Table, n_bins: int = DEFAULT_SCORE_BINS) -> dict[str, Any]:
    """:func:`score_calibration` over the table's non-crowd rows."""
    rows = table.filter(pc.invert(table["iscrowd"]))
    return score_calibration(rows["score"].to_numpy(zero_copy_only=False),
                             rows["iou"].to_numpy(zero_copy_only=False), n_bins)


def report_summary(miou_summary: Mapping[str, Any], table: pa.Table, calibration: Mapping[str, Any], *,
                   n_predicted: int, inputs: Mapping[str, Any], worst_ann_ids: Sequence[int]) -> dict[str, Any]:
    """The report's summary.json: the mIoU summary plus counts, separated share, calibration.

    Added keys: ``"objects"`` ({"predicted", "evaluated" (non-crowd with a GT mask),
    "without_gt_mask", "crowd"}), ``"separated_objects"`` ({"count", "share"} of evaluated
    objects), ``"per_points_source"``, ``"calibration"``, ``"inputs"``, ``"worst_ann_ids"``.
    """
    summary = dict(miou_summary)
    n_all = int(summary["all"]["count"])
    n_sep = int(summary["separated"]["count"])
    n_crowd = int(pc.sum(table["iscrowd"]).as_py() or 0)
    summary["objects"] = {"predicted": int(n_predicted), "evaluated": n_all,
                          "without_gt_mask": int(n_predicted) - table.num_rows, "crowd": n_crowd}
    summary["separated_objects"] = {"count": n_sep, "share": (n_sep / n_all) if n_all else None}
    summary["per_points_source"] = group_miou(table, "points_source")
    summary["calibration"] = dict(calibration)
    summary["inputs"] = dict(inputs)
    summary["worst_ann_ids"] = [int(i) for i in worst_ann_ids]
    return summary
