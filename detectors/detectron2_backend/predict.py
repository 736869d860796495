"""Inference: a Detectron2-backend checkpoint -> COCO results with compressed-RLE masks."""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances

from detectors.base import ImagesArg, read_image_records
from detectors.config import DetectorConfig
from detectors.results import coco_results
from detectors.torchvision_backend.dataset import CategoryMapping
from exits.data.images import image_file
from exits.engine.device import resolve_device


def load_trained_model(checkpoint: str | os.PathLike, cfg: DetectorConfig) -> tuple[torch.nn.Module, CfgNode, CategoryMapping]:
    """Model (eval mode, on ``cfg.device``), its Detectron2 config and the category mapping.

    The architecture and input sizes come from the Detectron2 config stored in the
    checkpoint (they must match the trained weights); device, score threshold and
    detections per image come from ``cfg``. No weight file other than ``checkpoint`` is read.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = state["meta"]
    if meta.get("backend") != "detectron2" or "detectron2_config" not in meta:
        raise ValueError(f"{checkpoint}: not a checkpoint of the detectron2 backend (backend={meta.get('backend')!r})")
    d2 = CfgNode.load_cfg(meta["detectron2_config"])
    d2.MODEL.WEIGHTS = ""
    d2.MODEL.DEVICE = str(resolve_device(cfg.device))
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(cfg.score_threshold)
    d2.TEST.DETECTIONS_PER_IMAGE = int(cfg.detections_per_image)
    model = build_model(d2)
    model.load_state_dict(state["model"])
    model.eval()
    return model, d2, CategoryMapping(meta["category_ids"])


def instances_to_results(instances: Instances, image_id: int, mapping: CategoryMapping) -> list[dict[str, Any]]:
    """Detectron2 ``Instances`` at original resolution -> COCO results.

    ``pred_masks`` (N, H, W) bool are the pasted, thresholded masks; ``pred_classes`` are
    contiguous 0..K-1 (category id = sorted ids[class]); bbox is the detector's box
    [x1, y1, x2, y2] as [x, y, w, h]; RLE counts are str so the results serialise to json.
    """
    n = len(instances)
    if n == 0:
        return []
    boxes = instances.pred_boxes.tensor.detach().cpu().numpy().astype(np.float64)
    scores = instances.scores.detach().cpu().numpy()
    classes = instances.pred_classes.detach().cpu().numpy()
    masks = instances.pred_masks.detach().cpu().numpy()
    return coco_results(image_id, boxes, scores, [mapping.category_ids[int(c)] for c in classes], masks)


@torch.no_grad()
def predict_images(
    checkpoint: str | os.PathLike,
    image_dir: str | os.PathLike,
    images: ImagesArg,
    cfg: DetectorConfig,
    image_ids: Iterable[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO results for every listed image (in ``cfg.batch_size`` batches).

    Images are read and resized by Detectron2's test-time DatasetMapper (the training
    input format and sizes); masks are pasted into the original image with
    ``cfg.mask_threshold`` (Detectron2's own postprocessing fixes 0.5).
    """
    model, d2, mapping = load_trained_model(checkpoint, cfg)
    mapper = DatasetMapper(d2, is_train=False)
    device = torch.device(d2.MODEL.DEVICE)
    use_amp = cfg.amp and device.type == "cuda"
    records = read_image_records(images, image_ids)
    results: list[dict[str, Any]] = []
    for start in range(0, len(records), cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        inputs = []
        for rec in chunk:
            item = {"file_name": str(image_file(image_dir, rec["file_name"])), "image_id": int(rec["id"])}
            if "height" in rec and "width" in rec:  # the mapper checks them against the file
                item.update(height=int(rec["height"]), width=int(rec["width"]))
            inputs.append(mapper(item))
        with torch.autocast(device_type=device.type, enabled=use_amp):
            raw = model.inference(inputs, do_postprocess=False)
        for inp, inst in zip(inputs, raw):
            inst = inst.to(torch.device("cpu"))
            if use_amp:  # half-precision outputs; pasting and RLE want float32
                inst.pred_boxes.tensor = inst.pred_boxes.tensor.float()
                inst.pred_masks = inst.pred_masks.float()
                inst.scores = inst.scores.float()
            inst = detector_postprocess(inst, inp["height"], inp["width"],
                                        mask_threshold=cfg.mask_threshold)
            results.extend(instances_to_results(inst, inp["image_id"], mapping))
    return results
