"""Settings of a stage-2 detector backend: a frozen dataclass of plain values.

The run config's typed ``detector:`` section maps onto this one-to-one; backends read only
this object, so they can be driven from Python, a CLI or a flow alike.
"""
from __future__ import annotations

from dataclasses import dataclass

from exits.settings import FrozenSettings

ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_mobilenet_v3_fpn")
OPTIMIZERS = ("sgd", "adamw")
BOX_SOURCES = ("annotation", "mask")


@dataclass(frozen=True)
class DetectorConfig(FrozenSettings):
    """Training and inference settings.

    Schedule: the learning rate at iteration ``t`` (0-based) is ``lr * f(t)`` with
    ``f(t) = warmup_factor + (1 - warmup_factor) * t / warmup_iters`` for ``t < warmup_iters``,
    then ``lr_gamma ** (number of lr_steps <= t)``.

    ``scale_jitter``: (low, high) range of the random rescale factor, or ``None`` for none.
    ``weights_path``: a local full Mask R-CNN state dict (heads whose shapes differ from the
    class count are skipped); ``backbone_weights_path``: a local classification-network state
    dict (ImageNet-style ResNet-50 / MobileNetV3-Large). ``None`` = random init. Nothing is
    ever downloaded. ``roi_batch_size_per_image``: sampled proposals per image for the box
    and mask heads in training (torchvision's 512; 64-128 makes CPU steps much cheaper).
    ``box_source``: training boxes from the json's ``bbox`` (``"annotation"``: in pseudo-label
    files the extreme-point box, exact even where the pseudo mask misses a part) or the tight
    box of the mask (``"mask"``). ``checkpoint_every``: iterations between checkpoints (0 = only the final
    one). ``device``: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    ``arch`` is read by the torchvision backend only. The detectron2 backend builds its model
    from ``detectron2_config``: a path to any Detectron2 yaml (``_BASE_`` chains allowed), or
    ``None`` for the built-in Mask R-CNN R50-FPN. There ``weights_path`` /
    ``backbone_weights_path`` are Detectron2-format files (``.pth`` / ``.pkl``).
    ``eval_json`` (+ ``eval_image_dir``, default: the training image dir): a GT json the
    detectron2 backend's trainer evaluates (COCOEvaluator, or LVISEvaluator for LVIS json)
    every ``eval_period`` iterations (0 = only after the last one).
    """

    backend: str = "torchvision"
    arch: str = "maskrcnn_mobilenet_v3_fpn"
    min_size: int = 192
    max_size: int = 256
    iterations: int = 200
    batch_size: int = 2
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    grad_clip_norm: float | None = 10.0
    hflip: bool = True
    scale_jitter: tuple[float, float] | None = (0.8, 1.25)
    amp: bool = True
    device: str = "auto"
    seed: int = 0
    weights_path: str | None = None
    backbone_weights_path: str | None = None
    checkpoint_every: int = 0
    num_workers: int = 0
    score_threshold: float = 0.05
    detections_per_image: int = 100
    roi_batch_size_per_image: int = 512
    mask_threshold: float = 0.5
    detectron2_config: str | None = None
    eval_json: str | None = None
    eval_image_dir: str | None = None
    eval_period: int = 0
    box_source: str = "annotation"
    repeat_factor_threshold: float | None = None

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples so the object stays hashable and immutable.
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        if self.scale_jitter is not None:
            object.__setattr__(self, "scale_jitter", tuple(float(v) for v in self.scale_jitter))
        errors = []
        if self.arch not in ARCHS:
            errors.append(f"arch: {self.arch!r} is not one of {list(ARCHS)}")
        if self.repeat_factor_threshold is not None and not 0 < self.repeat_factor_threshold <= 1:
            errors.append(f"repeat_factor_threshold: must be in (0, 1] or null, got {self.repeat_factor_threshold}")
        if self.box_source not in BOX_SOURCES:
            errors.append(f"box_source: {self.box_source!r} is not one of {list(BOX_SOURCES)}")
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"optimizer: {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        for name in ("min_size", "max_size", "iterations", "batch_size", "roi_batch_size_per_image", "detections_per_image"):
            if int(getattr(self, name)) < 1:
                errors.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_size > self.max_size:
            errors.append(f"min_size ({self.min_size}) must be <= max_size ({self.max_size})")
        for name in ("warmup_iters", "checkpoint_every", "num_workers", "seed", "eval_period"):
            if int(getattr(self, name)) < 0:
                errors.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            errors.append(f"lr: must be > 0, got {self.lr}")
        if not 0 < self.warmup_factor <= 1:
            errors.append(f"warmup_factor: must be in (0, 1], got {self.warmup_factor}")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s < 1 for s in self.lr_steps):
            errors.append(f"lr_steps: must be increasing positive iterations, got {list(self.lr_steps)}")
        if self.scale_jitter is not None:
            lo, hi = self.scale_jitter if len(self.scale_jitter) == 2 else (0.0, -1.0)
            if not 0 < lo <= hi:
                errors.append(f"scale_jitter: expected (low, high) with 0 < low <= high, got {self.scale_jitter}")
        if not 0 <= self.mask_threshold <= 1 or not 0 <= self.score_threshold <= 1:
            errors.append("mask_threshold and score_threshold must be in [0, 1]")
        if self.detectron2_config is not None and not str(self.detectron2_config).endswith((".yaml", ".yml")):
            errors.append(f"detectron2_config: expected a Detectron2 .yaml file, got {self.detectron2_config!r}")
        if errors:
            raise ValueError("invalid DetectorConfig: " + "; ".join(errors))
