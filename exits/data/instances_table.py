"""The instances table: one Parquet row per object (no masks), written atomically.

Later stages read objects from here, not from the json, so a run's object list is fixed
once and shards can be cut from it by row ranges.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits.data.crops import CropWindow, crop_window
from exits.data.records import ObjectRecord, PointDataset
from exits.io import atomic_path
from exits.parquet_rows import ROW_GROUP_ROWS, read_rows

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
