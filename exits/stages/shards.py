"""Shards of a per-object stage: row ranges of ``instances.parquet``, one Parquet file each.

Point retrieval (1b) and pseudo-label generation (1d) treat objects independently, so a
dataset-wide run cuts the instances table into contiguous row ranges ("shards"), computes
each into ``WORKDIR/shards/{stage}-{index:05d}.parquet`` (written atomically) and merges the
files in index order. Rows of a shard are the instances-table rows ``[start, stop)`` in
order, so the merged table has the table's row order whatever the shard size.

Each shard file may carry the key it was computed under (a string in the Parquet schema
metadata, e.g. the Prefect cache key of the task that wrote it): a re-run reuses an existing
shard file only when its key equals the key the shard would be computed under now, so a
file left by a run with other inputs or settings is never taken for a current one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from exits.io import atomic_path
from exits.io.parquet_rows import ROW_GROUP_ROWS, read_rows, write_table_streaming
from exits.run_folder import SHARDS_DIR as SHARD_DIR
from exits.run_folder import RunFolder

KEY_METADATA = b"exits_shard_key"

__all__ = ["SHARD_DIR", "ROW_GROUP_ROWS", "shard_ranges", "shard_path", "write_shard", "shard_key", "read_shards",
           "read_rows", "write_table_streaming"]


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(0, s), (s, 2s), ..., (k s, num_rows)]``: contiguous row ranges of at most ``shard_size`` rows."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def shard_path(workdir: str | Path, stage: str, index: int) -> Path:
    """``WORKDIR/shards/{stage}-{index:05d}.parquet``."""
    return RunFolder(workdir).shard(stage, index)


def write_shard(table: pa.Table, path: str | Path, key: str | None = None) -> Path:
    """Atomically write one shard's rows, with ``key`` in the schema metadata when given."""
    if key is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), KEY_METADATA: key.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def shard_key(path: str | Path) -> str | None:
    """The key a shard file was written under; None when the file is missing, unreadable or has none."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(KEY_METADATA)
    return value.decode() if value is not None else None


def read_shards(paths: Sequence[str | Path], schema: pa.Schema, optional: Sequence[str] = ()) -> pa.Table:
    """Shard files concatenated in the given order, cast to ``schema`` (keys dropped).

    ``optional``: columns of ``schema`` a shard may lack (written by an older version); they
    are read as nulls.

    Raises:
        FileNotFoundError: a shard file is missing (its stage did not finish).
        ValueError: a shard lacks a required column (names the file).
    """
    tables = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"shard {p} is missing: run its stage first")
        t = pq.read_table(p)
        for name in schema.names:
            if name not in t.column_names:
                if name not in optional:
                    raise ValueError(f"shard {p} lacks column {name!r}")
                t = t.append_column(name, pa.nulls(t.num_rows, schema.field(name).type))
        tables.append(t.replace_schema_metadata(None).select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


class ShardTables:
    """Shard files as a re-iterable sequence of tables: each pass reads them again, one at a
    time (:func:`iter_shards`), so a consumer that needs two passes never holds them all."""

    def __init__(self, paths: Sequence[str | Path], schema: pa.Schema, optional: Sequence[str] = ()):
        self.paths, self.schema, self.optional = list(paths), schema, tuple(optional)

    def __iter__(self) -> Iterator[pa.Table]:
        return iter_shards(self.paths, self.schema, self.optional)

    def __len__(self) -> int:
        return len(self.paths)


def iter_shards(paths: Sequence[str | Path], schema: pa.Schema, optional: Sequence[str] = ()) -> Iterator[pa.Table]:
    """:func:`read_shards`, one shard at a time."""
    for p in paths:
        yield read_shards([p], schema, optional)
