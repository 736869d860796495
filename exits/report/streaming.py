"""The report's per-object pass, streamed: GT json -> IoU, parts, separated -> metrics.parquet.

Memory stays flat in the number of objects apart from a few numpy columns (~40 bytes per
object during the pass: the pseudo masks' sorted ids and rows, the instances' points source,
the ids seen; ~50 more per object when the table is read back for the summary), at COCO /
LVIS size as on the demo:

- the GT json is streamed (:class:`exits.eval.GtJsonStream`, one annotation at a time);
- the pseudo masks are read from ``pseudo_labels.parquet`` a row group at a time, only the
  rows a batch of GT objects needs (:class:`PseudoMasks`; a pseudo_labels.json newer than
  the Parquet file is first streamed into a temporary one);
- objects are scored in batches of :data:`BATCH_OBJECTS` and each batch goes to a Parquet
  writer at once; the finished table is ``report/metrics.parquet`` (sorted by ann id, as the
  in-memory report writes it: when the GT json lists its objects in another order, the
  batches are re-sorted from the temporary file);
- the gallery's GT masks are the only masks kept: the ``n_worst`` lowest-IoU objects seen so
  far (a bounded heap).

The numbers are those of :func:`exits.report.evaluation.evaluate_predictions` (the
in-memory evaluation, kept as the reference): the same IoU, parts and separated rule per
object, the same summary from the table's columns (tests/test_report_streaming.py).
"""
from __future__ import annotations

import heapq
import logging
import os
import tempfile
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exits.eval import GtJsonStream, load_separated_ids
from exits.eval.ground_truth import GtFormatError, GtInstance, annotation_id, duplicate_id_error, gt_instance
from exits.eval.mask_iou import pair_ious
from exits.eval.miou import MEDIUM_MAX_AREA, SIZE_BUCKETS, SMALL_MAX_AREA
from exits.eval.rle import Rle, to_rle
from exits.eval.separated import count_parts_rle
from exits.io.json_stream import iter_top_level, open_json_text
from exits.report.evaluation import DERIVED_FROM_GT
from exits.report.metrics import METRICS_SCHEMA
from exits.report.run_files import PointsSourceColumn
from exits.run_folder import RunFolder

log = logging.getLogger(__name__)

# GT objects scored per batch: one batch's GT RLEs and pseudo RLEs are what memory holds.
BATCH_OBJECTS = 4096
# Rows per row group of metrics.parquet (and of a temporary pseudo table).
ROW_GROUP_ROWS = 1 << 16
# Pseudo-label row groups kept decoded (the GT json usually follows the pseudo table's order,
# so consecutive batches read the same one or two).
PSEUDO_CACHE_GROUPS = 2
# objects between two progress lines in the log
LOG_EVERY = 100_000

# metrics.parquet columns the pass writes; category and size are added when it is finished
_PASS_SCHEMA = pa.schema([f for f in METRICS_SCHEMA if f.name not in ("category", "size")])


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
        writer.write_table(pa.table(cols, schema=schema), row_group_size=ROW_GROUP_ROWS)
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
                if len(cols["ann_id"]) >= ROW_GROUP_ROWS:
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


@dataclass
class StreamedEvaluation:
    """What the report needs besides metrics.parquet: how many objects had pseudo masks, the
    category names, where the separated subset came from, and the GT masks of the
    ``n_worst`` lowest-IoU non-crowd objects (``{ann_id: RLE}``)."""

    n_predicted: int
    category_names: dict[int, str]
    separated_source: str
    separated_rule: dict[str, Any] | None
    worst_gt: dict[int, Rle] = field(default_factory=dict)


class _WorstHeap:
    """The ``n`` non-crowd objects with the lowest (IoU, ann id) seen so far, with their GT masks."""

    def __init__(self, n: int):
        self.n = max(int(n), 0)
        self._heap: list[tuple[float, int, int, Rle]] = []  # (-iou, -ann_id, seq, rle): the top is evicted first
        self._seq = 0

    def offer(self, iou: float, ann_id: int, rle: Rle) -> None:
        if self.n == 0:
            return
        item = (-iou, -ann_id, self._seq, rle)
        self._seq += 1
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, item)
        elif (iou, ann_id) < (-self._heap[0][0], -self._heap[0][1]):
            heapq.heapreplace(self._heap, item)

    def rles(self) -> dict[int, Rle]:
        return {-item[1]: item[3] for item in self._heap}


class _Occurrences:
    """Every GT annotation with a pseudo mask, in file order: its id and whether it has a GT
    mask (9 bytes each), for the repeated-id check and the sort of the finished table."""

    def __init__(self) -> None:
        self._ids = array("q")
        self._masked = bytearray()

    def add(self, ann_id: int, masked: bool) -> None:
        self._ids.append(ann_id)
        self._masked.append(masked)

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        return np.frombuffer(self._ids, np.int64).copy(), np.frombuffer(bytes(self._masked), np.uint8).astype(bool)


def _batches(stream: GtJsonStream, pseudo: PseudoMasks, seen: _Occurrences) -> Iterator[list[GtInstance]]:
    """The GT objects with a pseudo mask and a GT mask, in file order, in lists of BATCH_OBJECTS."""
    batch: list[GtInstance] = []
    source = stream.source
    for ann in stream.annotations():
        ann_id = annotation_id(ann, source)
        if not pseudo.has(ann_id):
            continue
        inst = gt_instance(ann, ann_id, stream.sizes or {}, source)
        seen.add(ann_id, inst is not None)
        if inst is None:
            continue
        batch.append(inst)
        if len(batch) >= BATCH_OBJECTS:
            yield batch
            batch = []
    if batch:
        yield batch


def _score_batch(batch: list[GtInstance], pseudo: PseudoMasks, points_source: PointsSourceColumn,
                 separated_ids: np.ndarray | None, min_part_pixels: int, min_part_fraction: float) -> pa.Table:
    ids = np.fromiter((g.ann_id for g in batch), np.int64, len(batch))
    pred, score = pseudo.read(pseudo.rows_of(ids))
    for p, g in zip(pred, batch):
        if list(p["size"]) != list(g.rle["size"]):
            raise ValueError(f"annotation {g.ann_id}: predicted mask size {list(p['size'])} differs from GT size "
                             f"{list(g.rle['size'])}")
    iou = np.asarray(pair_ious(pred, [g.rle for g in batch]), np.float64)
    parts = np.fromiter((count_parts_rle(g.rle, min_part_pixels, min_part_fraction) for g in batch), np.int32, len(batch))
    iscrowd = np.fromiter((g.iscrowd for g in batch), bool, len(batch))
    separated = np.isin(ids, separated_ids) if separated_ids is not None else (parts >= 2) & ~iscrowd
    return pa.table({
        "ann_id": ids,
        "image_id": np.fromiter((g.image_id for g in batch), np.int64, len(batch)),
        "category_id": np.fromiter((g.category_id for g in batch), np.int64, len(batch)),
        "area": np.fromiter((g.area for g in batch), np.float64, len(batch)),
        "iscrowd": iscrowd,
        "parts": parts,
        "separated": separated,
        "iou": iou,
        "score": score,
        "points_source": points_source.lookup(ids),
    }, schema=_PASS_SCHEMA)


def _with_names(t: pa.Table, names: dict[int, str]) -> pa.Table:
    """A pass table with ``category`` (the name, else the id as text) and ``size`` (the COCO
    bucket of the area) added, in METRICS_SCHEMA's column order."""
    cat = np.asarray(t["category_id"].to_numpy(), np.int64)
    uniq, inverse = np.unique(cat, return_inverse=True)
    category = pa.array([str(names.get(c, c)) for c in uniq.tolist()], pa.string()).take(pa.array(inverse.reshape(-1)))
    area = np.asarray(t["area"].to_numpy(), np.float64)
    bucket = np.where(area < SMALL_MAX_AREA, 0, np.where(area < MEDIUM_MAX_AREA, 1, 2))
    size = pa.array(list(SIZE_BUCKETS), pa.string()).take(pa.array(bucket))
    cols = {name: (category if name == "category" else size if name == "size" else t[name])
            for name in METRICS_SCHEMA.names}
    return pa.table(cols, schema=METRICS_SCHEMA)


def _check_unique(ids: np.ndarray, masked: np.ndarray, source: str) -> np.ndarray | None:
    """The order sorting the masked occurrences' ids (None when already increasing).

    A repeated id raises what the in-memory reader raises: there, an occurrence whose id an
    earlier occurrence *with a GT mask* already took is an error (the first such in file
    order); a repeat after occurrences without a mask is not.
    """
    if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        order = np.argsort(ids, kind="stable")  # by id, file order inside
        sid, smask = ids[order], masked[order]
        group_start = np.ones(sid.size, dtype=bool)
        group_start[1:] = sid[1:] != sid[:-1]
        # masked occurrences before each one in its group: cumulative count minus the group's offset
        cum = np.cumsum(smask) - smask
        before = cum - np.maximum.accumulate(np.where(group_start, cum, 0))
        bad = np.flatnonzero(before > 0)
        if bad.size:
            first = int(order[bad].min())
            raise duplicate_id_error(source, int(ids[first]))
    kept = ids[masked]
    if kept.size < 2 or bool(np.all(kept[1:] > kept[:-1])):
        return None
    return np.argsort(kept, kind="stable")


def evaluate_streaming(pseudo: PseudoMasks, gt_json: str | Path, metrics_path: Path, *,
                       workdir: str | Path, separated_ids_path: str | Path | None = None,
                       min_part_pixels: int = 16, min_part_fraction: float = 0.05,
                       n_worst: int = 12) -> StreamedEvaluation:
    """Score every pseudo mask that has a GT mask in ``gt_json`` and write the per-object
    table (``METRICS_SCHEMA``, sorted by ann id) to ``metrics_path``.

    The objects, values and errors are :func:`exits.report.evaluation.evaluate_predictions`':
    GT objects with a mask among the pseudo-labelled ids; separated = the ids of
    ``separated_ids_path`` when given, else >= 2 parts by the thresholds (crowd never).

    Raises:
        ValueError: none of the pseudo-labelled objects has a GT mask; a pseudo mask whose
            size differs from its GT mask.
        GtFormatError: the GT json is unreadable or malformed (a repeated id among the
            evaluated objects included).
    """
    gt_json = Path(gt_json)
    stream = GtJsonStream(gt_json)
    if separated_ids_path:
        sep_ids = np.asarray(sorted(load_separated_ids(separated_ids_path)), np.int64)
        source, rule = str(separated_ids_path), None
    else:
        sep_ids = None
        source = DERIVED_FROM_GT
        rule = {"min_parts": 2, "min_part_pixels": int(min_part_pixels), "min_part_fraction": float(min_part_fraction),
                "connectivity": 8}
    points_source = PointsSourceColumn(workdir)
    worst = _WorstHeap(n_worst)
    seen = _Occurrences()
    metrics_path = Path(metrics_path)
    fd, tmp_name = tempfile.mkstemp(prefix=".metrics-pass.", suffix=".parquet.tmp", dir=metrics_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with pq.ParquetWriter(tmp, _PASS_SCHEMA) as writer:
            n_scored, next_log = 0, LOG_EVERY
            for batch in _batches(stream, pseudo, seen):
                t = _score_batch(batch, pseudo, points_source, sep_ids, min_part_pixels, min_part_fraction)
                writer.write_table(t, row_group_size=ROW_GROUP_ROWS)
                n_scored += t.num_rows
                if n_scored >= next_log:
                    log.info("report: %d of %d pseudo masks scored against %s", n_scored, pseudo.count, gt_json)
                    next_log += LOG_EVERY
                iou = t["iou"].to_numpy()
                for k, g in enumerate(batch):
                    if not g.iscrowd:
                        worst.offer(float(iou[k]), g.ann_id, g.rle)
        del points_source
        ids, masked = seen.columns()
        del seen
        order = _check_unique(ids, masked, stream.source)
        if not masked.any():
            raise ValueError(f"{gt_json}: none of the {pseudo.count} evaluated objects has a GT mask")
        del ids, masked
        names = stream.category_names
        with pq.ParquetWriter(metrics_path, METRICS_SCHEMA) as out:
            if order is None:  # the json listed its objects by id: row groups in, row groups out
                pf = pq.ParquetFile(tmp)
                for i in range(pf.metadata.num_row_groups):
                    out.write_table(_with_names(pf.read_row_group(i), names), row_group_size=ROW_GROUP_ROWS)
            else:
                full = pq.read_table(tmp, read_dictionary=["points_source"])
                for start in range(0, order.size, ROW_GROUP_ROWS):
                    part = full.take(pa.array(order[start:start + ROW_GROUP_ROWS]))
                    part = part.set_column(part.schema.get_field_index("points_source"), "points_source",
                                           part["points_source"].cast(pa.string()))
                    out.write_table(_with_names(part, names), row_group_size=ROW_GROUP_ROWS)
                del full
    finally:
        tmp.unlink(missing_ok=True)
    return StreamedEvaluation(n_predicted=pseudo.count, category_names=names, separated_source=source,
                              separated_rule=rule, worst_gt=worst.rles())


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


__all__ = ["BATCH_OBJECTS", "DERIVED_FROM_GT", "GtFormatError", "PseudoMasks", "StreamedEvaluation",
           "evaluate_streaming", "metrics_rows", "pseudo_masks_of_run", "read_metrics_columns"]
