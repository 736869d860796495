"""COCO instances json as a torch Dataset of (image, target) for torchvision Mask R-CNN.

Masks are decoded from any COCO segmentation form (polygons, uncompressed or compressed
RLE) with pycocotools. Boxes come from ``box_source``: ``"annotation"`` takes the json's ``bbox``
(in pseudo-label files the extreme-point box the annotator gave: exact, while a pseudo mask
may miss a separated part), ``"mask"`` the tight box of the decoded mask (box and mask heads
then see one consistent object; also the fallback when an annotation has no ``bbox``).
Annotations whose mask is empty and crowd regions are
dropped (counts logged); images with no objects are kept with empty targets (they teach
the background).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch

from detectors.torchvision_backend.transforms import Target
from exits.data.images import image_file, read_rgb
from exits.eval.rle import Rle, segmentation_to_rle

log = logging.getLogger(__name__)

BOX_SOURCES = ("annotation", "mask")


class CategoryMapping:
    """COCO category ids <-> contiguous labels 1..K (0 is Mask R-CNN's background).

    Labels follow the sorted category ids, so the mapping depends only on the id set.
    """

    def __init__(self, category_ids: Sequence[int]) -> None:
        ids = sorted({int(c) for c in category_ids})
        if not ids:
            raise ValueError("no categories")
        self.category_ids: list[int] = ids
        self._to_label = {c: k + 1 for k, c in enumerate(ids)}

    @property
    def num_classes(self) -> int:
        """K + 1 (background included), what Mask R-CNN's ``num_classes`` means."""
        return len(self.category_ids) + 1

    def to_label(self, category_id: int) -> int:
        return self._to_label[int(category_id)]

    def to_category(self, label: int) -> int:
        if not 1 <= int(label) <= len(self.category_ids):
            raise KeyError(f"label {label} outside 1..{len(self.category_ids)}")
        return self.category_ids[int(label) - 1]


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """RGB image as float (3, H, W) in [0, 1]."""
    arr = read_rgb(path)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class CocoInstanceDataset(torch.utils.data.Dataset):
    """One item per image: ``(image (3, H, W) float, target)``.

    target: ``boxes`` (N, 4) float xyxy, ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W)
    uint8, ``ann_ids`` (N,) int64, ``image_id`` int. Items are indexed by position; an item
    may also be requested as ``(position, seed)`` to apply the augmentation with a
    generator seeded by ``seed`` (the training loop uses this for exact resume).
    """

    def __init__(
        self,
        annotation_json: str | os.PathLike | Mapping[str, Any],
        image_dir: str | os.PathLike,
        transform: Callable[[torch.Tensor, Target, torch.Generator], tuple[torch.Tensor, Target]] | None = None,
        category_ids: Sequence[int] | None = None,
        box_source: str = "mask",
    ) -> None:
        if box_source not in BOX_SOURCES:
            raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}")
        self.box_source = box_source
        if isinstance(annotation_json, Mapping):
            data, self.source = annotation_json, "<in-memory json>"
        else:
            self.source = str(annotation_json)
            with open(annotation_json, "r", encoding="utf-8") as fh:
                data = json.load(fh)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.categories = CategoryMapping(category_ids or [c["id"] for c in data["categories"]])
        self.images = sorted(data["images"], key=lambda im: int(im["id"]))
        for img in self.images:
            if "file_name" not in img and "coco_url" in img:  # LVIS
                img["file_name"] = str(img["coco_url"]).rsplit("/", 1)[-1]
        sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in self.images}
        # Per image: (ann_id, label, rle, xyxy box from the json or None).
        self.objects: dict[int, list[tuple[int, int, Rle, list[float] | None]]] = {i: [] for i in sizes}
        self.dropped = {"empty_mask": 0, "crowd": 0, "unknown_image": 0, "unknown_category": 0}
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if image_id not in sizes:
                self.dropped["unknown_image"] += 1
                continue
            if ann.get("iscrowd", 0):
                self.dropped["crowd"] += 1
                continue
            if int(ann["category_id"]) not in self.categories._to_label:
                self.dropped["unknown_category"] += 1
                continue
            h, w = sizes[image_id]
            try:
                rle = segmentation_to_rle(ann.get("segmentation"), h, w)
            except ValueError as exc:
                raise ValueError(f"{self.source}: annotation {ann.get('id')}: {exc}") from exc
            if rle is None or int(mask_utils.area(rle)) == 0:
                self.dropped["empty_mask"] += 1
                continue
            label = self.categories.to_label(ann["category_id"])
            box = None
            if box_source == "annotation" and ann.get("bbox") is not None:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                if not (bw > 0 and bh > 0):
                    raise ValueError(f"{self.source}: annotation {ann.get('id')}: bbox {ann['bbox']} has no area")
                box = [x, y, x + bw, y + bh]
            self.objects[image_id].append((int(ann["id"]), label, rle, box))
        if any(self.dropped.values()):
            log.warning("%s: dropped annotations: %s", self.source, {k: v for k, v in self.dropped.items() if v})

    @property
    def num_objects(self) -> int:
        return sum(len(v) for v in self.objects.values())

    def __len__(self) -> int:
        return len(self.images)

    def image_labels(self) -> list[set[int]]:
        """Per image (dataset order), the set of its object labels (for repeat factors)."""
        return [{o[1] for o in self.objects[int(img["id"])]} for img in self.images]

    def target_for(self, position: int) -> Target:
        """Target of the image at ``position`` before augmentation."""
        img = self.images[position]
        h, w = int(img["height"]), int(img["width"])
        objs = self.objects[int(img["id"])]
        if objs:
            masks = torch.from_numpy(np.ascontiguousarray(mask_utils.decode([o[2] for o in objs]).transpose(2, 0, 1)))
            boxes = torch.tensor(np.asarray(mask_utils.toBbox([o[2] for o in objs]), dtype=np.float32).reshape(-1, 4))
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            for k, obj in enumerate(objs):
                if obj[3] is not None:
                    boxes[k] = torch.tensor(obj[3], dtype=torch.float32)
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
        return {
            "boxes": boxes,
            "labels": torch.tensor([o[1] for o in objs], dtype=torch.int64),
            "masks": masks,
            "ann_ids": torch.tensor([o[0] for o in objs], dtype=torch.int64),
            "image_id": int(img["id"]),
        }

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        position, seed = item if isinstance(item, tuple) else (item, None)
        img = self.images[position]
        image = load_image(image_file(self.image_dir, img["file_name"]))
        if tuple(image.shape[1:]) != (int(img["height"]), int(img["width"])):
            raise ValueError(
                f"{self.source}: image {img['id']} ({img['file_name']}) is {tuple(image.shape[1:])}, "
                f"json says {(img['height'], img['width'])}"
            )
        target = self.target_for(position)
        if self.transform is not None:
            gen = torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ())))
            image, target = self.transform(image, target, gen)
        return image, target


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists of images and targets (Mask R-CNN takes variable sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
