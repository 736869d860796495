"""What the report reads of a run's instances table: object geometry and points source.

Where the files are (and which GT json / image folder a run used) is
:class:`exits.run_folder.RunFolder`'s business.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exits.run_folder import RunFolder

@dataclass(frozen=True)
class ObjectGeometry:
    """Where an object is in its image: file, extreme points (4, 2) [x, y] (top, left,
    bottom, right) and the crop window [x0, y0, width, height] stage 1 used."""

    ann_id: int
    file_name: str
    extreme_points: np.ndarray
    crop_box: tuple[int, int, int, int]


def read_object_geometry(workdir: str | Path, ann_ids: set[int] | None = None) -> dict[int, ObjectGeometry]:
    """``{ann_id: ObjectGeometry}`` from ``instances.parquet`` (``{}`` when absent)."""
    path = RunFolder(workdir).instances
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
    path = RunFolder(workdir).instances
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["ann_id", "points_source"])
    return dict(zip(table["ann_id"].to_pylist(), table["points_source"].to_pylist()))
