"""torchvision Mask R-CNN backend (``backend: torchvision``), always available."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from detectors.base import Detector, ImagesArg, PathLike, training_meta
from detectors.config import DetectorConfig
from detectors.registry import register
from detectors.torchvision_backend.dataset import CocoInstanceDataset
from detectors.torchvision_backend.engine import train_model
from detectors.torchvision_backend.model import build_model
from detectors.torchvision_backend.predict import predict_images
from detectors.torchvision_backend.transforms import TrainAugmentation

log = logging.getLogger(__name__)


@register("torchvision")
class TorchvisionDetector(Detector):
    """Mask R-CNN from torchvision (ResNet-50-FPN or MobileNetV3-Large-FPN)."""

    def train(self, train_json: PathLike, image_dir: PathLike, cfg: DetectorConfig, out_dir: PathLike) -> Path:
        with open(train_json, "r", encoding="utf-8") as fh:
            data = json.load(fh)
        dataset = CocoInstanceDataset(
            data, image_dir, transform=TrainAugmentation(cfg.hflip, cfg.scale_jitter), box_source=cfg.box_source
        )
        dataset.source = str(train_json)
        log.info("training %s on %d images, %d objects, %d categories",
                 cfg.arch, len(dataset), dataset.num_objects, len(dataset.categories.category_ids))
        # Seed before building so the random init is reproducible too.
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, dataset.categories.num_classes)
        meta = training_meta(self.name, data, train_json, dataset.categories.category_ids, dataset.dropped)
        return train_model(model, dataset, cfg, out_dir, meta)

    def predict(
        self,
        checkpoint: PathLike,
        image_dir: PathLike,
        images: ImagesArg,
        cfg: DetectorConfig,
        image_ids: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        return predict_images(checkpoint, image_dir, images, cfg, image_ids)


__all__ = ["TorchvisionDetector"]
