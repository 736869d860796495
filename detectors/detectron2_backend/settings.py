"""A Detectron2 config (``CfgNode``) from a :class:`DetectorConfig`.

The model comes from ``cfg.detectron2_config`` (any Detectron2 yaml, ``_BASE_`` chains
resolved by Detectron2) or, when ``None``, the built-in Mask R-CNN R50-FPN below. The run's
settings then override the yaml: schedule, batch, sizes, classes, device, seed, weights.
Weights are only ever local files (``MODEL.WEIGHTS`` is never a URL): a model-zoo yaml's
``detectron2://...`` weights are replaced, by ``""`` when no file is configured. From random
init, ``FrozenBN`` (which would freeze the random statistics) becomes ``BN`` and no stage
is frozen, as in the torchvision backend.
"""
from __future__ import annotations

import os
from pathlib import Path

from detectron2.config import CfgNode, get_cfg

from detectors.config import DetectorConfig
from exits.engine.device import resolve_device


def mask_rcnn_r50_fpn_cfg() -> CfgNode:
    """Detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`` model, in code.

    Why in code: the model-zoo yaml files live in the repository's ``configs/`` and are only
    copied into the package (``detectron2/model_zoo/configs``) by its setup.py, so a plain
    source checkout on ``PYTHONPATH`` has none. Values are those of ``Base-RCNN-FPN.yaml`` +
    ``mask_rcnn_R_50_FPN_3x.yaml`` (the test suite compares them when the yaml is at hand);
    the solver and input sections are set from the run's settings anyway.
    """
    cfg = get_cfg()
    m = cfg.MODEL
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.MASK_ON = True
    m.BACKBONE.NAME = "build_resnet_fpn_backbone"
    m.RESNETS.DEPTH = 50
    m.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    m.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    m.RPN.PRE_NMS_TOPK_TRAIN = 2000
    m.RPN.PRE_NMS_TOPK_TEST = 1000
    m.RPN.POST_NMS_TOPK_TRAIN = 1000
    m.RPN.POST_NMS_TOPK_TEST = 1000
    m.ROI_HEADS.NAME = "StandardROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    m.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    m.ROI_MASK_HEAD.NUM_CONV = 4
    m.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    return cfg


def base_cfg(detectron2_config: str | os.PathLike | None) -> CfgNode:
    """The model's config: a Detectron2 yaml file, or the built-in R50-FPN Mask R-CNN."""
    if detectron2_config is None:
        return mask_rcnn_r50_fpn_cfg()
    path = Path(detectron2_config)
    if not path.is_file():
        raise FileNotFoundError(f"detectron2_config: no such file: {path}")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def train_size_range(min_size: int, max_size: int, scale_jitter: tuple[float, float] | None) -> tuple[tuple[int, ...], str, int]:
    """(``INPUT.MIN_SIZE_TRAIN``, ``MIN_SIZE_TRAIN_SAMPLING``, ``MAX_SIZE_TRAIN``).

    Scale jitter (low, high) becomes Detectron2's multi-scale training: the short side is
    drawn uniformly from [round(low * min_size), round(high * min_size)] and the long side
    capped at round(high * max_size), i.e. the image is rescaled by a factor in about
    [low, high] relative to the test size (the torchvision backend rescales its content on a
    fixed canvas instead; the range of object scales seen is the same).
    """
    if scale_jitter is None:
        return (int(min_size),), "choice", int(max_size)
    lo, hi = scale_jitter
    return (max(1, round(lo * min_size)), max(1, round(hi * min_size))), "range", max(1, round(hi * max_size))


def build_detectron2_cfg(
    cfg: DetectorConfig,
    num_classes: int,
    train_dataset: str,
    test_dataset: str | None,
    output_dir: str | os.PathLike,
) -> CfgNode:
    """The full Detectron2 config of a training run (``num_classes`` = K, background excluded).

    Our own settings without a Detectron2 key live under ``EXITS`` (optimizer name and
    full-model gradient-norm clipping: Detectron2's own clipping is per parameter).
    """
    d2 = base_cfg(cfg.detectron2_config)
    if not d2.MODEL.MASK_ON:
        raise ValueError(f"{cfg.detectron2_config}: MODEL.MASK_ON is False; stage 2 needs an instance segmenter")
    device = resolve_device(cfg.device)
    weights = cfg.weights_path or cfg.backbone_weights_path
    d2.MODEL.WEIGHTS = str(weights) if weights else ""
    if not weights:
        if d2.MODEL.RESNETS.NORM == "FrozenBN":
            d2.MODEL.RESNETS.NORM = "BN"
        d2.MODEL.BACKBONE.FREEZE_AT = 0
    d2.MODEL.DEVICE = str(device)
    d2.MODEL.ROI_HEADS.NUM_CLASSES = int(num_classes)
    d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = int(cfg.roi_batch_size_per_image)
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(cfg.score_threshold)
    d2.TEST.DETECTIONS_PER_IMAGE = int(cfg.detections_per_image)

    min_train, sampling, max_train = train_size_range(cfg.min_size, cfg.max_size, cfg.scale_jitter)
    d2.INPUT.MIN_SIZE_TRAIN = min_train
    d2.INPUT.MIN_SIZE_TRAIN_SAMPLING = sampling
    d2.INPUT.MAX_SIZE_TRAIN = max_train
    d2.INPUT.MIN_SIZE_TEST = int(cfg.min_size)
    d2.INPUT.MAX_SIZE_TEST = int(cfg.max_size)
    d2.INPUT.RANDOM_FLIP = "horizontal" if cfg.hflip else "none"
    d2.INPUT.MASK_FORMAT = "bitmask"  # dataset dicts carry RLE

    d2.DATASETS.TRAIN = (train_dataset,)
    d2.DATASETS.TEST = (test_dataset,) if test_dataset else ()
    d2.DATALOADER.NUM_WORKERS = int(cfg.num_workers)
    d2.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    if cfg.repeat_factor_threshold is not None:  # LVIS: Detectron2's own repeat-factor sampler
        d2.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
        d2.DATALOADER.REPEAT_THRESHOLD = float(cfg.repeat_factor_threshold)

    s = d2.SOLVER
    s.IMS_PER_BATCH = int(cfg.batch_size)
    s.REFERENCE_WORLD_SIZE = 0
    s.BASE_LR = float(cfg.lr)
    s.MOMENTUM = float(cfg.momentum)
    s.WEIGHT_DECAY = float(cfg.weight_decay)
    s.MAX_ITER = int(cfg.iterations)
    s.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    # Same schedule as the torchvision backend: lr * (wf + (1 - wf) t / W) for t < W, then
    # lr * gamma ** #{steps <= t}.
    s.STEPS = tuple(int(v) for v in cfg.lr_steps)
    s.GAMMA = float(cfg.lr_gamma)
    s.WARMUP_ITERS = int(cfg.warmup_iters)
    s.WARMUP_FACTOR = float(cfg.warmup_factor)
    s.WARMUP_METHOD = "linear"
    s.CHECKPOINT_PERIOD = int(cfg.checkpoint_every) or int(cfg.iterations)
    s.CLIP_GRADIENTS.ENABLED = False  # full-model clipping is done by the trainer's optimizer
    s.AMP.ENABLED = bool(cfg.amp and device.type == "cuda")

    d2.TEST.EVAL_PERIOD = int(cfg.eval_period)
    d2.SEED = int(cfg.seed)
    d2.OUTPUT_DIR = str(Path(output_dir))
    d2.VIS_PERIOD = 0
    d2.EXITS = CfgNode()
    d2.EXITS.OPTIMIZER = cfg.optimizer
    d2.EXITS.GRAD_CLIP_NORM = float(cfg.grad_clip_norm) if cfg.grad_clip_norm is not None else 0.0
    return d2
