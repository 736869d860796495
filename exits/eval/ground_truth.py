"""Ground-truth instance masks for evaluation — the leak boundary of the project.

LEAK BOUNDARY: this module (and the rest of ``exits.eval``) is the ONLY place in the
project that reads ground-truth masks. Training and pseudo-labelling code (``exits.data``
and everything downstream of it) sees extreme points and boxes only, never a GT
``segmentation``. GT masks are loaded here, for scoring pseudo masks, either from the same
COCO/LVIS json the points came from or from a separate ``--gt`` file; nothing loaded here
may be fed back into training. Keep it that way: do not import this module from
``exits.data``, the models, the losses or the training loops.

Reads COCO instances json and LVIS json (same annotation layout; LVIS has no ``iscrowd``).
A ``segmentation`` may be polygons, uncompressed RLE or compressed RLE; all are turned into
compressed RLE with ``bytes`` counts (see :mod:`exits.eval.rle`) as ``COCO.annToRLE`` does.
Annotations without a segmentation (missing, ``null``, empty list, or only degenerate
polygons with < 3 points) are skipped.

Two ways in: :func:`read_gt_json` + :func:`gt_instances_from_coco` load the whole json (the
in-memory report, small files); :class:`GtJsonStream` (and :func:`load_gt_masks`) stream it
one annotation at a time with the same per-annotation rules (:func:`gt_instance`), so a
COCO/LVIS-sized GT file never sits in memory (the streaming report).
"""
from __future__ import annotations

import json
import numbers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from exits.data.ids import as_int_id
from exits.eval.rle import Rle, rle_area, segmentation_to_rle
from exits.io.json_stream import JsonFileError, JsonStreamError, iter_top_level, open_json_text


@dataclass(frozen=True)
class GtInstance:
    """One ground-truth object.

    ``rle`` is compressed RLE ``{"size": [height, width], "counts": bytes}``. ``area`` is the
    json's ``area`` field (the value COCOeval buckets sizes by), or the mask's pixel count
    when the json has none. ``iscrowd`` is ``False`` for LVIS.
    """

    ann_id: int
    image_id: int
    category_id: int
    rle: Rle
    area: float
    height: int
    width: int
    iscrowd: bool


class GtFormatError(ValueError):
    """A ground-truth json that cannot be read as COCO/LVIS instances."""


def read_gt_json(json_path: str | os.PathLike) -> dict[str, Any]:
    """Load a COCO/LVIS json into a dict (call once, then use the ``*_from_coco`` helpers).

    The file is opened as the annotation reader opens its input
    (:func:`exits.io.json_stream.open_json_text`: gzip, UTF-8 with or without BOM, UTF-16/32).
    Raises ``FileNotFoundError`` for a missing file and a one-line :class:`GtFormatError`
    naming the file for everything else that makes it unreadable.
    """
    path = Path(json_path)
    try:
        with open_json_text(path) as fh:
            data = json.load(fh)
    except JsonFileError as exc:
        raise GtFormatError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise GtFormatError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise GtFormatError(f"{path}: a value is nested too deeply to decode (more than about "
                            f"{sys.getrecursionlimit()} levels of lists/objects)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise GtFormatError(f"{path}: a value cannot be decoded ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise GtFormatError(f"{path}: expected a COCO/LVIS json object with an 'annotations' list")
    return data


def _as_int(value: Any, what: str, source: str, ann_id: Any) -> int:
    # The reader's id rule (exits.data.ids): "1", True and 1.5 are not ids; 5.0 is 5.
    out = as_int_id(value)
    if out is None:
        raise GtFormatError(f"{source}: annotation {ann_id}: '{what}' must be an integer, got {value!r:.60}")
    return out


def _image_sizes(images: Iterable[dict[str, Any]], source: str) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}
    for img in images:
        image_id = as_int_id(img.get("id")) if isinstance(img, dict) else None
        try:
            if image_id is None:
                raise ValueError("no integer id")
            sizes[image_id] = (int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise GtFormatError(f"{source}: image entry {img!r:.120} lacks an integer id/height/width") from exc
    return sizes


def gt_instances_from_coco(
    data: dict[str, Any],
    source: str = "<in-memory json>",
    ann_ids: set[int] | None = None,
) -> dict[int, GtInstance]:
    """GT instances from an already loaded COCO/LVIS dict.

    Args:
        data: the json object (``images`` and ``annotations``).
        source: name used in error messages (the file path).
        ann_ids: keep only these annotation ids (others are not even decoded); ids that are
            not in the json, or have no segmentation, are simply absent from the result.
    Returns:
        ``{ann_id: GtInstance}``.
    Raises:
        GtFormatError: naming ``source`` and the annotation id, for a malformed
            segmentation, an RLE whose size differs from its image, a polygon whose image
            is not listed, or a duplicated annotation id.
    """
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise GtFormatError(f"{source}: expected an 'annotations' list")
    sizes = _image_sizes(data.get("images") or [], source)
    out: dict[int, GtInstance] = {}
    for ann in anns:
        ann_id = annotation_id(ann, source)
        if ann_ids is not None and ann_id not in ann_ids:
            continue
        if ann_id in out:
            raise duplicate_id_error(source, ann_id)
        inst = gt_instance(ann, ann_id, sizes, source)
        if inst is not None:
            out[ann_id] = inst
    return out


def annotation_id(ann: Any, source: str) -> int:
    """The strict integer id of a json annotation (:class:`GtFormatError` when it has none)."""
    raw_id = ann.get("id") if isinstance(ann, dict) else None
    return _as_int(raw_id, "id", source, raw_id)


def duplicate_id_error(source: str, ann_id: int) -> GtFormatError:
    return GtFormatError(f"{source}: annotation id {ann_id} appears more than once")


def gt_instance(ann: dict[str, Any], ann_id: int, sizes: dict[int, tuple[int, int]], source: str) -> GtInstance | None:
    """One json annotation (id ``ann_id``) as a :class:`GtInstance`; ``None`` when it has no
    segmentation. ``sizes``: ``{image_id: (height, width)}`` of the json's images.

    Raises:
        GtFormatError: a non-integer image/category id, a malformed segmentation, an RLE
            whose size differs from its image, a polygon whose image is not listed.
    """
    image_id = _as_int(ann.get("image_id"), "image_id", source, ann_id)
    category_id = _as_int(ann.get("category_id"), "category_id", source, ann_id)
    height, width = sizes.get(image_id, (None, None))
    try:
        rle = segmentation_to_rle(ann.get("segmentation"), height, width)
    except (ValueError, TypeError, KeyError) as exc:
        raise GtFormatError(f"{source}: annotation {ann_id} (image {image_id}): malformed segmentation: {exc}") from exc
    if rle is None:
        return None
    h, w = int(rle["size"][0]), int(rle["size"][1])
    area_field = ann.get("area")
    if isinstance(area_field, numbers.Real) and not isinstance(area_field, bool):
        area = float(area_field)
    else:
        area = float(rle_area(rle))
    return GtInstance(
        ann_id=ann_id,
        image_id=image_id,
        category_id=category_id,
        rle=rle,
        area=area,
        height=h,
        width=w,
        iscrowd=bool(ann.get("iscrowd", 0)),
    )


def category_names_from_coco(data: dict[str, Any]) -> dict[int, str]:
    """``{category_id: name}`` from a COCO/LVIS json's ``categories``."""
    out: dict[int, str] = {}
    for c in data.get("categories") or []:
        cat_id = as_int_id(c.get("id")) if isinstance(c, dict) else None
        if cat_id is not None:  # a malformed category names nothing (its objects show their id)
            out[cat_id] = str(c.get("name", cat_id))
    return out


def load_gt_masks(json_path: str | os.PathLike, ann_ids: set[int] | None = None) -> dict[int, GtInstance]:
    """GT instance masks from a COCO or LVIS json file.

    See :func:`gt_instances_from_coco` for ``ann_ids`` and errors. The file is streamed
    (:class:`GtJsonStream`): memory holds the wanted instances, not the json. To get
    category names too, iterate a :class:`GtJsonStream` yourself.
    """
    stream = GtJsonStream(json_path)
    out: dict[int, GtInstance] = {}
    for ann in stream.annotations():
        ann_id = annotation_id(ann, stream.source)
        if ann_ids is not None and ann_id not in ann_ids:
            continue
        if ann_id in out:
            raise duplicate_id_error(stream.source, ann_id)
        inst = gt_instance(ann, ann_id, stream.sizes, stream.source)
        if inst is not None:
            out[ann_id] = inst
    return out


_NOT_INSTANCES = "expected a COCO/LVIS json object with an 'annotations' list"


class GtJsonStream:
    """A COCO/LVIS GT json read key by key (:mod:`exits.io.json_stream`): ``images`` and
    ``categories`` whole, ``annotations`` one at a time, so memory never holds the json.

    ``annotations()`` yields each annotation as :func:`json.load` gives it; ``sizes``
    (``{image_id: (height, width)}``, what polygons need) is set before the first one, and
    ``category_names`` once the file has been read to its end. When ``annotations`` comes
    before ``images`` in the file, the file is read twice (the first time for the images,
    skipping the annotations). Errors are :func:`read_gt_json`'s: ``FileNotFoundError`` for
    a missing file, one-line :class:`GtFormatError` naming the file for everything else.
    """

    def __init__(self, json_path: str | os.PathLike):
        self.path = Path(json_path)
        self.source = str(json_path)
        self.sizes: dict[int, tuple[int, int]] | None = None
        self.category_names: dict[int, str] = {}

    def _error(self, exc: Exception) -> GtFormatError:
        if isinstance(exc, JsonFileError):
            return GtFormatError(str(exc))
        if isinstance(exc, JsonStreamError):
            if exc.top_level or "'annotations' is not a list" in exc.detail:
                return GtFormatError(f"{self.path}: {_NOT_INSTANCES}")
            if not exc.invalid:
                return GtFormatError(f"{self.path}: {exc.detail}")
            return GtFormatError(f"{self.path}: not valid JSON ({exc.detail})")
        return GtFormatError(f"{self.path}: {exc}")

    def _top_level(self) -> Iterator[tuple[str, Any]]:
        with open_json_text(self.path) as fh:
            yield from iter_top_level(fh, stream="annotations", source=self.source)

    def annotations(self) -> Iterator[Any]:
        """Each annotation of the file, in file order (see the class docstring)."""
        try:
            yield from self._annotations()
        except (JsonFileError, JsonStreamError) as exc:
            raise self._error(exc) from None

    def _annotations(self) -> Iterator[Any]:
        saw_annotations = deferred = False
        for key, value in self._top_level():
            if key == "images":
                self.sizes = _image_sizes(value or [], self.source)
            elif key == "categories":
                self.category_names = category_names_from_coco({"categories": value})
            elif key == "annotations":
                saw_annotations = True
                if self.sizes is None:
                    deferred = True  # skipped now (the reader consumes them), read on the second pass
                else:
                    yield from value
        if not saw_annotations:
            raise GtFormatError(f"{self.path}: {_NOT_INSTANCES}")
        if deferred:
            if self.sizes is None:  # no "images" at all: polygons have no image size (an error, as in read_gt_json)
                self.sizes = {}
            for key, value in self._top_level():
                if key == "annotations":
                    yield from value
