"""Training-side records. By construction they carry no mask.

This is the leak boundary of extreme-point mode: everything the training code receives is
built from these types, which hold image metadata, extreme points and the box they span,
and nothing else from the annotation. GT masks are read only by ``exits.eval``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exits.data.ids import as_int_id


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CategoryRecord:
    id: int
    name: str


@dataclass(frozen=True)
class ObjectRecord:
    """One object as the training side sees it: extreme points, never a mask.

    ``extreme_points`` is a (4, 2) float array of [x, y] pixels, rows top, left, bottom,
    right. ``bbox`` is the COCO [x, y, w, h] box those points span. ``points_source`` says
    whether the points were annotated or derived from a mask by the labelling step.
    """

    ann_id: int
    image_id: int
    category_id: int
    extreme_points: np.ndarray
    bbox: tuple[float, float, float, float]
    points_source: str = "annotated"
    split: str = "train"

    def __post_init__(self) -> None:
        pts = np.asarray(self.extreme_points, dtype=np.float64).reshape(4, 2)
        pts.setflags(write=False)
        object.__setattr__(self, "extreme_points", pts)


@dataclass
class PointDataset:
    """Images, categories and objects of one annotation file, after validation."""

    source: str
    images: dict[int, ImageRecord]
    categories: dict[int, CategoryRecord]
    objects: list[ObjectRecord]
    image_dir: str
    rejections: list["Rejection"] = field(default_factory=list)
    n_annotations: int = 0  # annotation records in the file (kept + rejected)

    def objects_by_image(self) -> dict[int, list[ObjectRecord]]:
        out: dict[int, list[ObjectRecord]] = {}
        for obj in self.objects:
            out.setdefault(obj.image_id, []).append(obj)
        return out


_LISTS = {"annotation": "annotations", "image": "images", "category": "categories"}


@dataclass(frozen=True)
class Rejection:
    """A record that was skipped, and why (file and ids so a person can find it).

    ``record``: which list the rejected record is in (``"annotation"``, ``"image"``,
    ``"category"``); ``index``: its position in that list. ``image_id`` / ``category_id``
    are always integer ids (or None). ``ann_id`` is the annotation's integer id, except in a
    ``bad_id`` rejection of the annotation's own id: there it is the json value as found
    (``"1"``, ``true``, ``100.5``, ``2**70``; None when that value is not a short json
    scalar), so ``rejections.json`` names the record exactly; :attr:`has_int_ann_id` tells
    the two apart. An annotation's rejection never sets ``image_id`` without ``ann_id``
    (readers of ``rejections.json`` take ``ann_id`` None with an ``image_id`` as "the image
    was rejected"). Rejections built before ``record`` existed have it empty: :attr:`kind`
    infers it from the ids.
    """

    file: str
    reason: str
    message: str
    ann_id: Any = None  # int, or the raw json id of a bad_id rejection (see above)
    image_id: int | None = None
    category_id: int | None = None
    record: str = ""
    index: int | None = None

    @property
    def has_int_ann_id(self) -> bool:
        """True when ``ann_id`` is a valid integer annotation id (not a raw bad id)."""
        return self.ann_id is not None and as_int_id(self.ann_id) is not None and type(self.ann_id) is int

    @property
    def kind(self) -> str:
        """``"annotation"``, ``"image"``, ``"category"`` (or ``"record"`` when unknown)."""
        if self.record:
            return self.record
        if self.ann_id is not None:
            return "annotation"
        if self.image_id is not None:
            return "image"
        if self.category_id is not None:
            return "category"
        return "record"

    def __str__(self) -> str:
        where = self.file
        kind = self.kind
        if self.has_int_ann_id:
            where += f" annotation {self.ann_id}"
        elif self.ann_id is not None:
            where += (f" {_LISTS['annotation']}[{self.index}] (id {self.ann_id!r})" if self.index is not None
                      else f" annotation id {self.ann_id!r}")
        elif kind == "category" and self.category_id is not None:
            where += f" category {self.category_id}"
        elif self.index is not None and self.image_id is None and kind in _LISTS:
            where += f" {_LISTS[kind]}[{self.index}]"
        if self.image_id is not None:
            where += f" (image {self.image_id})"
        return f"{where}: [{self.reason}] {self.message}"
