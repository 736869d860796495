"""COCO / LVIS instances json -> Detectron2 dataset dicts, registered under unique names.

Dataset dicts follow Detectron2's standard format: ``file_name`` (absolute), ``height``,
``width``, ``image_id`` and ``annotations`` with ``bbox`` (XYWH_ABS), ``bbox_mode``,
``category_id`` (contiguous 0..K-1) and ``segmentation`` as compressed RLE with str counts
(polygons and uncompressed RLE are converted with pycocotools, so the config uses
``INPUT.MASK_FORMAT = "bitmask"``). Category ids map to labels as in the torchvision
backend (sorted ids; Detectron2's label = torchvision label - 1). Dropped, as there:
crowd regions, empty masks, unknown images / categories. Images without objects are kept
(the config sets ``DATALOADER.FILTER_EMPTY_ANNOTATIONS = False``): they teach the background.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pycocotools.mask as mask_utils
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from detectors.evaluation import is_lvis
from detectors.torchvision_backend.dataset import CategoryMapping
from exits.eval.rle import segmentation_to_rle

log = logging.getLogger(__name__)

BOX_SOURCES = ("annotation", "mask")


@dataclass(frozen=True)
class RegisteredDataset:
    """What :func:`register_coco_json` registered: its name and a summary of its content."""

    name: str
    category_ids: list[int]
    num_images: int
    num_objects: int
    dropped: dict[str, int]
    evaluator_type: str  # "coco" | "lvis"


def _image_file_name(img: Mapping[str, Any]) -> str:
    if "file_name" in img:
        return str(img["file_name"])
    if "coco_url" in img:  # LVIS names images by URL; the file is its last part, as in the LVIS tools
        return str(img["coco_url"]).rsplit("/", 1)[-1]
    raise ValueError(f"image record {dict(img)!r:.120} has neither 'file_name' nor 'coco_url'")


def dataset_dicts(
    data: Mapping[str, Any],
    image_dir: str | os.PathLike,
    mapping: CategoryMapping,
    box_source: str = "mask",
    source: str = "<json>",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Detectron2 dataset dicts (images sorted by id) and counts of dropped annotations.

    ``box_source="annotation"`` takes the json ``bbox`` (the extreme-point box in pseudo-label
    files; the mask's box where the field is missing), ``"mask"`` the tight box of the mask,
    ``[x_min, y_min, x_max + 1 - x_min, y_max + 1 - y_min]`` (``pycocotools.mask.toBbox``).
    """
    if box_source not in BOX_SOURCES:
        raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}")
    root = Path(image_dir).resolve()
    images = sorted(data["images"], key=lambda im: int(im["id"]))
    records: dict[int, dict[str, Any]] = {}
    for img in images:
        records[int(img["id"])] = {
            "file_name": str(root / _image_file_name(img)),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": int(img["id"]),
            "annotations": [],
        }
    dropped = {"empty_mask": 0, "crowd": 0, "unknown_image": 0, "unknown_category": 0}
    known = set(mapping.category_ids)
    for ann in data["annotations"]:
        rec = records.get(int(ann["image_id"]))
        if rec is None:
            dropped["unknown_image"] += 1
            continue
        if ann.get("iscrowd", 0):
            dropped["crowd"] += 1
            continue
        if int(ann["category_id"]) not in known:
            dropped["unknown_category"] += 1
            continue
        try:
            rle = segmentation_to_rle(ann.get("segmentation"), rec["height"], rec["width"])
        except ValueError as exc:
            raise ValueError(f"{source}: annotation {ann.get('id')}: {exc}") from exc
        if rle is None or int(mask_utils.area(rle)) == 0:
            dropped["empty_mask"] += 1
            continue
        if box_source == "annotation" and ann.get("bbox") is not None:
            box = [float(v) for v in ann["bbox"]]
            if not (box[2] > 0 and box[3] > 0):
                raise ValueError(f"{source}: annotation {ann.get('id')}: bbox {ann['bbox']} has no area")
        else:
            box = [float(v) for v in mask_utils.toBbox(rle)]
        counts = rle["counts"]
        rec["annotations"].append({
            "id": int(ann["id"]),
            "bbox": box,
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": mapping.to_label(int(ann["category_id"])) - 1,
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "iscrowd": 0,
        })
    if any(dropped.values()):
        log.warning("%s: dropped annotations: %s", source, {k: v for k, v in dropped.items() if v})
    return list(records.values()), dropped


def load_dataset_dicts(json_path: str, image_dir: str, category_ids: Sequence[int], box_source: str) -> list[dict[str, Any]]:
    """:func:`dataset_dicts` of a json file (what the catalog calls)."""
    with open(json_path, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    return dataset_dicts(data, image_dir, CategoryMapping(category_ids), box_source, source=json_path)[0]


def dataset_name(json_path: str | os.PathLike, image_dir: str | os.PathLike, role: str,
                 category_ids: Sequence[int], box_source: str) -> str:
    """A catalog name unique to this json file version and these settings.

    The file's resolved path, size and modification time stand for its content, so a
    rewritten json gets a new name; the same file with the same settings maps to the same
    name (and the same dicts), so registering it twice in one process is harmless.
    """
    path = Path(json_path).resolve()
    st = path.stat()
    key = "|".join([str(path), str(st.st_size), str(st.st_mtime_ns), str(Path(image_dir).resolve()),
                    ",".join(str(c) for c in category_ids), box_source])
    return f"exits_{role}_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def register_json_file(
    name: str,
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    category_ids: Sequence[int],
    categories: Sequence[Mapping[str, Any]],
    evaluator_type: str,
    box_source: str,
    replace: bool = False,
) -> None:
    """Register ``json_path`` under ``name``: its dicts are read from the file when Detectron2
    asks (:func:`load_dataset_dicts`), the metadata is set now.

    ``category_ids``: the label space (contiguous label i = the i-th sorted id);
    ``categories``: the json's category records (for ``thing_classes`` names). Metadata:
    ``thing_classes``, ``thing_dataset_id_to_contiguous_id``, ``json_file`` (read by
    COCOEvaluator / LVISEvaluator), ``image_root``, ``evaluator_type`` ("coco" | "lvis").
    ``replace``: drop an earlier registration of ``name`` first (Detectron2 refuses to
    register a name twice, and to change metadata that is set).
    """
    if box_source not in BOX_SOURCES:
        raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}")
    mapping = CategoryMapping(category_ids)
    if replace:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
    # Read again from the file when Detectron2 asks (as its register_coco_instances does):
    # the catalog is process-global, and holding the dicts of every json ever registered
    # would keep large pseudo-label sets in memory for the process's life.
    DatasetCatalog.register(name, functools.partial(
        load_dataset_dicts, str(json_path), str(image_dir), tuple(mapping.category_ids), box_source))
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    MetadataCatalog.get(name).set(
        thing_classes=[names.get(c, str(c)) for c in mapping.category_ids],
        thing_dataset_id_to_contiguous_id={c: mapping.to_label(c) - 1 for c in mapping.category_ids},
        json_file=str(Path(json_path).resolve()),
        image_root=str(Path(image_dir).resolve()),
        evaluator_type=evaluator_type,
    )


def register_coco_json(
    data: Mapping[str, Any],
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    role: str,
    category_ids: Sequence[int] | None = None,
    box_source: str = "mask",
) -> RegisteredDataset:
    """Register ``data`` (loaded from ``json_path``) in Detectron2's catalogs.

    ``category_ids``: the label space (default: the json's categories); the eval set uses
    the training set's so the evaluator maps predicted labels back to the right ids.
    Metadata: ``thing_classes``, ``thing_dataset_id_to_contiguous_id``, ``json_file`` (read by
    COCOEvaluator / LVISEvaluator), ``image_root``, ``evaluator_type`` ("coco" | "lvis").
    """
    mapping = CategoryMapping(category_ids if category_ids is not None else [c["id"] for c in data["categories"]])
    dicts, dropped = dataset_dicts(data, image_dir, mapping, box_source, source=str(json_path))
    name = dataset_name(json_path, image_dir, role, mapping.category_ids, box_source)
    evaluator_type = "lvis" if is_lvis(data) else "coco"
    if name not in DatasetCatalog.list():
        register_json_file(name, json_path, image_dir, mapping.category_ids, data.get("categories", []),
                           evaluator_type, box_source)
    return RegisteredDataset(
        name=name,
        category_ids=list(mapping.category_ids),
        num_images=len(dicts),
        num_objects=sum(len(d["annotations"]) for d in dicts),
        dropped=dropped,
        evaluator_type=evaluator_type,
    )
