"""A run's review objects and images as columns read from its Parquet files.

``pseudo_labels.parquet`` (ids, category, score, parts, RLE pseudo masks) and
``instances.parquet`` (extreme points, crop windows, image file names and sizes) are read
once for the queue's columns (:class:`exits.spotfix.queue._QueueIndex`) and the images;
each object's mask, extreme points and crop window stay in the files and are read when the
object is asked for (:class:`ObjectColumns`, a row group at a time, through
:class:`RowReader`), kept in a bounded cache. :func:`columns_from_parquet` builds both, or
says the run's files are too old for it (the catalog then reads ``pseudo_labels.json``).
"""
from __future__ import annotations

import ctypes
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from exits.run_folder import RunFolder
from exits.spotfix.masks import rle_parts
from exits.spotfix.queue import _compact, _QueueIndex
from exits.spotfix.review_object import ImageInfo, ReviewObject

if TYPE_CHECKING:
    import pyarrow as pa

# Objects (mask, points, crop window) kept once read from the Parquet files: the open one,
# its neighbours, the thumbnails of the pages being looked at.
OBJECT_CACHE = 4096
# Rows of the last pages listed, read ahead together (the /api/queue limit is at most 5000).
LISTED_ROWS = 5000
# Rows per batch when an object's row group is read (memory: one batch, not the row group).
READ_BATCH_ROWS = 4096


class RowReader:
    """Rows of one Parquet file by row number: reads one row group (only ``columns``) at a
    time, in batches of ``READ_BATCH_ROWS`` rows, stopping after the last row wanted; through
    a handle opened once (a file replaced later, e.g. stage 1 re-run, is not mixed with the
    rows this catalog indexed)."""

    def __init__(self, path: Path, columns: Sequence[str]):
        import pyarrow.parquet as pq

        self.path, self.columns = path, list(columns)
        self.file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        md = self.file.metadata
        self.starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])

    def groups(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def read(self, group: int, rows: np.ndarray) -> "pa.Table":
        """File rows ``rows`` (all in ``group``), in that order."""
        import pyarrow as pa

        local = np.asarray(rows, np.int64) - int(self.starts[group])
        by_row = np.argsort(local, kind="stable")
        wanted = local[by_row]
        parts, first = [], 0
        for batch in self.file.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[int(group)],
                                            columns=self.columns, use_threads=False):
            lo, hi = np.searchsorted(wanted, [first, first + batch.num_rows])
            if hi > lo:
                parts.append(batch.take(pa.array(wanted[lo:hi] - first)))
            first += batch.num_rows
            if hi == len(wanted):
                break
        table = pa.Table.from_batches(parts, schema=self.file.schema_arrow.empty_table().select(self.columns).schema)
        back = np.empty_like(by_row)
        back[by_row] = np.arange(len(by_row))
        return table.take(pa.array(back))


def _release_freed_memory() -> None:
    """Hand memory freed while loading back to the system: arrow's pool, and the C heap (the
    load's numpy temporaries, a few MB each, stay in glibc's heap otherwise; a no-op elsewhere)."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ObjectColumns(Mapping[int, ReviewObject]):
    """The review objects of a run from ``pseudo_labels.parquet`` + ``instances.parquet``:
    the queue's columns (:class:`_QueueIndex`) and each object's file rows (4 B each) stay in
    memory; an object's mask (RLE), extreme points and crop window are read from the files
    when it is asked for, and kept in a bounded cache. The rows of the last pages listed are
    read together, one row group per file, when the first of them is asked for (the page's
    thumbnails), so a page of 500 objects costs at most one read per row group."""

    def __init__(self, index: _QueueIndex, pseudo: RowReader, pseudo_row: np.ndarray, instances: RowReader,
                 instance_row: np.ndarray):
        self.index = index
        self._pseudo, self._instances = pseudo, instances
        self._pseudo_row, self._instance_row = _compact(pseudo_row), _compact(instance_row)
        self._lock = threading.Lock()
        self._objects: OrderedDict[int, ReviewObject] = OrderedDict()  # queue position -> object
        self._rle: dict[int, tuple[int, int, str]] = {}  # read ahead, not yet made into an object
        self._geo: dict[int, tuple[tuple[tuple[float, float], ...], tuple[int, ...]]] = {}
        self._listed: OrderedDict[int, None] = OrderedDict()

    def note_listed(self, positions: np.ndarray) -> None:
        """The queue just listed these rows: their objects are likely asked for next."""
        with self._lock:
            for p in positions.tolist():
                self._listed[p] = None
                self._listed.move_to_end(p)
            while len(self._listed) > LISTED_ROWS:
                self._listed.popitem(last=False)

    def object(self, p: int) -> ReviewObject:
        with self._lock:
            obj = self._objects.get(p)
            if obj is not None:
                self._objects.move_to_end(p)
                return obj
            if p not in self._rle:
                self._read_ahead(p, self._pseudo, self._pseudo_row, self._rle, self._rle_values)
            if p not in self._geo:
                self._read_ahead(p, self._instances, self._instance_row, self._geo, self._geo_values)
            h, w, counts = self._rle.pop(p)
            points, crop = self._geo.pop(p)
            item = self.index.item(p)
            obj = ReviewObject(ann_id=item.ann_id, image_id=item.image_id, category_id=item.category_id,
                               score=item.score, parts=item.parts, extreme_points=points, crop_box=crop,
                               rle={"size": [h, w], "counts": counts})
            self._objects[p] = obj
            while len(self._objects) > OBJECT_CACHE:
                self._objects.popitem(last=False)
            return obj

    def _read_ahead(self, p: int, reader: RowReader, file_row: np.ndarray, into: dict, values) -> None:
        """Read ``p``'s row group once for ``p`` and every listed row in it not read yet."""
        group = int(reader.groups(file_row[p]))
        listed = np.fromiter((q for q in self._listed if q not in into and q not in self._objects and q != p),
                             np.int64)
        if len(listed):
            listed = listed[reader.groups(file_row[listed]) == group]
        batch = np.concatenate([[p], listed]).astype(np.int64)
        for q, v in zip(batch.tolist(), values(reader.read(group, file_row[batch]))):
            into[q] = v
        while len(into) > 2 * LISTED_ROWS:  # rows read ahead but never asked for
            del into[next(iter(into))]

    @staticmethod
    def _rle_values(table: "pa.Table") -> Iterator[tuple[int, int, str]]:
        d = table.to_pydict()
        return zip(d["height"], d["width"], d["rle_counts"])

    @staticmethod
    def _geo_values(table: "pa.Table") -> Iterator[tuple[tuple[tuple[float, float], ...], tuple[int, ...]]]:
        d = table.to_pydict()
        for pts, box in zip(d["extreme_points"], d["crop_box"]):
            yield (tuple((float(pts[k]), float(pts[k + 1])) for k in range(0, 8, 2)), tuple(int(v) for v in box))

    def __getitem__(self, ann_id: int) -> ReviewObject:
        p = self.index.position(ann_id)
        if p is None:
            raise KeyError(ann_id)
        return self.object(p)

    def __contains__(self, ann_id: object) -> bool:
        return self.index.position(ann_id) is not None

    def __iter__(self) -> Iterator[int]:
        return self.index.ids()

    def __len__(self) -> int:
        return self.index.unique


class ImageColumns(Mapping[int, ImageInfo]):
    """Images by id as columns (sorted ids, sizes, one arrow array of file names)."""

    def __init__(self, image_id: np.ndarray, file_name: "pa.Array", width: np.ndarray, height: np.ndarray):
        self._ids = np.asarray(image_id, np.int64)  # sorted, unique
        self._names, self._w, self._h = file_name, _compact(width), _compact(height)

    def _pos(self, image_id: object) -> int | None:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            return None
        if not np.iinfo(np.int64).min <= image_id <= np.iinfo(np.int64).max:
            return None
        j = int(np.searchsorted(self._ids, image_id))
        return j if j < len(self._ids) and self._ids[j] == image_id else None

    def __getitem__(self, image_id: int) -> ImageInfo:
        j = self._pos(image_id)
        if j is None:
            raise KeyError(image_id)
        return ImageInfo(int(self._ids[j]), str(self._names[j].as_py()), int(self._w[j]), int(self._h[j]))

    def __contains__(self, image_id: object) -> bool:
        return self._pos(image_id) is not None

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def columns_from_parquet(run: RunFolder) -> tuple[ImageColumns, ObjectColumns, dict[int, str]] | None:
    """(images, objects, categories) from ``pseudo_labels.parquet`` + ``instances.parquet``
    columns; None when the run's files predate what this needs (then the json is read):
    the parquet lacks ``num_parts`` or the categories metadata, is older than the json, or
    there is no instances table.

    Read: the queue's columns of the pseudo labels (ids, category, score, parts; no RLE) and
    of the instances table its ids and image columns; the RLEs, extreme points and crop
    windows stay in the files (:class:`ObjectColumns` reads them per object)."""
    import pyarrow.parquet as pq

    from exits.stages.pseudo_label_files import CATEGORIES_METADATA

    pseudo_path, inst_path = run.pseudo_parquet, run.instances
    if not (pseudo_path.is_file() and inst_path.is_file()):
        return None
    if pseudo_path.stat().st_mtime_ns < run.pseudo_json.stat().st_mtime_ns:
        return None
    schema = pq.read_schema(pseudo_path)
    meta = schema.metadata or {}
    if "num_parts" not in schema.names or CATEGORIES_METADATA not in meta:
        return None
    pseudo_reader = RowReader(pseudo_path, ["height", "width", "rle_counts"])
    inst_reader = RowReader(inst_path, ["extreme_points", "crop_box"])
    nan = float("nan")
    pseudo = _numpy_columns(pseudo_reader, {"ann_id": (np.int64, None), "image_id": (np.int64, None),
                                            "category_id": (np.int64, None), "score": (np.float64, nan),
                                            "num_parts": (np.int64, -1)})
    inst = _numpy_columns(inst_reader, {"ann_id": (np.int64, None), "image_id": (np.int64, None)})
    # each object's instances row (the first one of its id); objects without one cannot be reviewed
    by_ann = np.argsort(inst["ann_id"], kind="stable")
    sorted_ann = inst["ann_id"][by_ann]
    j = np.minimum(np.searchsorted(sorted_ann, pseudo["ann_id"], side="left"), max(len(sorted_ann) - 1, 0))
    found = sorted_ann[j] == pseudo["ann_id"] if len(sorted_ann) else np.zeros(len(pseudo["ann_id"]), bool)
    file_row = np.flatnonzero(found)
    instance_row = by_ann[j[found]]
    del by_ann, sorted_ann, j
    pseudo = {k: v[found] for k, v in pseudo.items()}
    parts = pseudo["num_parts"]
    missing = np.flatnonzero(parts < 0)
    if len(missing):  # shards written before num_parts was stored: count on the pseudo masks
        groups = pseudo_reader.groups(file_row[missing])
        for g in np.unique(groups):
            rows = missing[groups == g]
            d = pseudo_reader.read(int(g), file_row[rows]).to_pydict()
            for i, h, w, counts in zip(rows.tolist(), d["height"], d["width"], d["rle_counts"]):
                parts[i] = rle_parts({"size": [h, w], "counts": counts})
    index = _QueueIndex(pseudo["ann_id"], pseudo["image_id"], pseudo["category_id"],
                        np.round(pseudo["score"], 5),  # as pseudo_labels.json stores it
                        parts)
    order = index.order
    objects = ObjectColumns(index, pseudo_reader, file_row[order], inst_reader, instance_row[order])
    del pseudo, parts, order, file_row, instance_row
    images = _image_columns(inst_reader, inst["image_id"])
    categories = {int(k): str(v) for k, v in json.loads(meta[CATEGORIES_METADATA]).items()}
    _release_freed_memory()
    return images, objects, categories


def _numpy_columns(reader: RowReader, columns: dict[str, tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """Whole columns of ``reader``'s file as numpy arrays ({name: (dtype, value for null)}),
    filled one row group at a time (no table of the whole file is held)."""
    import pyarrow.compute as pc

    out = {name: np.empty(int(reader.starts[-1]), dtype) for name, (dtype, _) in columns.items()}
    for g in range(len(reader.starts) - 1):
        table = reader.file.read_row_group(g, columns=list(columns), use_threads=False)
        a, b = int(reader.starts[g]), int(reader.starts[g + 1])
        for name, (dtype, fill) in columns.items():
            col = table.column(name)
            if fill is not None:
                col = pc.fill_null(col.cast(_pa_type(dtype)), fill)
            out[name][a:b] = col.to_numpy()
    return out


def _pa_type(dtype: Any) -> "pa.DataType":
    import pyarrow as pa

    return pa.from_numpy_dtype(np.dtype(dtype))


def _image_columns(reader: RowReader, image_id: np.ndarray) -> ImageColumns:
    """The images of the instances table: each image's first row (file name, size)."""
    import pyarrow as pa

    ids, first = np.unique(image_id, return_index=True)
    by_row = np.argsort(first)
    rows = first[by_row]
    groups = reader.groups(rows)
    parts = [reader.file.read_row_group(int(g), columns=["file_name", "width", "height"], use_threads=False)
             .take(pa.array(rows[groups == g] - int(reader.starts[g]))) for g in np.unique(groups)]
    schema = reader.file.schema_arrow
    table = (pa.concat_tables(parts) if parts else
             pa.schema([schema.field("file_name"), schema.field("width"), schema.field("height")]).empty_table())
    back = np.empty_like(by_row)
    back[by_row] = np.arange(len(by_row))
    table = table.take(pa.array(back))  # rows in image id order again
    return ImageColumns(ids, table["file_name"].combine_chunks(), table["width"].to_numpy(),
                         table["height"].to_numpy())
