"""The objects a spot-fix session reviews: a run folder's pseudo labels, read once.

Sources: ``pseudo_labels.json`` (masks, scores, extreme points, images, categories),
``instances.parquet`` (each object's stage-1 crop window, when present) and ``run.json``
(the image folder). "Separated" is counted on the *pseudo* mask (>= 2 visible parts,
exits.eval.separated rule): the json's own ``num_parts`` may come from the input
annotations, i.e. from GT masks, which are for evaluation only.
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from exits.data.images import image_file, read_rgb
from exits.run_folder import RunFolder
from exits.spotfix.masks import decode_rle, rle_parts

if TYPE_CHECKING:
    import pyarrow as pa

# Crop margins of the demo/paper configs, used only when instances.parquet is absent.
FALLBACK_MARGIN, FALLBACK_MIN_MARGIN_PX = 0.15, 4
# Rows of the score-sorted columns one step of a queue request looks at (its memory: ~1 B
# per row, whatever the run's size).
QUEUE_SCAN_ROWS = 1 << 16
# Objects (mask, points, crop window) kept once read from the Parquet files: the open one,
# its neighbours, the thumbnails of the pages being looked at.
OBJECT_CACHE = 4096
# Rows of the last pages listed, read ahead together (the /api/queue limit is at most 5000).
LISTED_ROWS = 5000
# Rows per batch when an object's row group is read (memory: one batch, not the row group).
READ_BATCH_ROWS = 4096


class CatalogError(ValueError):
    """The run folder cannot be reviewed (missing files, bad image folder)."""


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class ReviewObject:
    """One pseudo-labelled object; ``rle`` is its pseudo mask, ``score`` its quality score
    (``None`` when the run has none), ``parts`` the visible parts of the pseudo mask."""

    ann_id: int
    image_id: int
    category_id: int
    score: float | None
    parts: int
    extreme_points: tuple[tuple[float, float], ...]
    crop_box: tuple[int, int, int, int]
    rle: dict[str, Any]

    @property
    def separated(self) -> bool:
        return self.parts >= 2

    @property
    def sort_key(self) -> tuple[float, int]:
        # Worst first; objects without a score are unknown quality, so they come first too.
        return (-math.inf if self.score is None else self.score, self.ann_id)


@dataclass(frozen=True)
class QueueFilter:
    category_id: int | None = None
    separated: bool | None = None
    min_score: float | None = None
    max_score: float | None = None

    def accepts(self, obj: ReviewObject) -> bool:
        if self.category_id is not None and obj.category_id != self.category_id:
            return False
        if self.separated is not None and obj.separated != self.separated:
            return False
        # written as the columns compare: no score, or a NaN bound, passes no range
        if self.min_score is not None and not (obj.score is not None and obj.score >= self.min_score):
            return False
        if self.max_score is not None and not (obj.score is not None and obj.score <= self.max_score):
            return False
        return True


@dataclass(frozen=True)
class QueueItem:
    """One row of the queue as the list shows it (no mask, no geometry): made from the
    queue's columns only, so listing never reads an RLE."""

    ann_id: int
    image_id: int
    category_id: int
    score: float | None
    parts: int

    @property
    def separated(self) -> bool:
        return self.parts >= 2


@dataclass(frozen=True)
class QueuePage:
    """``items``: rows ``[offset, offset + limit)`` of the filtered queue; ``total``: its length."""

    total: int
    items: list[QueueItem]


def _compact(a: np.ndarray) -> np.ndarray:
    """An integer column as int32 when every value fits (the values are unchanged)."""
    a = np.asarray(a)
    if a.dtype.kind in "iu" and a.dtype.itemsize > 4 and (
            not len(a) or (int(a.min()) >= np.iinfo(np.int32).min and int(a.max()) <= np.iinfo(np.int32).max)):
        return a.astype(np.int32)
    return a


def _int64_ids(ids: Iterable[Any]) -> np.ndarray:
    """The integer ids that can be object ids (int64), sorted and unique; others match nothing."""
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    ok = [int(a) for a in ids if isinstance(a, (int, np.integer)) and not isinstance(a, bool) and lo <= a <= hi]
    return np.unique(np.asarray(ok, dtype=np.int64))


class _QueueIndex:
    """The queue's order and filter columns, one numpy array each, rows in queue order: worst
    score first (no score = unknown quality, first too), ties by id.

    A queue request scans these columns in steps of ``QUEUE_SCAN_ROWS`` rows, counting the
    rows that pass and keeping only the page's positions: no filtered list, no Python object
    per object. The score range is a slice of the sorted scores (``searchsorted``); the
    status filter comes as the few decided ids (their positions are found by lookup).

    Held per object: ann_id 8 B + score 8 B + category, image id and parts 4 B each (8 B for
    ids past int32) + the id lookup (sorted ids 8 B + their positions 4 B) = 40 B.
    """

    def __init__(self, ann_id: np.ndarray, image_id: np.ndarray, category_id: np.ndarray, score: np.ndarray,
                 parts: np.ndarray):
        """Columns of the objects in file order (a repeated id: its last row is the one looked up)."""
        ann_id = np.asarray(ann_id, dtype=np.int64)
        score = np.asarray(score, dtype=np.float64)
        key = np.where(np.isnan(score), -np.inf, score)
        by_id = np.argsort(ann_id, kind="stable")  # by id, ties in file order
        order = by_id[np.argsort(key[by_id], kind="stable")]  # worst first, ties by id (then file order)
        self.order = order  # the permutation, for the caller's own per-object columns
        self.ann_id = ann_id[order]
        self.score = score[order]
        self.category_id = _compact(np.asarray(category_id)[order])
        self.image_id = _compact(np.asarray(image_id)[order])
        self.parts = _compact(np.asarray(parts)[order])
        self.size = len(order)
        # Rows with no score (NaN) or a score of -inf sort first; every other score after them,
        # ascending: a score range is a slice of that tail.
        self._head = int(np.count_nonzero(key == -np.inf))
        # Id lookup: the sorted ids and their queue positions (a repeated id: the rightmost
        # match is its last file row, like a dict built in file order).
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        self._sorted_ids = ann_id[by_id]
        self._by_id = _compact(position[by_id])
        self.unique = int(np.count_nonzero(np.diff(self._sorted_ids))) + 1 if len(order) else 0

    def position(self, ann_id: Any) -> int | None:
        """Queue position of ``ann_id`` (its last file row if repeated); None if absent."""
        if isinstance(ann_id, bool) or not isinstance(ann_id, (int, np.integer)):
            return None
        if not np.iinfo(np.int64).min <= ann_id <= np.iinfo(np.int64).max:
            return None
        j = int(np.searchsorted(self._sorted_ids, ann_id, side="right")) - 1
        if j < 0 or self._sorted_ids[j] != ann_id:
            return None
        return int(self._by_id[j])

    def positions(self, ids: Iterable[Any]) -> np.ndarray:
        """Queue positions (ascending) of every row whose id is in ``ids``."""
        want = _int64_ids(ids)
        left = np.searchsorted(self._sorted_ids, want, side="left")
        right = np.searchsorted(self._sorted_ids, want, side="right")
        n = right - left
        if not n.any():
            return np.zeros(0, np.int64)
        j = np.repeat(left - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(int(n.sum()))
        return np.sort(self._by_id[j].astype(np.int64))

    def ids(self) -> Iterator[int]:
        """Every id once, ascending."""
        last = None
        for a in self._sorted_ids:
            if a != last:
                last = a
                yield int(a)

    def item(self, p: int) -> QueueItem:
        score = float(self.score[p])
        return QueueItem(ann_id=int(self.ann_id[p]), image_id=int(self.image_id[p]),
                         category_id=int(self.category_id[p]), score=None if math.isnan(score) else score,
                         parts=int(self.parts[p]))

    def _score_slice(self, flt: QueueFilter) -> tuple[int, int, bool]:
        """Positions ``[lo, hi)`` that can pass the score range, and whether rows of the head
        (no score / -inf) inside it must be checked for a missing score (which fails a range)."""
        lo_s, hi_s = flt.min_score, flt.max_score
        if lo_s is None and hi_s is None:
            return 0, self.size, False
        if (lo_s is not None and math.isnan(lo_s)) or (hi_s is not None and math.isnan(hi_s)):
            return 0, 0, False  # nothing compares true with NaN
        tail = self.score[self._head:]  # no NaN, ascending
        lo = self._head + (int(np.searchsorted(tail, lo_s, side="left")) if lo_s is not None else 0)
        hi = self._head + (int(np.searchsorted(tail, hi_s, side="right")) if hi_s is not None else len(tail))
        if (lo_s is None or lo_s == -math.inf) and (hi_s is None or hi_s >= -math.inf):
            lo = 0  # a score of -inf passes such a range: the head is in it, less its missing scores
        return lo, max(lo, hi), lo < self._head

    def _mask(self, flt: QueueFilter, a: int, b: int, check_head: bool) -> np.ndarray:
        ok = np.ones(b - a, bool)
        if flt.category_id is not None:
            ok &= self.category_id[a:b] == flt.category_id
        if flt.separated is not None:
            ok &= (self.parts[a:b] >= 2) == bool(flt.separated)
        if check_head and a < self._head:
            h = min(b, self._head)
            ok[:h - a] &= ~np.isnan(self.score[a:h])
        return ok

    def page(self, flt: QueueFilter, offset: int, limit: int, only: Iterable[Any] | None = None,
             exclude: Iterable[Any] = ()) -> tuple[int, np.ndarray]:
        """(number of rows passing, positions of rows ``[offset, offset + limit)`` of them).

        ``only``: just the rows of these ids (a status such as "accepted": few ids);
        ``exclude``: not the rows of these ids (status "todo": all but the decided ones).
        """
        lo, hi, check_head = self._score_slice(flt)
        if only is not None:
            pos = self.positions(only)
            pos = pos[(pos >= lo) & (pos < hi)]
            keep = np.ones(len(pos), bool)
            if flt.category_id is not None:
                keep &= self.category_id[pos] == flt.category_id
            if flt.separated is not None:
                keep &= (self.parts[pos] >= 2) == bool(flt.separated)
            if check_head:
                keep &= ~((pos < self._head) & np.isnan(self.score[pos]))
            pos = pos[keep]
            return len(pos), pos[offset:offset + limit]
        skip = self.positions(exclude)
        skip = skip[(skip >= lo) & (skip < hi)]
        total, found, s = 0, [], 0
        for a in range(lo, hi, QUEUE_SCAN_ROWS):
            b = min(a + QUEUE_SCAN_ROWS, hi)
            ok = self._mask(flt, a, b, check_head)
            e = s + int(np.searchsorted(skip[s:], b, side="left"))
            ok[skip[s:e] - a] = False
            s = e
            n = int(np.count_nonzero(ok))
            want = offset + limit - total  # rows of this step still before the page's end
            if n and want > 0 and total + n > offset:
                rows = np.flatnonzero(ok)[max(0, offset - total):want] + a
                found.append(rows)
            total += n
        return total, (np.concatenate(found) if found else np.zeros(0, np.int64))[:limit]

    def select(self, flt: QueueFilter) -> np.ndarray:
        """Positions of every row passing ``flt`` (the Python API's whole queue)."""
        lo, hi, check_head = self._score_slice(flt)
        return np.flatnonzero(self._mask(flt, lo, hi, check_head)) + lo


class _RowReader:
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


class _ObjectColumns(Mapping[int, ReviewObject]):
    """The review objects of a run from ``pseudo_labels.parquet`` + ``instances.parquet``:
    the queue's columns (:class:`_QueueIndex`) and each object's file rows (4 B each) stay in
    memory; an object's mask (RLE), extreme points and crop window are read from the files
    when it is asked for, and kept in a bounded cache. The rows of the last pages listed are
    read together, one row group per file, when the first of them is asked for (the page's
    thumbnails), so a page of 500 objects costs at most one read per row group."""

    def __init__(self, index: _QueueIndex, pseudo: _RowReader, pseudo_row: np.ndarray, instances: _RowReader,
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

    def _read_ahead(self, p: int, reader: _RowReader, file_row: np.ndarray, into: dict, values) -> None:
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


class _ObjectSequence(Sequence[ReviewObject]):
    """A queue over queue positions: objects are made as they are read."""

    def __init__(self, object_at: Callable[[int], ReviewObject], rows: np.ndarray):
        self.object_at, self.rows = object_at, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self.object_at(int(i)) for i in self.rows[k]]
        return self.object_at(int(self.rows[k]))

    def __iter__(self) -> Iterator[ReviewObject]:
        for i in self.rows:
            yield self.object_at(int(i))


class _ImageColumns(Mapping[int, ImageInfo]):
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


class RunCatalog:
    """Objects, images and categories of one run folder, plus safe image access."""

    def __init__(self, workdir: Path, image_root: Path, images: Mapping[int, ImageInfo],
                 objects: Mapping[int, ReviewObject], categories: dict[int, str]) -> None:
        self.workdir = workdir
        self.image_root = image_root.resolve()
        self.images = images
        self.objects = objects
        self.categories = categories
        self._columns = objects if isinstance(objects, _ObjectColumns) else None
        if self._columns is not None:
            self._index = self._columns.index
            self._object_at: Callable[[int], ReviewObject] = self._columns.object
        else:  # objects made from the json (older runs): the same index over them
            objs = list(objects.values())
            self._index = _QueueIndex(
                np.array([o.ann_id for o in objs], np.int64), np.array([o.image_id for o in objs], np.int64),
                np.array([o.category_id for o in objs], np.int64),
                np.array([math.nan if o.score is None else o.score for o in objs], np.float64),
                np.array([o.parts for o in objs], np.int64))
            by_position = [objs[i] for i in self._index.order]
            self._object_at = by_position.__getitem__
        self._index.order = None  # only needed to build it

    @classmethod
    def load(cls, workdir: str | Path, image_root: str | Path | None = None) -> "RunCatalog":
        """Read a run folder. ``image_root`` defaults to the folder named in ``run.json``.

        Raises:
            CatalogError: no pseudo_labels.json, no known/existing image folder.
        """
        workdir = Path(workdir)
        run = RunFolder(workdir)
        path = run.pseudo_json
        if not path.is_file():
            raise CatalogError(f"{path} not found: run stage 1 (`exits run`) first")
        root = Path(image_root) if image_root is not None else run.read_meta().images
        if root is None:
            raise CatalogError(f"{run.run_meta} names no image folder: pass --images DIR")
        if not root.is_dir():
            raise CatalogError(f"image folder not found: {root}")
        columns = _columns_from_parquet(run)
        if columns is not None:
            return cls(workdir, root, *columns)
        # older runs: objects from the json (these modules import torch: only on this path, so
        # that a server over Parquet columns with the GrabCut editor never loads it)
        from exits.report.run_files import read_object_geometry

        data = json.loads(path.read_text(encoding="utf-8"))
        images = {int(im["id"]): ImageInfo(int(im["id"]), str(im["file_name"]), int(im["width"]), int(im["height"]))
                  for im in data.get("images", [])}
        categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])}
        geometry = read_object_geometry(workdir)
        objects: dict[int, ReviewObject] = {}
        for ann in data.get("annotations", []):
            obj = _review_object(ann, images, geometry)
            if obj is not None:
                objects[obj.ann_id] = obj
        return cls(workdir, root, images, objects, categories)

    def queue(self, flt: QueueFilter = QueueFilter()) -> Sequence[ReviewObject]:
        """Objects passing ``flt``, worst pseudo-mask score first (ties by id), as a lazy
        sequence (objects made as read). The server pages with :meth:`page` instead."""
        return _ObjectSequence(self._object_at, self._index.select(flt))

    def page(self, flt: QueueFilter, offset: int = 0, limit: int = 500, *, only: Iterable[int] | None = None,
             exclude: Iterable[int] = ()) -> QueuePage:
        """Rows ``[offset, offset + limit)`` of the queue of objects passing ``flt`` (worst score
        first, ties by id) and the queue's length, from one scan of the queue's columns that
        keeps only the page (no list of the filtered objects is made). ``only``: just these
        ids; ``exclude``: not these ids (the status filters: decided ids are few)."""
        total, rows = self._index.page(flt, offset, limit, only=only, exclude=exclude)
        if self._columns is not None:
            self._columns.note_listed(rows)
        return QueuePage(total=total, items=[self._index.item(int(p)) for p in rows])

    def image_path(self, image_id: int) -> Path:
        """The image file, guaranteed inside the image folder (exits.data.images.image_file:
        the one rule of every stage).

        Raises:
            KeyError: unknown image id.
            ImagePathError: the file name leads outside the image folder (``..``, absolute
                paths, symlinks out of it); reason ``outside_image_dir``.
            FileNotFoundError: the file is missing (``filename`` set).
        """
        info = self.images[image_id]
        path = image_file(self.image_root, info.file_name)
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, f"image {image_id} file is missing", str(path))
        return path

    def load_image(self, image_id: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB, as stage 1 read it (exits.data.images.read_rgb).

        Raises:
            ImagePathError, FileNotFoundError: as :meth:`image_path`.
            ImageReadError: the file is corrupt or not an image.
        """
        return read_rgb(self.image_path(image_id))

    def pseudo_mask(self, ann_id: int) -> np.ndarray:
        obj = self.objects[ann_id]
        info = self.images[obj.image_id]
        return decode_rle(obj.rle, info.height, info.width)


def _columns_from_parquet(run: RunFolder) -> tuple[_ImageColumns, _ObjectColumns, dict[int, str]] | None:
    """(images, objects, categories) from ``pseudo_labels.parquet`` + ``instances.parquet``
    columns; None when the run's files predate what this needs (then the json is read):
    the parquet lacks ``num_parts`` or the categories metadata, is older than the json, or
    there is no instances table.

    Read: the queue's columns of the pseudo labels (ids, category, score, parts; no RLE) and
    of the instances table its ids and image columns; the RLEs, extreme points and crop
    windows stay in the files (:class:`_ObjectColumns` reads them per object)."""
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
    pseudo_reader = _RowReader(pseudo_path, ["height", "width", "rle_counts"])
    inst_reader = _RowReader(inst_path, ["extreme_points", "crop_box"])
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
    objects = _ObjectColumns(index, pseudo_reader, file_row[order], inst_reader, instance_row[order])
    del pseudo, parts, order, file_row, instance_row
    images = _image_columns(inst_reader, inst["image_id"])
    categories = {int(k): str(v) for k, v in json.loads(meta[CATEGORIES_METADATA]).items()}
    _release_freed_memory()
    return images, objects, categories


def _numpy_columns(reader: _RowReader, columns: dict[str, tuple[Any, Any]]) -> dict[str, np.ndarray]:
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


def _image_columns(reader: _RowReader, image_id: np.ndarray) -> _ImageColumns:
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
    return _ImageColumns(ids, table["file_name"].combine_chunks(), table["width"].to_numpy(),
                         table["height"].to_numpy())


def _review_object(ann: dict[str, Any], images: dict[int, ImageInfo], geometry: dict) -> ReviewObject | None:
    """A json annotation -> ReviewObject; ``None`` for objects that cannot be reviewed
    (no RLE pseudo mask, no extreme points, unknown image)."""
    seg, points = ann.get("segmentation"), ann.get("extreme_points")
    info = images.get(int(ann.get("image_id", -1)))
    if not isinstance(seg, dict) or points is None or info is None or "id" not in ann:
        return None
    pts = np.asarray(points, dtype=np.float64).reshape(4, 2)
    ann_id = int(ann["id"])
    geo = geometry.get(ann_id)
    if geo is not None:
        box = geo.crop_box
    else:
        from exits.data.crops import crop_window

        box = tuple(crop_window(pts, info.width, info.height, margin=FALLBACK_MARGIN,
                                min_margin_px=FALLBACK_MIN_MARGIN_PX, size=1).as_list())
    score = ann.get("score")
    rle = {"size": list(seg["size"]), "counts": seg["counts"]}
    return ReviewObject(
        ann_id=ann_id, image_id=info.image_id, category_id=int(ann.get("category_id", 0)),
        score=None if score is None else float(score), parts=rle_parts(rle),
        extreme_points=tuple((float(x), float(y)) for x, y in pts), crop_box=tuple(int(v) for v in box), rle=rle,
    )
