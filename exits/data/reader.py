"""Read COCO / LVIS / VOC(COCO-format) instance json into validated point records.

Output is a ``PointDataset`` of ``ObjectRecord``s: extreme points and boxes only. The
``segmentation`` field of an annotation is never read when the annotation has
``extreme_points``; where it has none, ``point_labels.MaskToPoints`` clicks them from the
mask (the labelling step, decoded by :mod:`exits.data.segmentation_decoder`) and only the
points come out. The file is opened and streamed by :mod:`exits.data.instances_json`; here
every image, category and annotation record is validated, and every rejected one listed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from tqdm import tqdm

from exits.data.extreme_points import box_from_extreme_points
from exits.data.instances_json import StreamedInstancesJson, detect_format
from exits.data.point_labels import MaskToPoints
from exits.data.records import CategoryRecord, ImageRecord, ObjectRecord, PointDataset, Rejection
from exits.data.segmentation_decoder import SegmentationDecoder
from exits.data.validation import (
    DatasetError,
    RecordError,
    ValidationSummary,
    as_int_id,
    check_extreme_points,
    check_image_files,
    find_duplicates,
    id_problem,
    parse_category_record,
    parse_extreme_points,
    parse_image_record,
    short_repr,
)

log = logging.getLogger(__name__)

Format = Literal["auto", "coco", "lvis"]

#: Rejections of these reasons are each logged at WARNING (up to this many), whatever else
#: was rejected: a non-integer id is a sign the file was written by a broken tool.
_WARN_EACH = {"bad_id": 50}
_WARN_FIRST = 20


def _parse_records(raw: list, parse: Callable[[Any], Any], id_of: Callable[[Any], int]
                   ) -> tuple[list[tuple[int, Any, Any]], list[int | None], set[int]]:
    """(index, raw record, parsed record or its RecordError) per record, each record's integer
    id (None where it has none), and the ids that appear more than once."""
    parsed: list[tuple[int, Any, Any]] = []
    for index, record in enumerate(raw):
        try:
            parsed.append((index, record, parse(record)))
        except RecordError as exc:
            parsed.append((index, record, exc))
    ids = [as_int_id(rec.get("id")) if isinstance(out, RecordError) and isinstance(rec, dict)
           else None if isinstance(out, RecordError) else id_of(out) for _, rec, out in parsed]
    return parsed, ids, find_duplicates(i for i in ids if i is not None)


def _image_records(src: str, raw_images: list, fmt: str, rejections: list[Rejection]
                   ) -> tuple[dict[int, ImageRecord], dict[int, tuple[str, str]]]:
    """The valid image records by id, and for every other integer image id the (reason,
    message) its annotations are rejected with."""
    parsed, ids, dups = _parse_records(raw_images, lambda img: parse_image_record(img, fmt),
                                       lambda rec: rec.image_id)
    images: dict[int, ImageRecord] = {}
    refused: dict[int, tuple[str, str]] = {}
    for (index, img, rec), image_id in zip(parsed, ids):
        if isinstance(rec, RecordError):
            rejections.append(Rejection(src, rec.reason, rec.message, image_id=image_id, record="image", index=index))
            if image_id is not None and image_id not in dups:
                refused[image_id] = ("unknown_image", f"image {image_id} is not usable: its record was rejected "
                                                      f"({rec.reason}: {rec.message})")
        elif image_id in dups:
            rejections.append(Rejection(src, "duplicate_id", f"image id {image_id} appears more than once",
                                        image_id=image_id, record="image", index=index))
        else:
            images[image_id] = rec
    for image_id in dups:
        refused[image_id] = ("unknown_image", f"image id {image_id} appears more than once in the images list, "
                                              "so it is ambiguous which image is meant")
    return images, refused


def _category_records(src: str, raw_categories: list, rejections: list[Rejection]
                      ) -> tuple[dict[int, CategoryRecord], dict[int, str]]:
    """The valid categories by id, and for every other integer category id why its
    annotations are rejected (``unknown_category``)."""
    parsed, ids, dups = _parse_records(raw_categories, parse_category_record, lambda rec: rec.id)
    categories: dict[int, CategoryRecord] = {}
    refused: dict[int, str] = {}
    for (index, cat, rec), cat_id in zip(parsed, ids):
        if isinstance(rec, RecordError):
            rejections.append(Rejection(src, rec.reason, rec.message, category_id=cat_id, record="category",
                                        index=index))
            if cat_id is not None and cat_id not in dups:
                refused[cat_id] = f"its category was rejected: {rec.message}"
        elif cat_id in dups:
            rejections.append(Rejection(src, "duplicate_id", f"category id {cat_id} appears more than once "
                                        f"(this one named {rec.name!r})", category_id=cat_id, record="category",
                                        index=index))
        else:
            categories[cat_id] = rec
    for cat_id in dups:
        refused[cat_id] = (f"category id {cat_id} appears more than once in the categories list, so it is "
                           "ambiguous which category is meant")
    return categories, refused


def _listable_id(value: Any) -> Any:
    """A bad id as it can stand in ``Rejection.ann_id`` / ``rejections.json``: a short json
    scalar as found (``"1"``, ``true``, ``100.5``, ``2**70``), else None (NaN and infinities
    are not json; lists, objects and long strings are named by the message and index)."""
    if isinstance(value, (bool, int)) or (isinstance(value, str) and len(value) <= 100):
        return value
    if isinstance(value, float) and np.isfinite(value):
        return value
    return None


def _log_rejections(src: str, summary: ValidationSummary, rejections: list[Rejection]) -> None:
    log.info("%s: %s", src, summary)
    shown = 0
    counts: dict[str, int] = {}
    for r in rejections:
        limit = _WARN_EACH.get(r.reason)
        if limit is not None:
            counts[r.reason] = counts.get(r.reason, 0) + 1
            if counts[r.reason] <= limit:
                log.warning("%s", r)
        elif shown < _WARN_FIRST:
            shown += 1
            log.warning("%s", r)
    for reason, limit in _WARN_EACH.items():
        if counts.get(reason, 0) > limit:
            log.warning("%s: %d more records rejected with [%s] (see the full list: exits validate)",
                        src, counts[reason] - limit, reason)


def load_point_dataset(
    annotations: str | Path,
    image_dir: str | Path,
    *,
    fmt: Format = "auto",
    derive_missing_points: bool = True,
    point_tolerance_px: float = 1.0,
    check_images: bool = True,
    split: str = "train",
    progress: bool = False,
) -> PointDataset:
    """Load and validate an instances json for extreme-point training.

    Every rejected record (annotation, image or category) is listed in
    ``PointDataset.rejections`` with the file, its ids (or its position when its id is not
    an integer) and a reason of :data:`exits.data.validation.REJECTION_REASONS`.
    Raises ``DatasetError`` (one line naming the file) only when the file itself is
    unusable or nothing valid is left.
    """
    path = Path(annotations)
    image_dir = Path(image_dir)
    streamed = StreamedInstancesJson(path)
    data = streamed.head
    fmt = detect_format(data) if fmt == "auto" else fmt
    src = str(path)
    rejections: list[Rejection] = []

    images, refused_images = _image_records(src, data["images"], fmt, rejections)
    records = list(images.values())
    bar = lambda it: tqdm(it, total=len(records), desc="checking images", disable=not progress, unit="img")  # noqa: E731
    for rec, problem in zip(records, check_image_files(image_dir, records, check_images, wrap=bar)):
        if problem:
            del images[rec.image_id]
            refused_images[rec.image_id] = problem
            rejections.append(Rejection(src, problem[0], problem[1], image_id=rec.image_id, record="image"))
    categories, refused_categories = _category_records(src, data["categories"], rejections)

    # One pass over the annotations, streamed. Outcomes are kept in file order (an object or
    # a rejection each); ids that turn out to be duplicated are rejected afterwards, in place,
    # exactly as if they had been known up front.
    mask_to_points: MaskToPoints | None = None
    outcomes: list[ObjectRecord | Rejection] = []
    seen_ids: dict[int, int] = {}
    n_annotations = 0
    for index, ann in enumerate(tqdm(streamed.iter_annotations(), desc="checking annotations",
                                     disable=not progress, unit="ann")):
        n_annotations += 1
        if not isinstance(ann, dict):
            outcomes.append(Rejection(src, "bad_annotation", f"the annotation is not an object: {short_repr(ann)}",
                                      record="annotation", index=index))
            continue
        if ann.get("id") is None:
            image_note = f" (image {short_repr(ann['image_id'])})" if "image_id" in ann else ""
            outcomes.append(Rejection(src, "bad_annotation", f"the annotation has no 'id'{image_note}",
                                      record="annotation", index=index))
            continue
        problem = id_problem(ann["id"])
        if problem:
            raw_id = _listable_id(ann["id"])
            outcomes.append(Rejection(src, "bad_id", f"id {short_repr(ann['id'])} {problem}, not an integer id",
                                      ann_id=raw_id, record="annotation", index=index,
                                      image_id=as_int_id(ann.get("image_id")) if raw_id is not None else None))
            continue
        ann_id = as_int_id(ann["id"])
        seen_ids[ann_id] = seen_ids.get(ann_id, 0) + 1
        image_id: int | None = None

        def reject(reason: str, message: str) -> None:
            outcomes.append(Rejection(src, reason, message, ann_id=ann_id, image_id=image_id,
                                      record="annotation", index=index))

        missing = [k for k in ("image_id", "category_id") if ann.get(k) is None]
        if missing:
            reject("bad_annotation", f"annotation lacks {' and '.join(repr(k) for k in missing)}")
            continue
        bad_refs = [f"{k} {short_repr(ann[k])} {id_problem(ann[k])}" for k in ("image_id", "category_id")
                    if id_problem(ann[k])]
        if bad_refs:
            reject("bad_id", "; ".join(bad_refs) + ", not an integer id")
            continue
        image_id = as_int_id(ann["image_id"])
        category_id = as_int_id(ann["category_id"])
        if image_id in refused_images:
            reject(*refused_images[image_id])
            continue
        if image_id not in images:
            reject("unknown_image", f"image id {image_id} is not in the images list")
            continue
        if category_id in refused_categories:
            reject("unknown_category", refused_categories[category_id])
            continue
        if category_id not in categories:
            reject("unknown_category", f"category id {category_id} is not in the categories list")
            continue
        crowd = ann.get("iscrowd", 0)
        if crowd is None:
            crowd = 0
        if isinstance(crowd, bool):
            crowd = int(crowd)
        if crowd not in (0, 1) or not isinstance(crowd, (int, float)):
            reject("bad_annotation", f"iscrowd is {short_repr(ann.get('iscrowd'))}; it must be 0 or 1")
            continue
        if crowd:
            reject("crowd", "crowd annotations have no extreme points of one object")
            continue

        image = images[image_id]
        if "extreme_points" in ann:
            source = "annotated"
            try:
                pts = parse_extreme_points(ann["extreme_points"])
            except ValueError as exc:
                reject("bad_extreme_points", str(exc))
                continue
        elif derive_missing_points:
            source = "derived_from_mask"
            if mask_to_points is None:
                mask_to_points = MaskToPoints(SegmentationDecoder(
                    {i: (im.height, im.width) for i, im in images.items()}))
            try:
                pts = mask_to_points(ann)
            except (ValueError, RecursionError) as exc:
                reject("no_points", str(exc) if not isinstance(exc, RecursionError)
                       else "segmentation is nested too deeply to decode")
                continue
        else:
            reject("no_points", "annotation has no extreme_points (derive_missing_points is off)")
            continue

        problem_pts = check_extreme_points(pts, image.width, image.height, point_tolerance_px)
        if problem_pts:
            reject(*problem_pts)
            continue
        outcomes.append(
            ObjectRecord(
                ann_id=ann_id, image_id=image_id, category_id=category_id,
                extreme_points=pts, bbox=box_from_extreme_points(pts), points_source=source, split=split,
            )
        )

    dup_anns = {i for i, c in seen_ids.items() if c > 1}
    objects: list[ObjectRecord] = []
    for out in outcomes:
        ann_id = out.ann_id
        own_id_ok = isinstance(out, ObjectRecord) or (out.has_int_ann_id and out.reason != "bad_annotation")
        if own_id_ok and ann_id in dup_anns:
            out = Rejection(src, "duplicate_id", f"annotation id {ann_id} appears more than once", ann_id=ann_id,
                            image_id=out.image_id, record="annotation",
                            index=out.index if isinstance(out, Rejection) else None)
        if isinstance(out, Rejection):
            rejections.append(out)
        else:
            objects.append(out)
    outcomes.clear()  # the objects and rejections hold what is needed

    summary = ValidationSummary.of(n_annotations, len(objects), rejections)
    _log_rejections(src, summary, rejections)
    if not objects:
        detail = f" ({summary})" if n_annotations else " (no annotations)"
        raise DatasetError(f"{src}: no valid objects{detail}")
    return PointDataset(source=src, images=images, categories=categories, objects=objects,
                        image_dir=str(image_dir), rejections=rejections, n_annotations=n_annotations)
