"""Pseudo masks against GT masks: per-object IoU, parts, separated subset, mIoU summary.

Evaluation side only: GT masks are read here through :mod:`exits.eval` (the leak boundary)
and nothing computed here flows back into training. The IoU / mIoU / separated math lives
in :mod:`exits.eval`; this module wires it together for one set of predictions, in memory
(the whole GT json, a :class:`exits.eval.GtInstance` per object): small sets, and the
reference the streaming report (:mod:`exits.report.streaming`) is tested equal to.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from exits.eval import (
    GtInstance,
    category_names_from_coco,
    count_parts,
    gt_instances_from_coco,
    instance_ious,
    load_separated_ids,
    per_object_table,
    read_gt_json,
    separated_from_parts,
    summarize_miou,
)

DERIVED_FROM_GT = "derived_from_gt_masks"


@dataclass(frozen=True)
class Evaluation:
    """Everything the report needs about one evaluation.

    ``rows`` are :func:`exits.eval.per_object_table` rows (sorted by ann id, crowd regions
    included with ``iscrowd=True``); ``summary`` is :func:`exits.eval.summarize_miou`'s dict
    plus ``separated_source`` (the id-list path, or ``"derived_from_gt_masks"``) and
    ``separated_rule`` (the part thresholds when derived, else ``None``).
    """

    gt: dict[int, GtInstance]
    ious: dict[int, float]
    parts: dict[int, int]
    separated: set[int]
    category_names: dict[int, str]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def evaluate_predictions(pred: Mapping[int, dict], gt_json: str | Path, *, ann_ids: set[int] | None = None,
                         separated_ids_path: str | Path | None = None, min_part_pixels: int = 16,
                         min_part_fraction: float = 0.05) -> Evaluation:
    """Evaluate predicted RLEs ``{ann_id: rle}`` against the GT masks in ``gt_json``.

    Objects evaluated: GT objects with masks among ``ann_ids`` (default: all predicted ids);
    a GT object with no prediction scores IoU 0. Separated subset: the ids listed in
    ``separated_ids_path`` when given (e.g. the official Separated-COCO list), else GT masks
    with >= 2 visible parts by the part thresholds (see :mod:`exits.eval.separated`).

    Raises:
        ValueError: none of the wanted objects has a GT mask (nothing to evaluate).
    """
    data = read_gt_json(gt_json)
    wanted = set(pred) if ann_ids is None else set(ann_ids)
    gt = gt_instances_from_coco(data, source=str(gt_json), ann_ids=wanted)
    if not gt:
        raise ValueError(f"{gt_json}: none of the {len(wanted)} evaluated objects has a GT mask")
    ious = instance_ious({i: pred[i] for i in gt if i in pred}, gt)
    parts = count_parts(gt, min_part_pixels, min_part_fraction)
    if separated_ids_path:
        separated = load_separated_ids(separated_ids_path) & set(gt)
        source, rule = str(separated_ids_path), None
    else:
        separated = separated_from_parts(parts, gt)
        source = DERIVED_FROM_GT
        rule = {"min_parts": 2, "min_part_pixels": int(min_part_pixels), "min_part_fraction": float(min_part_fraction),
                "connectivity": 8}
    names = category_names_from_coco(data)
    summary = summarize_miou(ious, gt, separated, names)
    summary["separated_source"] = source
    summary["separated_rule"] = rule
    rows = per_object_table(ious, gt, separated, parts=parts)
    return Evaluation(gt=gt, ious=ious, parts=parts, separated=separated, category_names=names,
                      summary=summary, rows=rows)


def evaluate_masks(pred: Mapping[int, dict], gt_json: str | Path, *, ann_ids: set[int] | None = None,
                   separated_ids_path: str | Path | None = None, min_part_pixels: int = 16,
                   min_part_fraction: float = 0.05) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """mIoU summary and per-object rows of predicted RLEs vs GT masks (see
    :func:`evaluate_predictions`)."""
    ev = evaluate_predictions(pred, gt_json, ann_ids=ann_ids, separated_ids_path=separated_ids_path,
                              min_part_pixels=min_part_pixels, min_part_fraction=min_part_fraction)
    return ev.summary, ev.rows


def pseudo_label_rles(pseudo_json: str | Path) -> tuple[dict[int, dict], dict[int, float]]:
    """``{ann_id: rle}`` and ``{ann_id: score}`` (NaN when absent) from a pseudo_labels.json.

    When the run's ``pseudo_labels.parquet`` beside it is at least as new, its columns are
    read instead (the same objects and values: score rounded to 5 digits as in the json),
    without parsing the json.
    """
    from exits.run_folder import RunFolder

    run = RunFolder(Path(pseudo_json).parent)
    pq_path = run.pseudo_parquet
    if Path(pseudo_json).name == run.pseudo_json.name and pq_path.is_file() and pq_path.stat().st_mtime_ns >= Path(pseudo_json).stat().st_mtime_ns:
        import numpy as np
        import pyarrow.parquet as pq

        t = pq.read_table(pq_path, columns=["ann_id", "height", "width", "rle_counts", "score"])
        ids = t["ann_id"].to_pylist()
        h, w = t["height"].to_numpy(), t["width"].to_numpy()
        rles = {a: {"size": [int(h[i]), int(w[i])], "counts": c} for i, (a, c) in enumerate(zip(ids, t["rle_counts"].to_pylist()))}
        score = t["score"].to_numpy(zero_copy_only=False).astype(np.float64)
        return rles, {a: round(float(v), 5) if np.isfinite(v) else float("nan") for a, v in zip(ids, score)}
    with open(pseudo_json, encoding="utf-8") as fh:
        data = json.load(fh)
    rles = {int(a["id"]): a["segmentation"] for a in data["annotations"]}
    scores = {int(a["id"]): float(a["score"]) if a.get("score") is not None else float("nan")
              for a in data["annotations"]}
    return rles, scores
