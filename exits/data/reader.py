"""Read COCO / LVIS / VOC(COCO-format) instance json into validated point records.

Output is a ``PointDataset`` of ``ObjectRecord``s: extreme points and boxes only. The
``segmentation`` field of an annotation is never read when the annotation has
``extreme_points``; where it has none, ``point_labels.MaskToPoints`` clicks them from the
mask (the labelling step) and only the points come out.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from exits.data.extreme_points import box_from_extreme_points
from exits.data.point_labels import MaskToPoints
from exits.data.records import CategoryRecord, ImageRecord, ObjectRecord, PointDataset, Rejection
from exits.data.validation import (
    DatasetError,
    ValidationSummary,
    check_extreme_points,
    check_image_file,
    find_duplicates,
    parse_extreme_points,
)

log = logging.getLogger(__name__)

Format = Literal["auto", "coco", "lvis"]


def detect_format(dataset: dict) -> Literal["coco", "lvis"]:
    """LVIS json has per-category ``frequency`` and images named by ``coco_url``."""
    cats = dataset.get("categories") or []
    if cats and all("frequency" in c for c in cats):
        return "lvis"
    images = dataset.get("images") or []
    if images and "file_name" not in images[0] and "coco_url" in images[0]:
        return "lvis"
    return "coco"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise DatasetError(f"annotation file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list '{key}'")
    return data


def _build_api(path: Path, dataset: dict, fmt: str) -> Any:
    """Index the dataset with the official API (used for mask decoding when deriving points)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if fmt == "lvis":
            from exits.data.lvis_api import lvis_from_dict

            return lvis_from_dict(dataset)
        from pycocotools.coco import COCO

        api = COCO()
        api.dataset = dataset
        api.createIndex()
        return api


def _image_record(img: dict, fmt: str) -> ImageRecord:
    name = img.get("file_name")
    if not name and fmt == "lvis":
        name = str(img["coco_url"]).rsplit("/", 1)[-1]
    return ImageRecord(image_id=int(img["id"]), file_name=str(name), width=int(img["width"]), height=int(img["height"]))


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

    Every rejected record is listed in ``PointDataset.rejections`` with the file and id.
    Raises ``DatasetError`` only when the file itself is unusable or nothing valid is left.
    """
    path = Path(annotations)
    image_dir = Path(image_dir)
    data = _read_json(path)
    fmt = detect_format(data) if fmt == "auto" else fmt
    src = str(path)
    rejections: list[Rejection] = []

    images: dict[int, ImageRecord] = {}
    dup_images = find_duplicates(img.get("id") for img in data["images"])
    for img in data["images"]:
        try:
            rec = _image_record(img, fmt)
        except (KeyError, TypeError, ValueError) as exc:
            rejections.append(Rejection(src, "bad_image_record", f"image record {img!r:.120} is malformed: {exc}"))
            continue
        if rec.image_id in dup_images:
            rejections.append(Rejection(src, "duplicate_id", f"image id {rec.image_id} appears more than once", image_id=rec.image_id))
            continue
        images[rec.image_id] = rec

    categories = {int(c["id"]): CategoryRecord(int(c["id"]), str(c.get("name", c["id"]))) for c in data["categories"]}

    bad_images: dict[int, tuple[str, str]] = {}
    for rec in tqdm(list(images.values()), desc="checking images", disable=not progress, unit="img"):
        problem = check_image_file(image_dir, rec, open_file=check_images)
        if problem:
            bad_images[rec.image_id] = problem
            rejections.append(Rejection(src, problem[0], problem[1], image_id=rec.image_id))

    dup_anns = find_duplicates(a.get("id") for a in data["annotations"])
    mask_to_points: MaskToPoints | None = None
    objects: list[ObjectRecord] = []
    for ann in tqdm(data["annotations"], desc="checking annotations", disable=not progress, unit="ann"):
        ann_id = ann.get("id")
        image_id = ann.get("image_id")

        def reject(reason: str, message: str) -> None:
            rejections.append(Rejection(src, reason, message, ann_id=ann_id, image_id=image_id))

        if ann_id is None or image_id is None:
            reject("bad_annotation", "annotation lacks 'id' or 'image_id'")
            continue
        if ann_id in dup_anns:
            reject("duplicate_id", f"annotation id {ann_id} appears more than once")
            continue
        if image_id not in images:
            reject("unknown_image", f"image id {image_id} is not in the images list (or was rejected)")
            continue
        if image_id in bad_images:
            reject(bad_images[image_id][0], bad_images[image_id][1])
            continue
        if ann.get("category_id") not in categories:
            reject("unknown_category", f"category id {ann.get('category_id')!r} is not in the categories list")
            continue
        if ann.get("iscrowd", 0):
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
                mask_to_points = MaskToPoints(_build_api(path, data, fmt))
            try:
                pts = mask_to_points(ann)
            except ValueError as exc:
                reject("no_points", str(exc))
                continue
        else:
            reject("no_points", "annotation has no extreme_points (derive_missing_points is off)")
            continue

        problem = check_extreme_points(pts, image.width, image.height, point_tolerance_px)
        if problem:
            reject(*problem)
            continue
        objects.append(
            ObjectRecord(
                ann_id=int(ann_id), image_id=int(image_id), category_id=int(ann["category_id"]),
                extreme_points=pts, bbox=box_from_extreme_points(pts), points_source=source, split=split,
            )
        )

    summary = ValidationSummary.of(len(data["annotations"]), len(objects), rejections)
    log.info("%s: %s", src, summary)
    for r in rejections[:20]:
        log.warning("%s", r)
    if not objects:
        detail = f" ({summary})" if data["annotations"] else " (no annotations)"
        raise DatasetError(f"{src}: no valid objects{detail}")
    return PointDataset(source=src, images=images, categories=categories, objects=objects,
                        image_dir=str(image_dir), rejections=rejections)
