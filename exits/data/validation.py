"""Checks on raw annotation records. Each check names the file and the record.

Bad records are rejected with a reason code and a message, never silently dropped; the
good ones go on. ``ValidationSummary`` counts rejections by reason for the run log.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from exits.data.extreme_points import BOTTOM, LEFT, POINT_NAMES, RIGHT, TOP
from exits.data.records import ImageRecord, Rejection


class DatasetError(ValueError):
    """The dataset as a whole is unusable (unreadable file, nothing valid left)."""


def parse_extreme_points(value: Any) -> np.ndarray:
    """``[[x, y] x 4]`` (or 8 flat numbers) -> (4, 2) float array; ValueError if malformed."""
    try:
        pts = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extreme_points is not a list of numbers: {value!r}") from exc
    if pts.size != 8:
        raise ValueError(f"extreme_points must be 4 [x, y] pairs, got shape {pts.shape}")
    pts = pts.reshape(4, 2)
    if not np.isfinite(pts).all():
        raise ValueError(f"extreme_points has non-finite values: {pts.tolist()}")
    return pts


def check_extreme_points(pts: np.ndarray, width: int, height: int, tol: float) -> tuple[str, str] | None:
    """Return (reason, message) if the points are unusable, else None.

    Points are pixel indices: 0 <= x <= W-1, 0 <= y <= H-1 (``tol`` pixels of slack for
    annotation tools that click on pixel edges). Top must have the smallest y, bottom the
    largest, left the smallest x, right the largest; the box they span must have a
    non-zero width and height.
    """
    xs, ys = pts[:, 0], pts[:, 1]
    if (xs < -tol).any() or (ys < -tol).any() or (xs > width - 1 + tol).any() or (ys > height - 1 + tol).any():
        bad = [POINT_NAMES[i] for i in range(4)
               if not (-tol <= xs[i] <= width - 1 + tol and -tol <= ys[i] <= height - 1 + tol)]
        return "point_outside_image", f"{', '.join(bad)} point(s) outside the {width}x{height} image: {pts.tolist()}"
    if pts[RIGHT, 0] - pts[LEFT, 0] <= 0 or pts[BOTTOM, 1] - pts[TOP, 1] <= 0:
        return "degenerate_box", (
            f"box has zero width or height (left x={pts[LEFT, 0]:g}, right x={pts[RIGHT, 0]:g}, "
            f"top y={pts[TOP, 1]:g}, bottom y={pts[BOTTOM, 1]:g})"
        )
    problems = []
    if ys[TOP] > ys.min() + tol:
        problems.append(f"top y={ys[TOP]:g} is below another point (min y={ys.min():g})")
    if ys[BOTTOM] < ys.max() - tol:
        problems.append(f"bottom y={ys[BOTTOM]:g} is above another point (max y={ys.max():g})")
    if xs[LEFT] > xs.min() + tol:
        problems.append(f"left x={xs[LEFT]:g} is right of another point (min x={xs.min():g})")
    if xs[RIGHT] < xs.max() - tol:
        problems.append(f"right x={xs[RIGHT]:g} is left of another point (max x={xs.max():g})")
    if problems:
        return "not_extreme", "points are not the extremes of their box: " + "; ".join(problems)
    return None


def check_image_file(image_dir: Path, image: ImageRecord, open_file: bool) -> tuple[str, str] | None:
    """Missing file, unreadable/corrupt file, or size different from the json's."""
    path = image_dir / image.file_name
    if not path.is_file():
        return "missing_image", f"image file not found: {path}"
    if not open_file:
        return None
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # decodes the stream structure: catches truncated/corrupt files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return "corrupt_image", f"cannot read image {path}: {exc}"
    if size != (image.width, image.height):
        return "image_size_mismatch", (
            f"{path} is {size[0]}x{size[1]} but the json says {image.width}x{image.height}"
        )
    return None


def find_duplicates(ids: Iterable[Any]) -> set[Any]:
    counts = Counter(ids)
    return {i for i, c in counts.items() if c > 1}


@dataclass(frozen=True)
class ValidationSummary:
    total: int
    kept: int
    rejected_by_reason: dict[str, int]

    @classmethod
    def of(cls, total: int, kept: int, rejections: list[Rejection]) -> "ValidationSummary":
        by_reason = Counter(r.reason for r in rejections if r.ann_id is not None)
        return cls(total=total, kept=kept, rejected_by_reason=dict(sorted(by_reason.items())))

    def __str__(self) -> str:
        if not self.rejected_by_reason:
            return f"{self.kept}/{self.total} annotations kept"
        reasons = ", ".join(f"{k}: {v}" for k, v in self.rejected_by_reason.items())
        return f"{self.kept}/{self.total} annotations kept; rejected {self.total - self.kept} ({reasons})"
