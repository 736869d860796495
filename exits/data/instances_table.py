"""The instances table: one Parquet row per object (no masks), written atomically.

Later stages read objects from here, not from the json, so a run's object list is fixed
once and shards can be cut from it by row ranges.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits.data.crops import CropWindow, crop_window
from exits.data.records import ObjectRecord, PointDataset
from exits.io import atomic_path
from exits.io.parquet_rows import ROW_GROUP_ROWS, read_rows

# Row-group size of the run's dataset-wide tables (instances.parquet, points.parquet): a shard
# reads only the row groups that hold its rows (a few MB), never the whole table.

SCHEMA = pa.schema(
    [
        ("ann_id", pa.int64()),
        ("image_id", pa.int64()),
        ("category_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bbox", pa.list_(pa.float64(), 4)),
        ("extreme_points", pa.list_(pa.float64(), 8)),
        ("crop_box", pa.list_(pa.int32(), 4)),
        ("split", pa.string()),
        ("points_source", pa.string()),
    ]
)


def build_instances_table(dataset: PointDataset, *, margin: float, min_margin_px: int, crop_size: int) -> pa.Table:
    """One row per object, in the dataset's order, with its crop window."""
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for obj in dataset.objects:
        img = dataset.images[obj.image_id]
        win = crop_window(obj.extreme_points, img.width, img.height, margin=margin,
                          min_margin_px=min_margin_px, size=crop_size)
        cols["ann_id"].append(obj.ann_id)
        cols["image_id"].append(obj.image_id)
        cols["category_id"].append(obj.category_id)
        cols["file_name"].append(img.file_name)
        cols["width"].append(img.width)
        cols["height"].append(img.height)
        cols["bbox"].append(list(obj.bbox))
        cols["extreme_points"].append(obj.extreme_points.reshape(-1).tolist())
        cols["crop_box"].append(win.as_list())
        cols["split"].append(obj.split)
        cols["points_source"].append(obj.points_source)
    return pa.table(cols, schema=SCHEMA)


def write_instances_table(table: pa.Table, path: str | Path) -> Path:
    """Atomically write the table in row groups of ``ROW_GROUP_ROWS`` (see :func:`read_instances_rows`)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    return Path(path)


def read_instances_table(path: str | Path) -> pa.Table:
    """The whole instances table, cast to ``SCHEMA``."""
    return _conform(pq.read_table(path), path)


def read_instances_rows(path: str | Path, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of the instances table (a shard), reading only the row groups
    that hold them: memory and time independent of the table's length."""
    return _conform(read_rows(path, start, stop), path)


def read_image_rows(path: str | Path, image_ids: Sequence[int], columns: Sequence[str]) -> tuple[np.ndarray, pa.Table]:
    """Every row of the instances table whose ``image_id`` is in ``image_ids``: their row
    indices (ascending) and ``columns`` of those rows (same order), cast to ``SCHEMA``.

    For a shard that needs the other objects of its images wherever they are in the table.
    Row groups whose ``image_id`` statistics hold none of the ids are skipped unread (a table
    ordered by image: the groups around the shard); of the others only the ``image_id``
    column is read, and ``columns`` only of the groups with a match. Never the whole table
    (``ROW_GROUP_ROWS`` rows per group)."""
    ids = np.unique(np.asarray(list(image_ids), dtype=np.int64))
    pf = pq.ParquetFile(path)
    md = pf.metadata
    names = pf.schema_arrow.names
    if "image_id" not in names or any(c not in names for c in columns):
        raise ValueError(f"{path}: instances table lacks image_id or one of {list(columns)}")
    col = names.index("image_id")
    rows, parts, offset = [], [], 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        stats = md.row_group(g).column(col).statistics
        skip = len(ids) == 0
        if not skip and stats is not None and stats.has_min_max:
            lo, hi = np.searchsorted(ids, int(stats.min), "left"), np.searchsorted(ids, int(stats.max), "right")
            skip = lo == hi
        if not skip:
            group_ids = pf.read_row_group(g, columns=["image_id"]).column(0).to_numpy()
            hit = np.flatnonzero(np.isin(group_ids, ids))
            if len(hit):
                rows.append(hit + offset)
                parts.append(pf.read_row_group(g, columns=list(columns)).take(pa.array(hit)))
        offset += n
    schema = pa.schema([SCHEMA.field(c) for c in columns])
    if not parts:
        return np.zeros(0, np.int64), schema.empty_table()
    return np.concatenate(rows).astype(np.int64), pa.concat_tables(parts).select(list(columns)).cast(schema)


def _conform(table: pa.Table, path: str | Path) -> pa.Table:
    if not table.schema.equals(SCHEMA):
        # Cast (not reject) so tables written by older versions with compatible types still load.
        missing = set(SCHEMA.names) - set(table.schema.names)
        if missing:
            raise ValueError(f"{path}: instances table lacks columns {sorted(missing)}")
        table = table.select(SCHEMA.names).cast(SCHEMA)
    return table


def table_objects(table: pa.Table) -> list[ObjectRecord]:
    """Rows back to ``ObjectRecord``s (training side: points and boxes only)."""
    d = table.to_pydict()
    return [
        ObjectRecord(
            ann_id=d["ann_id"][i], image_id=d["image_id"][i], category_id=d["category_id"][i],
            extreme_points=np.asarray(d["extreme_points"][i], dtype=np.float64).reshape(4, 2),
            bbox=tuple(d["bbox"][i]), points_source=d["points_source"][i], split=d["split"][i],
        )
        for i in range(table.num_rows)
    ]


def table_windows(table: pa.Table, crop_size: int) -> list[CropWindow]:
    return [CropWindow(*map(int, box), size=crop_size) for box in table.column("crop_box").to_pylist()]
