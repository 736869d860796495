"""Masks to train the click decoder on, and the run's files it reads.

Default source (``train_source="pseudo"``): the run's own pseudo masks with the highest
``score`` in ``pseudo_labels.json``. The run's GT masks are never read for training (the
project's leak boundary: GT is for evaluation only). Optional source (``"coco"``): a COCO
json with masks that the user names explicitly for click training (e.g. a small fully
labelled set); its objects are cropped like the run's (extreme points given or derived
from the mask, the run's crop margins).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from pycocotools import mask as mask_utils

from exits.data.crops import CropWindow, crop_images, crop_mask, crop_window
from exits.data.extreme_points import derive_extreme_points
from exits.eval.rle import segmentation_to_rle
from exits.stages.object_crops import load_image_tensor

__all__ = ["ClickTrainingSet", "run_images_dir", "run_crop_margins", "pseudo_masks_by_score", "read_windows",
           "build_training_set", "decode_segmentation"]

MIN_TARGET_PIXELS = 16  # crops whose mask covers fewer crop pixels teach nothing about clicks


@dataclass
class ClickTrainingSet:
    """K objects: crops (K, 3, S, S) uint8 and target masks (K, S, S) bool at crop size S."""

    ann_ids: list[int]
    crops: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.ann_ids)


def run_images_dir(workdir: Path) -> Path:
    """The run's image folder as recorded in ``run.json`` (``{"images": ...}``)."""
    meta_path = Path(workdir) / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: is {workdir} a finished stage-1 run?")
    images = json.loads(meta_path.read_text(encoding="utf-8")).get("images")
    if not images:
        raise FileNotFoundError(f"{meta_path} names no image folder")
    return Path(images)


def run_crop_margins(workdir: Path) -> tuple[float, int]:
    """(crop_margin, crop_min_margin_px) of the run's ``config.yaml`` (defaults 0.15, 4)."""
    path = Path(workdir) / "config.yaml"
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    section = (data or {}).get("data") or {}
    return float(section.get("crop_margin", 0.15)), int(section.get("crop_min_margin_px", 4))


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray | None:
    """(H, W) bool mask of a COCO segmentation (polygons / RLE), ``None`` when empty."""
    rle = segmentation_to_rle(segmentation, height, width)
    return None if rle is None else mask_utils.decode(rle).astype(bool)


def pseudo_masks_by_score(workdir: Path, top_fraction: float, max_objects: int,
                          exclude: set[int] | None = None) -> list[dict[str, Any]]:
    """The best-scoring pseudo-label annotations of the run, best first."""
    data = json.loads((Path(workdir) / "pseudo_labels.json").read_text(encoding="utf-8"))
    anns = [a for a in data["annotations"] if a.get("segmentation") and int(a["id"]) not in (exclude or set())]
    anns.sort(key=lambda a: (-float(a.get("score", 0.0)), int(a["id"])))
    keep = min(max_objects, max(1, int(round(top_fraction * len(anns)))))
    return anns[:keep]


def read_windows(workdir: Path, crop_size: int) -> dict[int, tuple[str, CropWindow, tuple[int, int]]]:
    """ann_id -> (file_name, crop window at ``crop_size``, (H, W)) from ``instances.parquet``."""
    table = pq.read_table(Path(workdir) / "instances.parquet", columns=["ann_id", "file_name", "crop_box", "width", "height"])
    out = {}
    for row in table.to_pylist():
        out[int(row["ann_id"])] = (str(row["file_name"]), CropWindow(*map(int, row["crop_box"]), size=crop_size),
                                   (int(row["height"]), int(row["width"])))
    return out


def _crop_objects(items: list[tuple[int, str, CropWindow, np.ndarray]], images_dir: Path, crop_size: int
                  ) -> ClickTrainingSet:
    """items: (ann_id, file_name, window, full-image mask) -> cropped set (small masks dropped)."""
    by_file: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_file.setdefault(item[1], []).append(i)
    crops = torch.zeros((len(items), 3, crop_size, crop_size), dtype=torch.uint8)
    targets = torch.zeros((len(items), crop_size, crop_size), dtype=torch.bool)
    for name, rows in by_file.items():
        image = load_image_tensor(images_dir / name)
        crops[rows] = crop_images(image, [items[i][2] for i in rows]).mul(255).round_().clamp_(0, 255).to(torch.uint8)
        for i in rows:
            targets[i] = crop_mask(torch.from_numpy(items[i][3]), items[i][2]) >= 0.5
    keep = [i for i in range(len(items)) if int(targets[i].sum()) >= MIN_TARGET_PIXELS]
    return ClickTrainingSet(ann_ids=[items[i][0] for i in keep], crops=crops[keep], targets=targets[keep])


def build_training_set(workdir: Path, crop_size: int, *, source: str = "pseudo", top_fraction: float = 0.6,
                       max_objects: int = 2000, train_json: str | Path | None = None,
                       images_dir: str | Path | None = None, exclude: set[int] | None = None) -> ClickTrainingSet:
    """Crops and target masks for click training (see module doc). ``exclude``: ann_ids to
    leave out (e.g. the objects a benchmark evaluates on)."""
    workdir = Path(workdir)
    images = Path(images_dir) if images_dir is not None else run_images_dir(workdir)
    items: list[tuple[int, str, CropWindow, np.ndarray]] = []
    if source == "pseudo":
        windows = read_windows(workdir, crop_size)
        for ann in pseudo_masks_by_score(workdir, top_fraction, max_objects, exclude):
            ann_id = int(ann["id"])
            if ann_id not in windows:
                continue
            name, window, (h, w) = windows[ann_id]
            mask = decode_segmentation(ann["segmentation"], h, w)
            if mask is not None:
                items.append((ann_id, name, window, mask))
    elif source == "coco":
        if train_json is None:
            raise ValueError("source 'coco' needs train_json")
        data = json.loads(Path(train_json).read_text(encoding="utf-8"))
        img_info = {int(im["id"]): im for im in data["images"]}
        margin, min_px = run_crop_margins(workdir)
        for ann in data["annotations"][:max_objects]:
            if int(ann["id"]) in (exclude or set()) or ann.get("iscrowd", 0):
                continue
            im = img_info[int(ann["image_id"])]
            mask = decode_segmentation(ann.get("segmentation"), int(im["height"]), int(im["width"]))
            if mask is None or not mask.any():
                continue
            points = np.asarray(ann["extreme_points"], np.float64) if ann.get("extreme_points") else derive_extreme_points(mask)
            window = crop_window(points, int(im["width"]), int(im["height"]), margin=margin, min_margin_px=min_px,
                                 size=crop_size)
            items.append((int(ann["id"]), str(im["file_name"]), window, mask))
    else:
        raise ValueError(f"unknown training source {source!r}")
    if not items:
        raise ValueError(f"no training masks found for source {source!r} in {workdir}")
    return _crop_objects(items, images, crop_size)
