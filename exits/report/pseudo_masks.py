"""The run's pseudo masks by ann id, read from a Parquet table a row group at a time.

:class:`PseudoMasks` answers which objects have a pseudo mask and reads the canonical RLEs
and scores of given objects, holding only the sorted ids and their rows (16 bytes per
object) plus :data:`PSEUDO_CACHE_GROUPS` decoded row groups. :func:`pseudo_masks_of_run`
picks the table the in-memory report would read: ``pseudo_labels.parquet``, or a
``pseudo_labels.json`` newer than it streamed into a temporary Parquet table. Used by the
streamed report pass (:mod:`exits.report.streaming`) and the gallery.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits.eval.rle import Rle, to_rle
from exits.io.json_stream import iter_top_level, open_json_text
from exits.run_folder import RunFolder

# Rows per row group of a pseudo table streamed from a json.
TABLE_ROW_GROUP_ROWS = 1 << 16
# Pseudo-label row groups kept decoded (the GT json usually follows the pseudo table's order,
# so consecutive batches read the same one or two).
PSEUDO_CACHE_GROUPS = 2


class PseudoMasks:
    """The run's pseudo masks by ann id, from a pseudo-label Parquet table (columns ann_id,
    height, width, rle_counts, score), read a row group at a time.

    Holds the ids sorted (int64) and their rows (int64): 16 bytes per object. An id listed
    twice is its last row, as the ``{ann_id: rle}`` dict of the in-memory report.
    ``round_scores``: scores as the json holds them (5 decimals; the Parquet file has the
    unrounded float32), else as stored.
    """

    def __init__(self, path: Path, *, round_scores: bool):
        self.path = Path(path)
        self.round_scores = round_scores
        self._pf = pq.ParquetFile(self.path)
        md = self._pf.metadata
        self._group_start = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        ids = np.concatenate([np.asarray(self._pf.read_row_group(i, columns=["ann_id"])["ann_id"].to_numpy(), np.int64)
                              for i in range(md.num_row_groups)] or [np.zeros(0, np.int64)])
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        last = np.ones(ids.size, dtype=bool)
        last[:-1] = ids[1:] != ids[:-1]
        self.ids, self._rows = ids[last], order[last]
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray]] = OrderedDict()

    @property
    def count(self) -> int:
        """Distinct pseudo-labelled objects."""
        return int(self.ids.size)

    def has(self, ann_id: int) -> bool:
        j = int(np.searchsorted(self.ids, ann_id))
        return j < self.ids.size and int(self.ids[j]) == ann_id

    def rows_of(self, ann_ids: np.ndarray) -> np.ndarray:
        """Row of each id in the table (-1: no pseudo mask)."""
        ann_ids = np.asarray(ann_ids, dtype=np.int64)
        if self.ids.size == 0:
            return np.full(ann_ids.size, -1, np.int64)
        j = np.minimum(np.searchsorted(self.ids, ann_ids), self.ids.size - 1)
        return np.where(self.ids[j] == ann_ids, self._rows[j], -1)

    def _group(self, g: int) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray]:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        t = self._pf.read_row_group(g, columns=["height", "width", "rle_counts", "score"])
        entry = (np.asarray(t["height"].to_numpy(zero_copy_only=False), np.int64),
                 np.asarray(t["width"].to_numpy(zero_copy_only=False), np.int64),
                 t["rle_counts"].combine_chunks(),
                 np.asarray(t["score"].to_numpy(zero_copy_only=False), np.float64))
        self._cache[g] = entry
        while len(self._cache) > PSEUDO_CACHE_GROUPS:
            self._cache.popitem(last=False)
        return entry

    def read(self, rows: np.ndarray) -> tuple[list[Rle], np.ndarray]:
        """Canonical RLEs and scores of ``rows`` (each >= 0), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        rles: list[Rle | None] = [None] * rows.size
        scores = np.empty(rows.size, np.float64)
        groups = np.searchsorted(self._group_start, rows, side="right") - 1
        for g in np.unique(groups).tolist():
            at = np.flatnonzero(groups == g)
            height, width, counts, score = self._group(g)
            local = rows[at] - self._group_start[g]
            texts = counts.take(pa.array(local)).to_pylist()
            for k, i, text in zip(at.tolist(), local.tolist(), texts):
                rles[k] = to_rle({"size": [int(height[i]), int(width[i])], "counts": text})
            scores[at] = score[local]
        if self.round_scores:  # the json's value: round(score, 5), NaN when not finite
            scores = np.array([round(v, 5) if np.isfinite(v) else float("nan") for v in scores.tolist()], np.float64)
        return rles, scores  # type: ignore[return-value]

    def rles_of(self, ann_ids: list[int]) -> dict[int, Rle]:
        """``{ann_id: RLE}`` of the given objects that have a pseudo mask."""
        rows = self.rows_of(np.asarray(ann_ids, dtype=np.int64))
        found = rows >= 0
        rles, _ = self.read(rows[found])
        return {int(a): r for a, r in zip(np.asarray(ann_ids)[found].tolist(), rles)}


def _pseudo_table_from_json(pseudo_json: Path, dest: Path) -> None:
    """A pseudo_labels.json streamed into a Parquet table of ann_id, height, width,
    rle_counts, score (the json's values: ``int(id)``, the segmentation in canonical form,
    the score as written, NaN when absent)."""
    schema = pa.schema([("ann_id", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
                        ("rle_counts", pa.large_string()), ("score", pa.float64())])
    cols: dict[str, list] = {n: [] for n in schema.names}

    def flush(writer: pq.ParquetWriter) -> None:
        writer.write_table(pa.table(cols, schema=schema), row_group_size=TABLE_ROW_GROUP_ROWS)
        for v in cols.values():
            v.clear()

    with open_json_text(pseudo_json) as fh, pq.ParquetWriter(dest, schema) as writer:
        for key, value in iter_top_level(fh, stream="annotations", source=str(pseudo_json)):
            if key != "annotations":
                continue
            for a in value:
                rle = to_rle(dict(a["segmentation"]))
                cols["ann_id"].append(int(a["id"]))
                cols["height"].append(int(rle["size"][0]))
                cols["width"].append(int(rle["size"][1]))
                cols["rle_counts"].append(rle["counts"].decode("ascii"))
                cols["score"].append(float(a["score"]) if a.get("score") is not None else float("nan"))
                if len(cols["ann_id"]) >= TABLE_ROW_GROUP_ROWS:
                    flush(writer)
        flush(writer)


def pseudo_masks_of_run(pseudo_json: Path, scratch: Path) -> PseudoMasks:
    """The pseudo masks the in-memory report would read (:func:`exits.report.evaluation.pseudo_label_rles`):
    ``pseudo_labels.parquet`` when it is at least as new as the json, else the json
    (streamed into ``scratch``, a Parquet file the caller removes)."""
    pseudo_json = Path(pseudo_json)
    run = RunFolder(pseudo_json.parent)
    pq_path = run.pseudo_parquet
    if (pseudo_json.name == run.pseudo_json.name and pq_path.is_file()
            and pq_path.stat().st_mtime_ns >= pseudo_json.stat().st_mtime_ns):
        return PseudoMasks(pq_path, round_scores=True)
    _pseudo_table_from_json(pseudo_json, scratch)
    return PseudoMasks(scratch, round_scores=False)
