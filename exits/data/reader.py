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
from typing import Any, Iterator, Literal

import numpy as np

from tqdm import tqdm

from exits.data.extreme_points import box_from_extreme_points
from exits.json_stream import JsonStreamError, iter_top_level
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


def _dataset_error(path: Path, exc: JsonStreamError) -> DatasetError:
    if exc.top_level:
        return DatasetError(f"{path}: top level must be an object with images/annotations/categories")
    return DatasetError(f"{path}: not valid JSON ({exc.detail})")


class _StreamedJson:
    """An instances json read key by key: ``images``, ``categories`` (and every other key)
    whole, ``annotations`` one at a time (:mod:`exits.json_stream`), so a COCO-sized file
    never sits in memory as one dict. When ``annotations`` comes before ``images`` or
    ``categories`` in the file, the annotations are held as a list instead."""

    def __init__(self, path: Path):
        self.path = path
        self.head: dict[str, Any] = {}
        self._fh = None
        try:
            self._fh = open(path, encoding="utf-8")
        except FileNotFoundError as exc:
            raise DatasetError(f"annotation file not found: {path}") from exc
        self._it = iter_top_level(self._fh, stream="annotations", source=str(path))
        self.annotations: Iterator[Any] | list[Any] | None = None
        try:
            for key, value in self._it:
                if key == "annotations":
                    if not all(isinstance(self.head.get(k), list) for k in ("images", "categories")):
                        value = list(value)  # keys out of the usual order: hold them
                    self.annotations = value
                    if not isinstance(value, list):
                        break
                else:
                    self.head[key] = value
        except JsonStreamError as exc:
            self.close()
            raise _dataset_error(path, exc) from exc
        for key in ("images", "categories"):
            if not isinstance(self.head.get(key), list):
                self.close()
                raise DatasetError(f"{path}: missing or non-list '{key}'")
        if self.annotations is None:
            self.close()
            raise DatasetError(f"{path}: missing or non-list 'annotations'")

    def iter_annotations(self) -> Iterator[Any]:
        try:
            yield from self.annotations
            if not isinstance(self.annotations, list):
                for key, value in self._it:  # keys after the annotations (validates the tail)
                    self.head[key] = value
        except JsonStreamError as exc:
            raise _dataset_error(self.path, exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _SegmentationDecoder:
    """What :class:`MaskToPoints` needs of the dataset API: ``annToMask``, decoding a polygon,
    uncompressed or compressed RLE exactly as pycocotools' ``COCO.annToRLE`` and lvis'
    ``LVIS.ann_to_rle`` do, given the image sizes (no index over all annotations)."""

    def __init__(self, sizes: dict[int, tuple[int, int]]):
        self.sizes = sizes

    def annToMask(self, ann: dict) -> np.ndarray:  # noqa: N802 - the pycocotools name
        import pycocotools.mask as mask_utils

        h, w = self.sizes[ann["image_id"]]
        segm = ann["segmentation"]
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            rle = segm
        return mask_utils.decode(rle)


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
    streamed = _StreamedJson(path)
    data = streamed.head
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

    # One pass over the annotations, streamed. Outcomes are kept in file order (an object or
    # a rejection each); ids that turn out to be duplicated are rejected afterwards, in place,
    # exactly as if they had been known up front.
    mask_to_points: MaskToPoints | None = None
    outcomes: list[ObjectRecord | Rejection] = []
    seen_ids: dict[Any, int] = {}
    n_annotations = 0
    for ann in tqdm(streamed.iter_annotations(), desc="checking annotations", disable=not progress, unit="ann"):
        n_annotations += 1
        if not isinstance(ann, dict):
            outcomes.append(Rejection(src, "bad_annotation", f"annotation {ann!r:.80} is not an object"))
            continue
        ann_id = ann.get("id")
        image_id = ann.get("image_id")
        if ann_id is not None:
            try:
                seen_ids[ann_id] = seen_ids.get(ann_id, 0) + 1
            except TypeError:  # an unhashable id (a list...) cannot be a duplicate of anything
                pass

        def reject(reason: str, message: str) -> None:
            outcomes.append(Rejection(src, reason, message, ann_id=ann_id, image_id=image_id))

        if ann_id is None or image_id is None:
            reject("bad_annotation", "annotation lacks 'id' or 'image_id'")
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
                mask_to_points = MaskToPoints(_SegmentationDecoder(
                    {i: (im.height, im.width) for i, im in images.items()}))
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
        outcomes.append(
            ObjectRecord(
                ann_id=int(ann_id), image_id=int(image_id), category_id=int(ann["category_id"]),
                extreme_points=pts, bbox=box_from_extreme_points(pts), points_source=source, split=split,
            )
        )

    dup_anns = {i for i, c in seen_ids.items() if c > 1}
    objects: list[ObjectRecord] = []
    for out in outcomes:
        ann_id = out.ann_id
        if ann_id is not None and ann_id in dup_anns and not (isinstance(out, Rejection) and out.reason == "bad_annotation"):
            out = Rejection(src, "duplicate_id", f"annotation id {ann_id} appears more than once", ann_id=ann_id,
                            image_id=out.image_id)
        if isinstance(out, Rejection):
            rejections.append(out)
        else:
            objects.append(out)
    del outcomes

    summary = ValidationSummary.of(n_annotations, len(objects), rejections)
    log.info("%s: %s", src, summary)
    for r in rejections[:20]:
        log.warning("%s", r)
    if not objects:
        detail = f" ({summary})" if n_annotations else " (no annotations)"
        raise DatasetError(f"{src}: no valid objects{detail}")
    return PointDataset(source=src, images=images, categories=categories, objects=objects,
                        image_dir=str(image_dir), rejections=rejections)
