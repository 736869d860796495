"""The spot-fix catalog of one run folder: its objects, images and categories, read once.

:meth:`RunCatalog.load` reads the run: from the Parquet columns when the run's files have
them (:mod:`exits.spotfix.catalog_columns`: ``pseudo_labels.parquet`` + ``instances.parquet``,
objects read per object), else from ``pseudo_labels.json`` (older runs,
:func:`exits.spotfix.review_object.review_object_from_json`); ``run.json`` names the image
folder. The catalog then answers the review queue (worst pseudo-mask score first, through
:class:`exits.spotfix.queue._QueueIndex`), objects by id and safe image access.
"Separated" is counted on the *pseudo* mask (>= 2 visible parts, exits.eval.separated
rule): the json's own ``num_parts`` may come from the input annotations, i.e. from GT
masks, which are for evaluation only.
"""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from exits.data.images import image_file, read_rgb
from exits.run_folder import RunFolder
from exits.spotfix.catalog_columns import (LISTED_ROWS, OBJECT_CACHE, READ_BATCH_ROWS, ObjectColumns, RowReader,
                                           columns_from_parquet)
from exits.spotfix.masks import decode_rle
from exits.spotfix.queue import QueueFilter, QueueItem, QueuePage, _QueueIndex
from exits.spotfix.review_object import (FALLBACK_MARGIN, FALLBACK_MIN_MARGIN_PX, ImageInfo, ReviewObject,
                                         review_object_from_json)

__all__ = ["FALLBACK_MARGIN", "FALLBACK_MIN_MARGIN_PX", "LISTED_ROWS", "OBJECT_CACHE", "READ_BATCH_ROWS",
           "CatalogError", "ImageInfo", "QueueFilter", "QueueItem", "QueuePage", "ReviewObject", "RunCatalog"]

# The names these had when they lived here: tests patch ``catalog._RowReader.read`` and
# ``catalog._columns_from_parquet`` (the one :meth:`RunCatalog.load` calls).
_RowReader = RowReader
_columns_from_parquet = columns_from_parquet


class CatalogError(ValueError):
    """The run folder cannot be reviewed (missing files, bad image folder)."""


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



class RunCatalog:
    """Objects, images and categories of one run folder, plus safe image access."""

    def __init__(self, workdir: Path, image_root: Path, images: Mapping[int, ImageInfo],
                 objects: Mapping[int, ReviewObject], categories: dict[int, str]) -> None:
        self.workdir = workdir
        self.image_root = image_root.resolve()
        self.images = images
        self.objects = objects
        self.categories = categories
        self._columns = objects if isinstance(objects, ObjectColumns) else None
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
            obj = review_object_from_json(ann, images, geometry)
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
