"""A run folder's pseudo labels as Detectron2 datasets, for training with your own config.

:func:`register_run` registers the json stage 2 trains on (``pseudo_labels_fixed.json`` when
``exits export`` made it from the current pseudo labels, else ``pseudo_labels.json``: the
rule of :meth:`exits.run_folder.RunFolder.training_labels`) with the run's image folder
(``run.json``) in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` as ``<name>_train``,
and a held-out GT json as ``<name>_val``::

    from detectors.detectron2_backend import register_run
    reg = register_run("runs/demo", "demo", val_json="data/demo/val.json")
    reg.train, reg.val, reg.num_classes        # "demo_train", "demo_val", K

The dataset dicts are those of the project's own Detectron2 trainer
(:mod:`detectors.detectron2_backend.datasets`), built when Detectron2 asks for them (the
registered function reads the json then). Why not Detectron2's ``load_coco_json`` /
``register_coco_instances``: an LVIS json names its images by ``coco_url``, which
``load_coco_json`` cannot read and ``load_lvis_json`` maps to ``image_root + split folder``
with metadata only for the official LVIS names; and stage 2 drops empty pseudo masks and
crowd regions and turns every segmentation into compressed RLE, which the records here do
the same way, so a user's config trains on exactly the objects stage 2 trains on. The
records are otherwise what ``load_coco_json`` produces (checked in the tests): ``file_name``,
``height``, ``width``, ``image_id``, ``annotations`` with ``bbox`` (XYWH_ABS, the json's
box: the extreme-point box), ``bbox_mode``, contiguous ``category_id``, ``segmentation``
(compressed RLE, str counts: set the mapper's ``instance_mask_format = "bitmask"``),
``iscrowd`` 0.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog

from detectors.detectron2_backend.datasets import BOX_SOURCES, register_json_file
from detectors.evaluation import is_lvis
from exits.io.json_stream import JsonFileError, JsonStreamError, iter_top_level, open_json_text
from exits.run_folder import PSEUDO_JSON, RunFolder

log = logging.getLogger(__name__)

__all__ = ["RegisteredRun", "register_run", "json_head"]


@dataclass(frozen=True)
class RegisteredRun:
    """What :func:`register_run` registered."""

    train: str                 # "<name>_train"
    val: str | None            # "<name>_val", when a val json was given
    train_json: Path           # pseudo_labels_fixed.json or pseudo_labels.json
    val_json: Path | None
    image_dir: Path
    thing_classes: list[str]   # in category-id order = contiguous label order
    category_ids: list[int]    # sorted; contiguous label i <-> category_ids[i]
    evaluator_type: str        # "coco" | "lvis" (of the training json)

    @property
    def num_classes(self) -> int:
        """K, what ``model.roi_heads.num_classes`` / ``MODEL.ROI_HEADS.NUM_CLASSES`` needs."""
        return len(self.thing_classes)


def json_head(path: str | os.PathLike) -> dict[str, Any]:
    """Every top-level key of an instances json but ``annotations`` (streamed past, never
    held): enough for the categories and the format, without loading a COCO-sized file.

    Raises:
        ValueError: the file cannot be read as a json object, or lacks a ``categories`` or
            ``images`` list (one line naming the file).
    """
    head: dict[str, Any] = {}
    try:
        with open_json_text(path) as fh:
            for key, value in iter_top_level(fh, stream="annotations", source=str(path)):
                if key != "annotations":
                    head[key] = value
                    continue
                if all(isinstance(head.get(k), list) for k in ("images", "categories")):
                    break  # nothing after the annotations is needed
                for _ in value:  # consume to reach the keys after it
                    pass
    except (JsonFileError, JsonStreamError) as exc:
        raise ValueError(str(exc)) from None
    for key in ("images", "categories"):
        if not isinstance(head.get(key), list):
            raise ValueError(f"{path}: missing or non-list '{key}'")
    if not head["categories"]:
        raise ValueError(f"{path}: no categories")
    return head


def _train_json(run: RunFolder, fixed: bool) -> Path:
    if fixed:
        return run.training_labels()  # fixed when current, else the pseudo labels; raises if neither
    if not run.pseudo_json.is_file():
        raise FileNotFoundError(f"{run.root}: no {PSEUDO_JSON} (run stage 1 first: `exits run`)")
    return run.pseudo_json


def _image_dir(run: RunFolder, image_dir: str | os.PathLike | None) -> Path:
    if image_dir is not None:
        path, origin = Path(image_dir), "image_dir"
    else:
        try:
            path = run.images_dir()
        except FileNotFoundError:
            raise FileNotFoundError(f"{run.run_meta} not found or names no image folder; pass image_dir=") from None
        origin = f"{run.run_meta}"
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path} (from {origin}); pass image_dir=")
    return path


def register_run(
    workdir: str | os.PathLike,
    name: str,
    *,
    fixed: bool = True,
    val_json: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    val_image_dir: str | os.PathLike | None = None,
    box_source: str = "annotation",
) -> RegisteredRun:
    """Register run ``workdir``'s training labels as ``<name>_train`` (and ``val_json`` as
    ``<name>_val``) in Detectron2's catalogs.

    Args:
        workdir: the run folder (``exits run -w``).
        name: prefix of the registered names.
        fixed: True: the json stage 2 trains on (``pseudo_labels_fixed.json`` when current,
            else ``pseudo_labels.json``); False: ``pseudo_labels.json`` (no human fixes).
        val_json: a held-out GT json (COCO or LVIS) to register as ``<name>_val``; its
            label space is the training set's. Not taken from ``run.json``: the run's ``gt``
            is the GT of the training images (for the mIoU report), not held-out data.
        image_dir: the training images (default: the run's image folder, from ``run.json``).
        val_image_dir: the val images (default: the training image folder, as ``exits run
            --val`` expects).
        box_source: training boxes: ``"annotation"`` (the json ``bbox``: extreme-point
            boxes, stage 2's default) or ``"mask"`` (the pseudo mask's tight box).

    Calling it again with the same ``name`` replaces both registrations (a ``<name>_val``
    of an earlier call is removed when this call has no ``val_json``).

    Metadata of each set: ``thing_classes`` (category-id order), ``thing_dataset_id_to_
    contiguous_id``, ``json_file`` (what COCOEvaluator / LVISEvaluator read), ``image_root``,
    ``evaluator_type`` ("coco", or "lvis" for an LVIS-format json).

    Raises:
        FileNotFoundError: no pseudo labels (run `exits run`), no image folder, no val json.
        ValueError: an unreadable json, an empty ``name``, a bad ``box_source``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_run: name must be a non-empty string, got {name!r}")
    if box_source not in BOX_SOURCES:
        raise ValueError(f"register_run: box_source must be one of {BOX_SOURCES}, got {box_source!r}")
    run = RunFolder(workdir)
    train_json = _train_json(run, fixed)
    images = _image_dir(run, image_dir)
    head = json_head(train_json)
    categories = head["categories"]
    category_ids = sorted({int(c["id"]) for c in categories})
    evaluator_type = "lvis" if is_lvis(head) else "coco"

    val_path: Path | None = None
    val_head: dict[str, Any] | None = None
    val_images = Path(val_image_dir) if val_image_dir is not None else images
    if val_json is not None:
        val_path = Path(val_json)
        if not val_path.is_file():
            raise FileNotFoundError(f"val json not found: {val_path}")
        if not val_images.is_dir():
            raise FileNotFoundError(f"val image folder not found: {val_images}; pass val_image_dir=")
        val_head = json_head(val_path)  # checked before anything is registered

    train_name, val_name = f"{name}_train", f"{name}_val"
    register_json_file(train_name, train_json, images, category_ids, categories, evaluator_type, box_source,
                       replace=True)
    if val_path is not None and val_head is not None:
        # GT boxes as COCO defines them (the json bbox); the label space is the training set's,
        # so the evaluator maps predicted labels back to the right category ids.
        register_json_file(val_name, val_path, val_images, category_ids, categories,
                           "lvis" if is_lvis(val_head) else "coco", "annotation", replace=True)
    else:
        for catalog in (DatasetCatalog, MetadataCatalog):
            if val_name in catalog.list():
                catalog.remove(val_name)
    reg = RegisteredRun(
        train=train_name,
        val=val_name if val_path is not None else None,
        train_json=train_json,
        val_json=val_path,
        image_dir=images,
        thing_classes=list(MetadataCatalog.get(train_name).thing_classes),
        category_ids=category_ids,
        evaluator_type=evaluator_type,
    )
    log.info("registered %s (%s, %d categories)%s", reg.train, train_json.name, reg.num_classes,
             f" and {reg.val} ({val_path})" if reg.val else "")
    return reg
