"""Checks on raw annotation records. Each check names the file and the record.

Bad records are rejected with a reason code and a message, never silently dropped; the
good ones go on. ``ValidationSummary`` counts rejections by reason for the run log.
"""
from __future__ import annotations

import math
import os
import reprlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from exits.data.extreme_points import BOTTOM, LEFT, POINT_NAMES, RIGHT, TOP
from exits.data.ids import INT64_MAX, INT64_MIN, as_int_id
from exits.data.images import ImagePathError, ImageReadError, decode_check, image_file
from exits.data.records import CategoryRecord, ImageRecord, Rejection

#: Every reason code a rejected record can have, with what it means (the README lists them).
REJECTION_REASONS: dict[str, str] = {
    # the record itself
    "bad_id": "an id (annotation/image/category id, or an annotation's image_id/category_id) is not an "
              "integer: a string, a bool, a float with a fraction, outside int64; 5.0 counts as 5 (an "
              "annotation's own bad id is listed as found in ann_id)",
    "duplicate_id": "the same id is used by more than one annotation / image / category (all of them are rejected)",
    "bad_annotation": "an annotation that is not an object, or lacks 'id' / 'image_id' / 'category_id', "
                      "or has an iscrowd that is not 0/1",
    "bad_image_record": "an image record that is not an object, lacks 'id', has a width/height that is not a "
                        "positive integer or a file_name that is not a non-empty string (its annotations: "
                        "unknown_image)",
    "bad_category_record": "a category that is not an object, lacks 'id', or whose name is not a string",
    # what an annotation refers to
    "unknown_image": "the annotation's image_id is not in the images list, or that image's record was rejected "
                     "(malformed, or its id listed more than once)",
    "unknown_category": "the annotation's category_id is not in the categories list (or is there more than "
                        "once, or that category was rejected)",
    # image files (annotations on a rejected image get the image's reason)
    "outside_image_dir": "the image's file_name leads outside the image folder ('..', an absolute path, a "
                         "symlink to elsewhere)",
    "missing_image": "the image file does not exist",
    "corrupt_image": "the image file cannot be decoded (truncated, not an image, unreadable)",
    "unsupported_image": "the image decodes to a pixel format with no 8-bit meaning (32-bit float, mode F)",
    "image_size_mismatch": "the image file's size differs from the json's width x height",
    # the points
    "crowd": "iscrowd=1: a crowd region has no extreme points of one object",
    "bad_extreme_points": "extreme_points is not 4 [x, y] pairs (or 8 numbers) of finite json numbers",
    "no_points": "no extreme_points and no segmentation to derive them from (or it cannot be decoded, or "
                 "its RLE size differs from the image's)",
    "point_outside_image": "a point lies outside the image (beyond the tolerance)",
    "degenerate_box": "the points span a box of zero width or height",
    "not_extreme": "the points are not the top/left/bottom/right extremes of their box",
}

MAX_IMAGE_SIDE = 2 ** 31 - 1

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlong = 40
_repr.maxlevel = 3
_repr.maxlist = _repr.maxtuple = 8
_repr.maxdict = 4


def short_repr(value: Any) -> str:
    """A short, one-line repr of a json value for messages (deep or long values are cut)."""
    try:
        return _repr.repr(value).replace("\n", " ")
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"


class DatasetError(ValueError):
    """The dataset as a whole is unusable (unreadable file, nothing valid left)."""


class RecordError(ValueError):
    """One record is unusable: ``reason`` (a key of :data:`REJECTION_REASONS`) and ``message``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def id_problem(value: Any) -> str | None:
    """Why ``value`` is not an integer id (None when it is one: :func:`exits.data.ids.as_int_id`)."""
    if as_int_id(value) is not None:
        return None
    if value is None:
        return "is null"
    if isinstance(value, bool):
        return "is a bool"
    if isinstance(value, str):
        return "is a string"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "is not a finite number"
        if not value.is_integer():
            return "is a number with a fraction"
        return f"is outside the int64 range [{INT64_MIN}, {INT64_MAX}]"
    if isinstance(value, int):
        return f"is outside the int64 range [{INT64_MIN}, {INT64_MAX}]"
    return f"is a {'list' if isinstance(value, list) else 'json object' if isinstance(value, dict) else type(value).__name__}"


def require_id(value: Any, what: str) -> int:
    """``value`` as an int id, or RecordError ``bad_id`` naming ``what`` and why."""
    problem = id_problem(value)
    if problem:
        raise RecordError("bad_id", f"{what} {short_repr(value)} {problem}, not an integer id")
    return as_int_id(value)


def _dimension(img: dict, key: str, image_id: int) -> int:
    if key not in img:
        raise RecordError("bad_image_record", f"image {image_id} has no '{key}'")
    value = img[key]
    size = None if isinstance(value, bool) else as_int_id(value)
    if size is None or not 0 < size <= MAX_IMAGE_SIDE:
        raise RecordError("bad_image_record", f"image {image_id}: '{key}' is {short_repr(value)}; it must be a "
                                              f"positive integer (pixels, at most {MAX_IMAGE_SIDE})")
    return size


def parse_image_record(img: Any, fmt: str = "coco") -> ImageRecord:
    """An ``images`` entry as an :class:`ImageRecord`: integer id, positive integer width and
    height (256.0 is 256), a non-empty string file_name (LVIS: the last part of ``coco_url``
    when there is no file_name). Raises :class:`RecordError` (``bad_id`` / ``bad_image_record``)."""
    if not isinstance(img, dict):
        raise RecordError("bad_image_record", f"image record {short_repr(img)} is not an object")
    if "id" not in img:
        raise RecordError("bad_image_record", f"image record {short_repr(img)} has no 'id'")
    image_id = require_id(img["id"], "image id")
    width = _dimension(img, "width", image_id)
    height = _dimension(img, "height", image_id)
    name = img.get("file_name")
    if (name is None or name == "") and fmt == "lvis":
        url = img.get("coco_url")
        if isinstance(url, str) and url.rsplit("/", 1)[-1]:
            name = url.rsplit("/", 1)[-1]
        elif url is not None:
            raise RecordError("bad_image_record", f"image {image_id}: coco_url {short_repr(url)} names no file")
    if not isinstance(name, str) or not name or "\x00" in name:
        raise RecordError("bad_image_record", f"image {image_id}: file_name {short_repr(name)} is not a non-empty "
                                              "string naming a file in the image folder")
    return ImageRecord(image_id=image_id, file_name=name, width=width, height=height)


def parse_category_record(cat: Any) -> CategoryRecord:
    """A ``categories`` entry as a :class:`CategoryRecord` (integer id, string name; no name:
    the id). Raises :class:`RecordError` (``bad_id`` / ``bad_category_record``)."""
    if not isinstance(cat, dict):
        raise RecordError("bad_category_record", f"category {short_repr(cat)} is not an object")
    if "id" not in cat:
        raise RecordError("bad_category_record", f"category {short_repr(cat)} has no 'id'")
    cat_id = require_id(cat["id"], "category id")
    name = cat.get("name")
    if name is None:
        name = str(cat_id)
    elif not isinstance(name, str):
        raise RecordError("bad_category_record", f"category {cat_id}: name {short_repr(name)} is not a string")
    return CategoryRecord(cat_id, name)


def parse_extreme_points(value: Any) -> np.ndarray:
    """``[[x, y] x 4]`` (or 8 flat numbers) -> (4, 2) float array; ValueError if malformed.

    Coordinates must be json numbers (not strings, not bools), finite, and fit a float.
    """
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"extreme_points must be a list of 4 [x, y] pairs, got {short_repr(value)}")
    if len(value) == 4 and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        flat = [v for p in value for v in p]
    elif len(value) == 8:
        flat = list(value)
    else:
        raise ValueError(f"extreme_points must be 4 [x, y] pairs (or 8 numbers), got {short_repr(value)}")
    coords = []
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"extreme_points must hold numbers, got {short_repr(v)} in {short_repr(value)}")
        try:
            coords.append(float(v))
        except OverflowError:
            raise ValueError(f"extreme_points value {short_repr(v)} is too large for a float") from None
    pts = np.asarray(coords, dtype=np.float64).reshape(4, 2)
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
    """(reason, message) for an image file that cannot be used, else None.

    The file must lie inside ``image_dir`` (``outside_image_dir``, always checked) and exist
    (``missing_image``). With ``open_file`` the whole file is decoded
    (:func:`exits.data.images.decode_check`: truncated data that ``verify`` lets through is
    ``corrupt_image``; a 32-bit float image is ``unsupported_image``) and its size compared
    with the json's (``image_size_mismatch``).
    """
    try:
        path = image_file(image_dir, image.file_name)
    except ImagePathError as exc:
        return exc.reason, str(exc)
    except ValueError as exc:  # e.g. a name no path can have
        return "bad_image_record", f"file_name {image.file_name!r} is not a usable path: {exc}"
    try:
        exists = path.is_file()
    except OSError as exc:  # a name too long, a permission denied on a folder...
        return "missing_image", f"image file {path} cannot be looked up: {exc}"
    if not exists:
        return "missing_image", f"image file not found: {path}"
    if not open_file:
        return None
    try:
        size = decode_check(path)
    except ImageReadError as exc:
        return exc.reason, str(exc)
    if tuple(size) != (image.width, image.height):
        return "image_size_mismatch", (
            f"{path} is {size[0]}x{size[1]} but the json says {image.width}x{image.height}"
        )
    return None


def image_check_workers() -> int:
    """Threads that check image files: PIL releases the GIL while decoding, and on network
    storage the reads overlap."""
    return max(2, min(8, os.cpu_count() or 1))


def check_image_files(image_dir: Path, images: Sequence[ImageRecord], open_files: bool,
                      wrap: Callable[[Iterable], Iterable] = lambda it: it) -> list[tuple[str, str] | None]:
    """:func:`check_image_file` for each image, on a thread pool; results in ``images``' order
    (deterministic, whatever order the threads finish in). ``wrap``: e.g. a progress bar over
    the results as they come."""

    def check(image: ImageRecord) -> tuple[str, str] | None:
        try:
            return check_image_file(image_dir, image, open_files)
        except Exception as exc:  # noqa: BLE001 - one odd file must not end the whole run
            return "corrupt_image", f"cannot check image {image.file_name!r}: {type(exc).__name__}: {exc}"

    if len(images) <= 1:
        return [check(im) for im in wrap(images)]
    with ThreadPoolExecutor(max_workers=image_check_workers(), thread_name_prefix="image-check") as pool:
        return list(wrap(pool.map(check, images)))


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
        """Counts of the rejected *annotations* by reason (image and category records are
        listed in the rejections, not counted here)."""
        by_reason = Counter(r.reason for r in rejections if r.kind == "annotation")
        return cls(total=total, kept=kept, rejected_by_reason=dict(sorted(by_reason.items())))

    def __str__(self) -> str:
        if not self.rejected_by_reason:
            return f"{self.kept}/{self.total} annotations kept"
        reasons = ", ".join(f"{k}: {v}" for k, v in self.rejected_by_reason.items())
        return f"{self.kept}/{self.total} annotations kept; rejected {self.total - self.kept} ({reasons})"
