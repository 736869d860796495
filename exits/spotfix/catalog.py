"""The objects a spot-fix session reviews: a run folder's pseudo labels, read once.

Sources: ``pseudo_labels.json`` (masks, scores, extreme points, images, categories),
``instances.parquet`` (each object's stage-1 crop window, when present) and ``run.json``
(the image folder). "Separated" is counted on the *pseudo* mask (>= 2 visible parts,
exits.eval.separated rule): the json's own ``num_parts`` may come from the input
annotations, i.e. from GT masks, which are for evaluation only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from exits.data.crops import crop_window
from exits.report.run_files import read_object_geometry
from exits.run_folder import RunFolder
from exits.spotfix.masks import decode_rle, rle_parts

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


class RunCatalog:
    """Objects, images and categories of one run folder, plus safe image access."""

    def __init__(self, workdir: Path, image_root: Path, images: dict[int, ImageInfo],
                 objects: dict[int, ReviewObject], categories: dict[int, str]) -> None:
        self.workdir = workdir
        self.image_root = image_root.resolve()
        self.images = images
        self.objects = objects
        self.categories = categories
        self._order = sorted(objects.values(), key=lambda o: o.sort_key)

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

    def queue(self, flt: QueueFilter = QueueFilter()) -> list[ReviewObject]:
        """Objects passing ``flt``, worst pseudo-mask score first (ties by id)."""
        return [o for o in self._order if flt.accepts(o)]

    def image_path(self, image_id: int) -> Path:
        """The image file, guaranteed inside the image folder.

        Raises:
            KeyError: unknown image id.
            PermissionError: the file name resolves outside the image folder (``..``,
                absolute paths, symlinks out of it).
            FileNotFoundError: the file is missing.
        """
        info = self.images[image_id]
        path = (self.image_root / info.file_name).resolve()
        if not path.is_relative_to(self.image_root):
            raise PermissionError(f"image {image_id} resolves outside the image folder")
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id} file is missing")
        return path

    def load_image(self, image_id: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB, as stage 1 read it (PIL, convert("RGB"))."""
        with Image.open(self.image_path(image_id)) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)

    def pseudo_mask(self, ann_id: int) -> np.ndarray:
        obj = self.objects[ann_id]
        info = self.images[obj.image_id]
        return decode_rle(obj.rle, info.height, info.width)


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
