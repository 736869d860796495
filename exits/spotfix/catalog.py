"""The objects a spot-fix session reviews: a run folder's pseudo labels, read once.

Sources: ``pseudo_labels.json`` (masks, scores, extreme points, images, categories),
``instances.parquet`` (each object's stage-1 crop window, when present) and ``run.json``
(the image folder). "Separated" is counted on the *pseudo* mask (>= 2 visible parts,
exits.eval.separated rule): the json's own ``num_parts`` may come from the input
annotations, i.e. from GT masks, which are for evaluation only.
"""
from __future__ import annotations

import errno
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from exits.data.crops import crop_window
from exits.data.images import image_file, read_rgb
from exits.report.run_files import read_object_geometry
from exits.run_folder import RunFolder
from exits.spotfix.masks import decode_rle, rle_parts

if TYPE_CHECKING:
    import pyarrow as pa

# Crop margins of the demo/paper configs, used only when instances.parquet is absent.
FALLBACK_MARGIN, FALLBACK_MIN_MARGIN_PX = 0.15, 4


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
        if self.min_score is not None and (obj.score is None or obj.score < self.min_score):
            return False
        if self.max_score is not None and (obj.score is None or obj.score > self.max_score):
            return False
        return True


class _ObjectColumns(Mapping[int, ReviewObject]):
    """The review objects of a run as columns (numpy arrays + one list of RLE strings), read
    from ``pseudo_labels.parquet`` and ``instances.parquet``; a :class:`ReviewObject` is made
    only when asked for. About 0.2 KB per object instead of a Python object graph per object
    and no RLE decoded (parts come from the shard's ``num_parts``)."""

    def __init__(self, pseudo: "pa.Table", instances: "pa.Table"):
        import pyarrow as pa
        import pyarrow.compute as pc

        pos = pc.index_in(pseudo["ann_id"], value_set=instances["ann_id"])
        keep = pc.is_valid(pos)  # objects without an instances row cannot be reviewed
        pseudo = pseudo.filter(keep)
        rows = pc.drop_null(pos).to_numpy()
        self.ann_id = pseudo["ann_id"].to_numpy()
        self.image_id = pseudo["image_id"].to_numpy()
        self.category_id = pseudo["category_id"].to_numpy()
        score = pc.fill_null(pseudo["score"].cast(pa.float64()), float("nan")).to_numpy()
        self.score = np.round(score, 5)  # as pseudo_labels.json stores it
        self.parts = pc.fill_null(pseudo["num_parts"], -1).to_numpy()
        self.height = pseudo["height"].to_numpy()
        self.width = pseudo["width"].to_numpy()
        self.counts = pseudo["rle_counts"].to_pylist()
        self.points = np.asarray(instances["extreme_points"].combine_chunks().flatten().to_numpy()).reshape(-1, 4, 2)[rows]
        self.crop = np.asarray(instances["crop_box"].combine_chunks().flatten().to_numpy()).reshape(-1, 4)[rows]
        self.row_of = {int(a): i for i, a in enumerate(self.ann_id)}
        missing = self.parts < 0
        if missing.any():  # shards written before num_parts was stored
            for i in np.flatnonzero(missing):
                self.parts[i] = rle_parts(self.rle(int(i)))
        key = np.where(np.isnan(self.score), -np.inf, self.score)
        self.order = np.lexsort((self.ann_id, key))  # worst first, ties by id

    def rle(self, i: int) -> dict[str, Any]:
        return {"size": [int(self.height[i]), int(self.width[i])], "counts": self.counts[i]}

    def object(self, i: int) -> ReviewObject:
        score = float(self.score[i])
        return ReviewObject(
            ann_id=int(self.ann_id[i]), image_id=int(self.image_id[i]), category_id=int(self.category_id[i]),
            score=None if math.isnan(score) else score, parts=int(self.parts[i]),
            extreme_points=tuple((float(x), float(y)) for x, y in self.points[i]),
            crop_box=tuple(int(v) for v in self.crop[i]), rle=self.rle(i))

    def __getitem__(self, ann_id: int) -> ReviewObject:
        return self.object(self.row_of[ann_id])

    def __contains__(self, ann_id: object) -> bool:
        return ann_id in self.row_of

    def __iter__(self) -> Iterator[int]:
        return iter(self.row_of)

    def __len__(self) -> int:
        return len(self.row_of)

    def select(self, flt: "QueueFilter") -> np.ndarray:
        """Rows passing ``flt``, in queue order (vectorised :meth:`QueueFilter.accepts`)."""
        ok = np.ones(len(self.ann_id), bool)
        if flt.category_id is not None:
            ok &= self.category_id == flt.category_id
        if flt.separated is not None:
            ok &= (self.parts >= 2) == flt.separated
        with np.errstate(invalid="ignore"):
            if flt.min_score is not None:
                ok &= self.score >= flt.min_score  # NaN (no score) fails, as in accepts()
            if flt.max_score is not None:
                ok &= self.score <= flt.max_score
        return self.order[ok[self.order]]


class _ObjectSequence(Sequence[ReviewObject]):
    """A queue over :class:`_ObjectColumns` rows: objects are made as they are read."""

    def __init__(self, columns: _ObjectColumns, rows: np.ndarray):
        self.columns, self.rows = columns, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self.columns.object(int(i)) for i in self.rows[k]]
        return self.columns.object(int(self.rows[k]))

    def __iter__(self) -> Iterator[ReviewObject]:
        for i in self.rows:
            yield self.columns.object(int(i))


class RunCatalog:
    """Objects, images and categories of one run folder, plus safe image access."""

    def __init__(self, workdir: Path, image_root: Path, images: dict[int, ImageInfo],
                 objects: Mapping[int, ReviewObject], categories: dict[int, str]) -> None:
        self.workdir = workdir
        self.image_root = image_root.resolve()
        self.images = images
        self.objects = objects
        self.categories = categories
        self._columns = objects if isinstance(objects, _ObjectColumns) else None
        self._order = None if self._columns is not None else sorted(objects.values(), key=lambda o: o.sort_key)

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
        """Objects passing ``flt``, worst pseudo-mask score first (ties by id); from Parquet
        columns a lazy sequence (objects made as read), else a list."""
        if self._columns is not None:
            return _ObjectSequence(self._columns, self._columns.select(flt))
        return [o for o in self._order if flt.accepts(o)]

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


def _columns_from_parquet(run: RunFolder) -> tuple[dict[int, ImageInfo], _ObjectColumns, dict[int, str]] | None:
    """(images, objects, categories) from ``pseudo_labels.parquet`` + ``instances.parquet``
    columns; None when the run's files predate what this needs (then the json is read):
    the parquet lacks ``num_parts`` or the categories metadata, is older than the json, or
    there is no instances table."""
    import pyarrow as pa
    import pyarrow.compute as pc
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
    pseudo = pq.read_table(pseudo_path, columns=["ann_id", "image_id", "category_id", "score", "num_parts", "height",
                                                 "width", "rle_counts"])
    inst = pq.read_table(inst_path, columns=["ann_id", "image_id", "file_name", "width", "height", "extreme_points",
                                             "crop_box"])
    objects = _ObjectColumns(pseudo, inst)
    first = pc.index_in(pa.array(np.unique(inst["image_id"].to_numpy())), value_set=inst["image_id"]).to_numpy()
    im = inst.select(["image_id", "file_name", "width", "height"]).take(pa.array(first)).to_pydict()
    images = {int(i): ImageInfo(int(i), str(f), int(w), int(h))
              for i, f, w, h in zip(im["image_id"], im["file_name"], im["width"], im["height"])}
    categories = {int(k): str(v) for k, v in json.loads(meta[CATEGORIES_METADATA]).items()}
    return images, objects, categories


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
        box = tuple(crop_window(pts, info.width, info.height, margin=FALLBACK_MARGIN,
                                min_margin_px=FALLBACK_MIN_MARGIN_PX, size=1).as_list())
    score = ann.get("score")
    rle = {"size": list(seg["size"]), "counts": seg["counts"]}
    return ReviewObject(
        ann_id=ann_id, image_id=info.image_id, category_id=int(ann.get("category_id", 0)),
        score=None if score is None else float(score), parts=rle_parts(rle),
        extreme_points=tuple((float(x), float(y)) for x, y in pts), crop_box=tuple(int(v) for v in box), rle=rle,
    )
