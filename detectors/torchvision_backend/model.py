"""Mask R-CNN builders (torchvision), never downloading anything.

Every torchvision builder is called with ``weights=None, weights_backbone=None`` (their
defaults download from the internet). Pretrained weights come only from local files:
``backbone_weights_path`` (classification network state dict) or ``weights_path`` (a full
Mask R-CNN state dict, e.g. COCO-trained; class-specific heads of another shape are
skipped and re-initialised). With backbone weights, BatchNorm is frozen (the usual
fine-tuning recipe); from random init it trains (plain BatchNorm), as torchvision does.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from detectors.config import DetectorConfig

log = logging.getLogger(__name__)

# MobileNetV3 FPN levels: strides 8, 16, 32 (+ max-pool level). Stride 8 is kept (torchvision's
# detection variant starts at 16) because pseudo-labelled objects are often small.
_MOBILENET_RETURNED_STAGES = [3, 4, 5]
_MOBILENET_ANCHORS = ((16, 32, 64, 128, 256),) * 4


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_backbone_weights(body: nn.Module, path: str | os.PathLike, prefix: str) -> None:
    """Load a classification state dict into the FPN body (keys ``prefix`` stripped)."""
    state = {k[len(prefix):]: v for k, v in _load_state(path).items() if k.startswith(prefix)}
    missing, _ = body.load_state_dict(state, strict=False)
    # The classifier head (resnet "fc", mobilenet "classifier") is not part of the detector.
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith(("fc.", "classifier."))]
    if missing:
        raise ValueError(f"{path}: backbone weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    log.info("loaded backbone weights from %s", path)


def load_detector_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a full Mask R-CNN state dict; tensors of another shape are skipped (returned)."""
    own = model.state_dict()
    state = _load_state(path)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in usable)
    missing = sorted(k for k in own if k not in usable)
    if not usable:
        raise ValueError(f"{path}: no tensor matches the {type(model).__name__} being built")
    model.load_state_dict(usable, strict=False)
    if skipped or missing:
        log.warning("%s: %d tensors skipped (shape/name mismatch), %d left at init: %s",
                    path, len(skipped), len(missing), missing[:6])
    return skipped


def build_model(cfg: DetectorConfig, num_classes: int, load_weights: bool = True) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` (background included) as configured by ``cfg.arch``.

    ``load_weights=False`` builds the same structure (frozen BatchNorm when a backbone file
    is configured) without reading any weight file, for loading a trained checkpoint.
    """
    pretrained_backbone = cfg.backbone_weights_path is not None
    norm_layer = FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d
    common = dict(
        num_classes=num_classes,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        box_score_thresh=cfg.score_threshold,
        box_detections_per_img=cfg.detections_per_image,
        box_batch_size_per_image=cfg.roi_batch_size_per_image,
    )
    if cfg.arch == "maskrcnn_resnet50_fpn":
        if pretrained_backbone:
            body = resnet50(weights=None, norm_layer=norm_layer)
            if load_weights:
                _load_backbone_weights(body, cfg.backbone_weights_path, prefix="")
            backbone = _resnet_fpn_extractor(body, trainable_layers=3)
            model = MaskRCNN(backbone, **common)
        else:
            model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **common)
    elif cfg.arch == "maskrcnn_mobilenet_v3_fpn":
        net = mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        if pretrained_backbone and load_weights:
            _load_backbone_weights(net, cfg.backbone_weights_path, prefix="")
        # All layers train from random init; with ImageNet weights the early ones stay frozen.
        backbone = _mobilenet_extractor(
            net, fpn=True, trainable_layers=3 if pretrained_backbone else 6,
            returned_layers=_MOBILENET_RETURNED_STAGES,
        )
        anchors = AnchorGenerator(_MOBILENET_ANCHORS, ((0.5, 1.0, 2.0),) * len(_MOBILENET_ANCHORS))
        model = MaskRCNN(backbone, rpn_anchor_generator=anchors, **common)
    else:  # DetectorConfig validates arch; kept for direct callers
        raise ValueError(f"unknown arch {cfg.arch!r}")
    if cfg.weights_path is not None and load_weights:
        load_detector_weights(model, cfg.weights_path)
    return model
