"""The finished ``report/metrics.parquet`` read back: the summary's columns, rows by id.

The table is written by the streamed report pass (:mod:`exits.report.streaming`, columns
:data:`exits.report.metrics.METRICS_SCHEMA`, sorted by ann id); the summary, calibration,
figures and gallery read it through these, without a Python object per row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def read_metrics_columns(path: Path) -> pa.Table:
    """The columns of metrics.parquet the summary, calibration, figures and gallery choice
    read (ids, category id, area, crowd, separated, IoU, score; points source
    dictionary-encoded): ~50 bytes per object, no Python object per row."""
    return pq.read_table(path, columns=["ann_id", "category_id", "area", "iscrowd", "separated", "iou", "score",
                                        "points_source"], read_dictionary=["points_source"])


def metrics_rows(path: Path, ann_ids: list[int]) -> list[dict[str, Any]]:
    """The metrics rows (dicts) of ``ann_ids``, in that order, reading a row group at a time."""
    if not ann_ids:
        return []
    wanted = pa.array(sorted(set(ann_ids)), pa.int64())
    pf = pq.ParquetFile(path)
    by_id: dict[int, dict[str, Any]] = {}
    for i in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(i)
        keep = pc.is_in(t["ann_id"], value_set=wanted)
        if pc.any(keep).as_py():
            for r in t.filter(keep).to_pylist():
                by_id[r["ann_id"]] = r
    return [by_id[i] for i in ann_ids]
