"""The report's per-object pass, streamed: GT json -> IoU, parts, separated -> metrics.parquet.

Memory stays flat in the number of objects apart from a few numpy columns (~40 bytes per
object during the pass: the pseudo masks' sorted ids and rows, the instances' points source,
the ids seen; ~50 more per object when the table is read back for the summary), at COCO /
LVIS size as on the demo:

- the GT json is streamed (:class:`exits.eval.GtJsonStream`, one annotation at a time);
- the pseudo masks are read from ``pseudo_labels.parquet`` a row group at a time, only the
  rows a batch of GT objects needs (:class:`exits.report.pseudo_masks.PseudoMasks`; a
  pseudo_labels.json newer than the Parquet file is first streamed into a temporary one);
- objects are scored in batches of :data:`BATCH_OBJECTS` and each batch goes to a Parquet
  writer at once; the finished table is ``report/metrics.parquet`` (sorted by ann id, as the
  in-memory report writes it: when the GT json lists its objects in another order, the
  batches are re-sorted from the temporary file; :mod:`exits.report.metrics_parquet` reads
  it back);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exits.eval import GtJsonStream, load_separated_ids
from exits.eval.ground_truth import GtFormatError, GtInstance, annotation_id, duplicate_id_error, gt_instance
from exits.eval.mask_iou import pair_ious
from exits.eval.miou import MEDIUM_MAX_AREA, SIZE_BUCKETS, SMALL_MAX_AREA
from exits.eval.rle import Rle
from exits.eval.separated import count_parts_rle
from exits.report.evaluation import DERIVED_FROM_GT
from exits.report.metrics import METRICS_SCHEMA
from exits.report.metrics_parquet import metrics_rows, read_metrics_columns
from exits.report.pseudo_masks import PSEUDO_CACHE_GROUPS, PseudoMasks, pseudo_masks_of_run
from exits.report.run_files import PointsSourceColumn

log = logging.getLogger(__name__)

# GT objects scored per batch: one batch's GT RLEs and pseudo RLEs are what memory holds.
BATCH_OBJECTS = 4096
# Rows per row group of metrics.parquet.
ROW_GROUP_ROWS = 1 << 16
# objects between two progress lines in the log
LOG_EVERY = 100_000

# metrics.parquet columns the pass writes; category and size are added when it is finished
_PASS_SCHEMA = pa.schema([f for f in METRICS_SCHEMA if f.name not in ("category", "size")])


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


__all__ = ["BATCH_OBJECTS", "DERIVED_FROM_GT", "GtFormatError", "PSEUDO_CACHE_GROUPS", "PseudoMasks",
           "StreamedEvaluation", "evaluate_streaming", "metrics_rows", "pseudo_masks_of_run", "read_metrics_columns"]
