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
    """``{ann_id: ObjectGeometry}`` from ``instances.parquet`` (``{}`` when absent).

    With ``ann_ids`` (a gallery's few objects) the table is read one row group at a time and
    only those rows are kept.
    """
    path = RunFolder(workdir).instances
    if not path.is_file():
        return {}
    columns = ["ann_id", "file_name", "extreme_points", "crop_box"]
    if ann_ids is None:
        tables = [pq.read_table(path, columns=columns)]
    else:
        wanted = pa.array(sorted(ann_ids), type=pa.int64())
        pf = pq.ParquetFile(path)
        tables = []
        for i in range(pf.metadata.num_row_groups):
            ids = pf.read_row_group(i, columns=["ann_id"])["ann_id"]
            keep = pc.is_in(ids, value_set=wanted)
            if pc.any(keep).as_py():
                tables.append(pf.read_row_group(i, columns=columns).filter(keep))
    out = {}
    for table in tables:
        for row in table.to_pylist():
            out[int(row["ann_id"])] = ObjectGeometry(
                ann_id=int(row["ann_id"]), file_name=str(row["file_name"]),
                extreme_points=np.asarray(row["extreme_points"], dtype=np.float64).reshape(4, 2),
                crop_box=tuple(int(v) for v in row["crop_box"]))
    return out


def read_points_source(workdir: str | Path) -> dict[int, str]:
    """``{ann_id: points_source}`` from ``instances.parquet`` (``{}`` when absent).

    A dict entry per object: the in-memory report's; the streaming one uses
    :class:`PointsSourceColumn`."""
    path = RunFolder(workdir).instances
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["ann_id", "points_source"])
    return dict(zip(table["ann_id"].to_pylist(), table["points_source"].to_pylist()))


class PointsSourceColumn:
    """``instances.parquet``'s points source by ann id as columns: the ids sorted (int64) and
    a code per id (int32) into the few distinct values, ~12 bytes per object. An id listed
    twice takes its last row (as :func:`read_points_source`'s dict does); no instances table:
    every lookup is null."""

    def __init__(self, workdir: str | Path):
        path = RunFolder(workdir).instances
        self._ids = np.zeros(0, np.int64)
        self._codes = np.zeros(0, np.int32)
        self._values = pa.array([], pa.string())
        if not path.is_file():
            return
        table = pq.read_table(path, columns=["ann_id", "points_source"])
        ids = np.asarray(table["ann_id"].to_numpy(), dtype=np.int64)
        enc = pc.dictionary_encode(table["points_source"].combine_chunks())
        del table
        codes = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int32)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        last = np.ones(ids.size, dtype=bool)
        last[:-1] = ids[1:] != ids[:-1]
        self._ids, self._codes = ids[last], codes[order[last]]
        self._values = enc.dictionary.cast(pa.string())

    def lookup(self, ann_ids: np.ndarray) -> pa.Array:
        """The points source (string, null when unknown) of each of ``ann_ids``."""
        ann_ids = np.asarray(ann_ids, dtype=np.int64)
        if self._ids.size == 0:
            return pa.nulls(ann_ids.size, pa.string())
        j = np.minimum(np.searchsorted(self._ids, ann_ids), self._ids.size - 1)
        codes = np.where(self._ids[j] == ann_ids, self._codes[j], -1)
        return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0, type=pa.int32()),
                                              self._values).cast(pa.string())


def read_retrieval_stats(path: str | Path) -> dict[str, float]:
    """:func:`exits.stages.point_retrieval.retrieval_stats` of ``points.parquet``, read a row
    group at a time as list lengths (the same counts and shares, no Python list per object)."""
    pf = pq.ParquetFile(path)
    n = no_box_bg = invalid = no_retrieval = fg_total = bg_total = 0
    for i in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(i, columns=["pseudo_fg", "pseudo_bg", "seed_bg_extra", "num_seed_bg", "valid"])
        fg = np.asarray(pc.list_value_length(t["pseudo_fg"]).to_numpy(zero_copy_only=False), dtype=np.int64)
        bg = np.asarray(pc.list_value_length(t["pseudo_bg"]).to_numpy(zero_copy_only=False), dtype=np.int64)
        extra = np.asarray(pc.list_value_length(t["seed_bg_extra"]).to_numpy(zero_copy_only=False), dtype=np.int64)
        seed_bg = np.asarray(t["num_seed_bg"].to_numpy(zero_copy_only=False), dtype=np.int64)
        valid = np.asarray(pc.fill_null(t["valid"], False).to_numpy(zero_copy_only=False), dtype=bool)
        n += t.num_rows
        no_box_bg += int(np.count_nonzero(seed_bg - extra == 0))
        invalid += int(np.count_nonzero(~valid))
        no_retrieval += int(np.count_nonzero(fg + bg == 0))
        fg_total += int(fg.sum())
        bg_total += int(bg.sum())
    d = max(1, n)
    return {
        "objects": n,
        "share_no_box_bg_seed": no_box_bg / d,
        "share_invalid": invalid / d,
        "share_no_retrieval": no_retrieval / d,
        "fg_per_object": fg_total / d,
        "bg_per_object": bg_total / d,
    }
