"""The run's ``pseudo_labels.json`` / ``.parquet``, written from pseudo-label tables (stage 1d's merge).

The input json is streamed (one top-level key, one annotation at a time:
:mod:`exits.io.json_stream`) and the pseudo-label tables are read one at a time (one per shard),
so at COCO / LVIS size memory holds a few numpy columns and the RLE strings of the run,
never the whole json, a Python object per annotation or a second copy of the table:

    per object ~ 8 B id + 8 B row + 4 x 4-8 B numeric columns + the RLE string's bytes

The json's bytes are those of ``json.dump`` of the merged dict
(:func:`merge_pseudo_labels_in_memory`, the reference, tested equal byte for byte).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exits.data.ids import as_int_id
from exits.eval.separated import count_parts_rle
from exits.io import atomic_open, atomic_path
from exits.io.json_stream import iter_top_level, open_json_text
from exits.run_folder import RunFolder

log = logging.getLogger(__name__)

__all__ = ["PSEUDO_INFO", "CATEGORIES_METADATA", "MergeColumns", "write_pseudo_label_files",
           "merge_pseudo_labels_in_memory"]

PSEUDO_INFO = "EXITS pseudo masks (segmentation replaced; score = mask confidence)"
# Key of pseudo_labels.parquet's schema metadata: the input json's {category id: name}, so the
# spot-fix catalog and the report never have to parse the json for them.
CATEGORIES_METADATA = b"exits_categories"
# Rows per row group of pseudo_labels.parquet: shards are small (256 rows), readers (catalog,
# report) scan columns, so shard-sized row groups would only add footer size and seeks.
ROW_GROUP_ROWS = 1 << 16


class MergeColumns:
    """The per-object columns the json needs, gathered from pseudo-label tables read one at a
    time: numpy arrays + one arrow string array of RLE counts (no Python object per row).

    ``row(ann_id)``: the row of that object over all tables (the last one if an id repeats,
    like a dict built in row order), None when it has no pseudo mask.
    """

    def __init__(self, tables: Iterable[pa.Table]):
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ann_id", "height", "width", "area", "score", "num_parts")}
        counts: list[pa.Array] = []
        self.has_parts = True
        for t in tables:
            for k in ("ann_id", "height", "width", "area", "score"):
                cols[k].append(t.column(k).to_numpy())
            if "num_parts" in t.column_names:
                cols["num_parts"].append(pc.fill_null(t.column("num_parts"), -1).to_numpy(zero_copy_only=False))
            else:
                self.has_parts = False
            # large_string: one array past 2 GB of RLE text (LVIS with detailed masks) stays valid
            counts.extend(t.column("rle_counts").cast(pa.large_string()).chunks)
        ids = np.concatenate(cols["ann_id"]) if cols["ann_id"] else np.zeros(0, np.int64)
        self.height, self.width, self.area, self.score = (
            np.concatenate(cols[k]) if cols[k] else np.zeros(0) for k in ("height", "width", "area", "score"))
        self.parts = np.concatenate(cols["num_parts"]) if self.has_parts and cols["num_parts"] else None
        self.counts = pa.chunked_array(counts, pa.large_string()).combine_chunks()
        self.num_rows = len(ids)
        # A sorted copy + searchsorted replaces a {ann_id: row} dict (~100 B per entry in CPython).
        # Stable sort, then the rightmost match: the last row of a repeated id wins.
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def row(self, ann_id: Any) -> int | None:
        # The reader's id rule (exits.data.ids): a json id 5.0 is object 5; strings, bools and
        # fractions are rejected records and match nothing (True must not take object 1's mask).
        ann_id = as_int_id(ann_id)
        if ann_id is None:
            return None
        j = int(np.searchsorted(self._sorted, ann_id, side="right")) - 1
        if j < 0 or self._sorted[j] != ann_id:
            return None
        return int(self._order[j])

    def annotation(self, ann: dict, i: int) -> dict:
        rle = {"size": [int(self.height[i]), int(self.width[i])], "counts": self.counts[i].as_py()}
        # num_parts is recounted on the pseudo mask (in the shard, or here for shards written
        # before it was stored): an input json may carry a count made from its GT masks (the
        # demo data does), which must not travel with pseudo labels.
        parts = int(self.parts[i]) if self.parts is not None and self.parts[i] >= 0 else count_parts_rle(rle)
        return dict(ann, segmentation=rle, area=float(self.area[i]), score=round(float(self.score[i]), 5), num_parts=parts)


def _write_parquet_in_order(path: Path, tables: Iterable[pa.Table], order: np.ndarray, schema: pa.Schema) -> None:
    """Rows ``order`` (global row indices over ``tables``) of the concatenated tables to ``path``.

    Increasing ``order`` (the usual case: the shards follow the json) is written in one pass
    over ``tables``, one table in memory at a time; any other order takes the rows from the
    concatenated tables (a merge of hand-reordered shards, small in practice).
    """
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        if len(order) > 1 and not bool(np.all(np.diff(order) > 0)):
            full = pa.concat_tables(list(tables))
            for k in range(0, len(order), ROW_GROUP_ROWS):
                writer.write_table(full.take(pa.array(order[k:k + ROW_GROUP_ROWS])).cast(schema))
            return
        pending: list[pa.Table] = []
        pending_rows, start = 0, 0
        for t in tables:
            lo, hi = np.searchsorted(order, [start, start + t.num_rows])
            start += t.num_rows
            if hi > lo:
                idx = order[lo:hi] - (start - t.num_rows)
                pending.append(t if len(idx) == t.num_rows else t.take(pa.array(idx)))
                pending_rows += len(idx)
            if pending_rows >= ROW_GROUP_ROWS:  # whole row groups out, the remainder waits
                block = pa.concat_tables(pending).cast(schema)
                full = pending_rows - pending_rows % ROW_GROUP_ROWS
                writer.write_table(block.slice(0, full), row_group_size=ROW_GROUP_ROWS)
                pending, pending_rows = [block.slice(full)], pending_rows - full
        if pending_rows or not len(order):
            writer.write_table(pa.concat_tables(pending).cast(schema) if pending_rows else schema.empty_table(),
                               row_group_size=ROW_GROUP_ROWS)


def rejected_image_ids(workdir: Path) -> set[int]:
    """Ids of the images stage 0 rejected as a whole (missing, corrupt, outside the image
    folder, ...), from the run's ``rejections.json``; empty when there is none."""
    path = RunFolder(workdir).rejections
    if not path.is_file():
        return set()
    out = set()
    with open(path, encoding="utf-8") as fh:
        listed = json.load(fh).get("rejections", [])
    for r in listed:
        image_id = as_int_id(r.get("image_id"))
        # "record" (since it was added) says what was rejected; older files: no annotation id.
        is_image = r.get("record") == "image" if "record" in r else r.get("ann_id") is None
        if is_image and image_id is not None:
            out.add(image_id)
    return out


def kept_images(images: Any, rejected: set[int]) -> Any:
    """The json's ``images`` list without the records stage 0 rejected: a non-integer id
    (``"1"`` is not image 1) or an image rejected as a whole. Stage 2 trains on every image
    of the list, so a rejected one must not stay in it (it would be read, or trained on as
    an image with no objects)."""
    if not isinstance(images, list):
        return images
    return [im for im in images if isinstance(im, dict) and as_int_id(im.get("id")) is not None
            and as_int_id(im.get("id")) not in rejected]


def write_pseudo_label_files(annotations_json: Path, tables: Iterable[pa.Table], workdir: Path,
                             schema: pa.Schema) -> dict[str, Path]:
    """``pseudo_labels.json`` (input json, segmentation -> pseudo RLE, + score, num_parts of the
    pseudo mask; objects with no pseudo mask, i.e. rejected records, are left out, and so are
    the images stage 0 rejected: :func:`kept_images`) and ``pseudo_labels.parquet`` (the same
    objects, in the json's order) from ``schema`` tables.

    ``tables``: re-iterable (a list, or :class:`exits.stages.shards.ShardTables` that reads
    its files again on each pass); it is read twice, once for the columns the json needs and
    once for the Parquet rows.
    """

    cols = MergeColumns(tables)
    run = RunFolder(workdir)
    rejected = rejected_image_ids(workdir)
    order: list[int] = []
    categories: dict[int, str] = {}
    with open_json_text(annotations_json) as src, atomic_open(run.pseudo_json) as out:
        out.write("{")
        first, saw_info = True, False
        for key, value in iter_top_level(src, stream="annotations", source=str(annotations_json)):
            out.write(("" if first else ", ") + json.dumps(key) + ": ")
            first = False
            if key == "annotations":
                out.write("[")
                n = 0
                for ann in value:
                    i = cols.row(ann.get("id")) if isinstance(ann, dict) else None
                    if i is None:
                        continue
                    out.write((", " if n else "") + json.dumps(cols.annotation(ann, i)))
                    order.append(i)
                    n += 1
                out.write("]")
                continue
            if key == "info":
                value["pseudo_labels"] = PSEUDO_INFO
                saw_info = True
            elif key == "images":
                value = kept_images(value, rejected)
            elif key == "categories" and isinstance(value, list):
                categories = {as_int_id(c["id"]): str(c.get("name", c["id"])) for c in value
                              if isinstance(c, dict) and as_int_id(c.get("id")) is not None}
            out.write(json.dumps(value))
        if not saw_info:
            out.write(("" if first else ", ") + '"info": ' + json.dumps({"pseudo_labels": PSEUDO_INFO}))
        out.write("}")
    del cols  # the RLE strings: the Parquet pass below reads them again, table by table
    meta = {CATEGORIES_METADATA: json.dumps(categories).encode()}
    _write_parquet_in_order(run.pseudo_parquet, tables, np.asarray(order, dtype=np.int64), schema.with_metadata(meta))
    log.info("pseudo labels: %d objects -> %s", len(order), run.pseudo_json)
    return {"json": run.pseudo_json, "parquet": run.pseudo_parquet}


def merge_pseudo_labels_in_memory(annotations_json: Path, table: pa.Table,
                                  rejected_images: set[int] = frozenset()) -> dict[str, Any]:
    """Reference merge: the whole input json as a dict, annotations replaced (what
    :func:`write_pseudo_label_files` streams; kept for tests and small inputs)."""
    with open_json_text(annotations_json) as fh:
        data = json.load(fh)
    data["images"] = kept_images(data["images"], set(rejected_images))
    cols = MergeColumns([table])
    data["annotations"] = [cols.annotation(ann, cols.row(ann.get("id"))) for ann in data["annotations"]
                           if cols.row(ann.get("id")) is not None]
    data.setdefault("info", {})["pseudo_labels"] = PSEUDO_INFO
    return data
