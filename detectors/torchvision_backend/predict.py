"""Inference: a trained checkpoint -> COCO results with compressed-RLE masks."""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np
import torch

from detectors.base import ImagesArg, read_image_records
from detectors.config import DetectorConfig
from detectors.results import coco_results
from detectors.torchvision_backend.dataset import CategoryMapping, load_image
from detectors.torchvision_backend.model import build_model
from exits.data.images import image_file
from exits.engine.device import resolve_device


def load_trained_model(checkpoint: str | os.PathLike, cfg: DetectorConfig) -> tuple[torch.nn.Module, CategoryMapping]:
    """Model and category mapping from a checkpoint written by the training loop.

    The architecture and input sizes come from the checkpoint (they must match the trained
    weights); score threshold and detections per image come from ``cfg``.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = state["meta"]
    trained = meta["config"]
    build_cfg = cfg.replace(arch=trained["arch"], min_size=trained["min_size"], max_size=trained["max_size"],
                            backbone_weights_path=trained.get("backbone_weights_path"))
    mapping = CategoryMapping(meta["category_ids"])
    # load_weights=False: the trained state below replaces any initial weights, and the
    # weight files need not exist on the machine that predicts.
    model = build_model(build_cfg, mapping.num_classes, load_weights=False)
    model.load_state_dict(state["model"])
    return model, mapping


def masks_to_results(
    output: dict[str, torch.Tensor], image_id: int, mapping: CategoryMapping, mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """torchvision output of one image -> COCO results.

    ``output["masks"]`` is (N, 1, H, W) mask probabilities already pasted into the original
    image; pixel p is foreground when prob(p) > ``mask_threshold``. bbox is the detector's
    box as [x, y, w, h]; RLE counts are str so the results serialise to json.
    """
    boxes = output["boxes"].detach().cpu().numpy().astype(np.float64)
    scores = output["scores"].detach().cpu().numpy()
    labels = output["labels"].detach().cpu().numpy()
    if len(scores) == 0:
        return []
    binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy()
    return coco_results(image_id, boxes, scores, [mapping.to_category(int(c)) for c in labels], binary)


@torch.no_grad()
def predict_images(
    checkpoint: str | os.PathLike,
    image_dir: str | os.PathLike,
    images: ImagesArg,
    cfg: DetectorConfig,
    image_ids: Iterable[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO results for every listed image (in ``cfg.batch_size`` batches)."""
    device = resolve_device(cfg.device)
    model, mapping = load_trained_model(checkpoint, cfg)
    model.to(device).eval()
    records = read_image_records(images, image_ids)
    results: list[dict[str, Any]] = []
    use_amp = cfg.amp and device.type == "cuda"
    for start in range(0, len(records), cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        batch = [load_image(image_file(image_dir, r["file_name"])).to(device) for r in chunk]
        with torch.autocast(device_type=device.type, enabled=use_amp):
            outputs = model(batch)
        for rec, out in zip(chunk, outputs):
            out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
            results.extend(masks_to_results(out, int(rec["id"]), mapping, cfg.mask_threshold))
    return results
