"""Row ranges of the project's Parquet tables (instances, points, shards): written in row
groups of ``ROW_GROUP_ROWS`` rows, so a shard reads only the row groups that hold its rows
and a merge holds about one row group in memory, whatever the dataset's size.

Below both the data layer (``exits.data.instances_table``) and the stages
(``exits.stages.shards``), which use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from exits.io import atomic_path

__all__ = ["ROW_GROUP_ROWS", "read_rows", "write_table_streaming"]

ROW_GROUP_ROWS = 8192


def read_rows(path: str | Path, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that hold them.

    Memory and time are those of the touched row groups (``ROW_GROUP_ROWS`` rows each in the
    files this project writes), independent of the table's length.

    Raises:
        ValueError: the range is not inside the table (names the file).
    """
    pf = pq.ParquetFile(path)
    md = pf.metadata
    if not 0 <= start <= stop <= md.num_rows:
        raise ValueError(f"{path}: rows [{start}, {stop}) are outside its {md.num_rows} rows")
    groups, first, offset = [], None, 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table() if columns is None else pf.schema_arrow.empty_table().select(list(columns))
    table = pf.read_row_groups(groups, columns=list(columns) if columns is not None else None)
    return table.slice(start - first, stop - start)


def write_table_streaming(tables: Iterable[pa.Table], path: str | Path, schema: pa.Schema,
                          row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Write tables one after another into one Parquet file (atomically), in row groups of
    ``row_group_rows``; holds at most about one row group in memory. Returns the row count."""
    rows = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        pending: list[pa.Table] = []
        held = 0
        for t in tables:
            pending.append(t.cast(schema))
            held += t.num_rows
            if held >= row_group_rows:
                batch = pa.concat_tables(pending)
                cut = (held // row_group_rows) * row_group_rows
                writer.write_table(batch.slice(0, cut), row_group_size=row_group_rows)
                pending, held = [batch.slice(cut)], held - cut
            rows += t.num_rows
        if held:
            writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
    return rows
