"""Training-side records. By construction they carry no mask.

This is the leak boundary of extreme-point mode: everything the training code receives is
built from these types, which hold image metadata, extreme points and the box they span,
and nothing else from the annotation. GT masks are read only by ``exits.eval``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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

    def objects_by_image(self) -> dict[int, list[ObjectRecord]]:
        out: dict[int, list[ObjectRecord]] = {}
        for obj in self.objects:
            out.setdefault(obj.image_id, []).append(obj)
        return out


@dataclass(frozen=True)
class Rejection:
    """A record that was skipped, and why (file and ids so a person can find it)."""

    file: str
    reason: str
    message: str
    ann_id: int | None = None
    image_id: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.ann_id is not None:
            where += f" annotation {self.ann_id}"
        if self.image_id is not None:
            where += f" (image {self.image_id})"
        return f"{where}: [{self.reason}] {self.message}"
