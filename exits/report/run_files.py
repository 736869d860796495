"""Where a run's report inputs are: run.json, pseudo_labels.json, instances.parquet, images.

Stage 1 leaves ``run.json`` ({"images": dir, "annotations": json, "gt": json or null}) in
the run folder; the report reads it to find the image folder and, when no ``--gt`` is
given, the GT json (``gt`` when the run had one, else the input annotations).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPORT_DIR = "report"


@dataclass(frozen=True)
class ObjectGeometry:
    """Where an object is in its image: file, extreme points (4, 2) [x, y] (top, left,
    bottom, right) and the crop window [x0, y0, width, height] stage 1 used."""

    ann_id: int
    file_name: str
    extreme_points: np.ndarray
    crop_box: tuple[int, int, int, int]


def read_run_meta(workdir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder, ``{}`` when absent."""
    path = Path(workdir) / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def resolve_gt_path(workdir: str | Path, gt: str | Path | None) -> Path:
    """The GT json to evaluate against: ``gt`` if given, else the run's ``gt``, else its
    input annotations (which carry masks for the demo and COCO-style data).

    Raises:
        FileNotFoundError: no ``gt`` given and ``run.json`` names none.
    """
    if gt is not None:
        return Path(gt)
    meta = read_run_meta(workdir)
    named = meta.get("gt") or meta.get("annotations")
    if not named:
        raise FileNotFoundError(f"{Path(workdir) / 'run.json'} names no GT json: pass --gt FILE")
    return Path(named)


def images_dir(workdir: str | Path) -> Path | None:
    """The run's image folder from ``run.json`` (``None`` when unknown)."""
    named = read_run_meta(workdir).get("images")
    return Path(named) if named else None


def read_object_geometry(workdir: str | Path, ann_ids: set[int] | None = None) -> dict[int, ObjectGeometry]:
    """``{ann_id: ObjectGeometry}`` from ``instances.parquet`` (``{}`` when absent)."""
    path = Path(workdir) / "instances.parquet"
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["ann_id", "file_name", "extreme_points", "crop_box"])
    if ann_ids is not None:
        table = table.filter(pc.is_in(table["ann_id"], value_set=pa.array(sorted(ann_ids), type=pa.int64())))
    out = {}
    for row in table.to_pylist():
        out[int(row["ann_id"])] = ObjectGeometry(
            ann_id=int(row["ann_id"]), file_name=str(row["file_name"]),
            extreme_points=np.asarray(row["extreme_points"], dtype=np.float64).reshape(4, 2),
            crop_box=tuple(int(v) for v in row["crop_box"]))
    return out


def read_points_source(workdir: str | Path) -> dict[int, str]:
    """``{ann_id: points_source}`` from ``instances.parquet`` (``{}`` when absent)."""
    path = Path(workdir) / "instances.parquet"
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["ann_id", "points_source"])
    return dict(zip(table["ann_id"].to_pylist(), table["points_source"].to_pylist()))
