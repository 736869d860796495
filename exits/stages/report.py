"""Report: mIoU of a run's pseudo masks against GT masks (evaluation side only).

GT masks are read here, from the run's input json or a separate ``--gt`` file, and never
flow back into training.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from exits.eval import (
    category_names_from_coco,
    count_parts,
    format_summary_markdown,
    gt_instances_from_coco,
    instance_ious,
    load_separated_ids,
    per_object_table,
    read_gt_json,
    separated_from_parts,
    summarize_miou,
)
from exits.io import atomic_open, atomic_path, write_json

log = logging.getLogger(__name__)


def evaluate_masks(pred: Mapping[int, dict], gt_json: str | Path, *, ann_ids: set[int] | None = None,
                   separated_ids_path: str | Path | None = None, min_part_pixels: int = 16,
                   min_part_fraction: float = 0.05) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """mIoU summary and per-object rows of predicted RLEs ``{ann_id: rle}`` vs GT masks.

    Objects evaluated: GT objects with masks among ``ann_ids`` (default: all predicted ids).
    Separated subset: from ``separated_ids_path`` when given (Separated COCO list), else
    derived from the GT masks' visible parts.
    """
    data = read_gt_json(gt_json)
    wanted = set(pred) if ann_ids is None else set(ann_ids)
    gt = gt_instances_from_coco(data, source=str(gt_json), ann_ids=wanted)
    if not gt:
        raise ValueError(f"{gt_json}: none of the {len(wanted)} evaluated objects has a GT mask")
    ious = instance_ious({i: pred[i] for i in gt if i in pred}, gt)
    parts = count_parts(gt, min_part_pixels, min_part_fraction)
    separated = load_separated_ids(separated_ids_path) if separated_ids_path else separated_from_parts(parts, gt)
    summary = summarize_miou(ious, gt, separated, category_names_from_coco(data))
    summary["separated_source"] = str(separated_ids_path) if separated_ids_path else "derived_from_gt_masks"
    rows = per_object_table(ious, gt, separated, parts=parts)
    return summary, rows


def pseudo_label_rles(pseudo_json: str | Path) -> tuple[dict[int, dict], dict[int, float]]:
    """``{ann_id: rle}`` and ``{ann_id: score}`` from a pseudo_labels.json."""
    with open(pseudo_json, encoding="utf-8") as fh:
        data = json.load(fh)
    rles = {int(a["id"]): a["segmentation"] for a in data["annotations"]}
    scores = {int(a["id"]): float(a.get("score", float("nan"))) for a in data["annotations"]}
    return rles, scores


def write_report(workdir: str | Path, gt: str | Path | None = None, separated_ids: str | Path | None = None,
                 min_part_pixels: int = 16, min_part_fraction: float = 0.05) -> dict[str, Any]:
    """Evaluate ``WORKDIR/pseudo_labels.json``; write ``WORKDIR/report/`` (summary.json,
    metrics.parquet, report.md). ``gt`` defaults to the run's input annotations."""
    workdir = Path(workdir)
    pseudo = workdir / "pseudo_labels.json"
    if not pseudo.is_file():
        raise FileNotFoundError(f"{pseudo} not found: run `exits run` first")
    if gt is None:
        meta = json.loads((workdir / "run.json").read_text())
        gt = meta["annotations"]
    rles, scores = pseudo_label_rles(pseudo)
    summary, rows = evaluate_masks(rles, gt, separated_ids_path=separated_ids,
                                   min_part_pixels=min_part_pixels, min_part_fraction=min_part_fraction)
    for row in rows:
        row["score"] = scores.get(row["ann_id"], float("nan"))
    out = workdir / "report"
    write_json(out / "summary.json", summary, indent=1)
    with atomic_path(out / "metrics.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    with atomic_open(out / "report.md") as fh:
        fh.write(f"# Pseudo-mask quality: {workdir.name}\n\nGT: `{gt}`\n\n{format_summary_markdown(summary)}\n")
    log.info("report written to %s", out)
    return summary
