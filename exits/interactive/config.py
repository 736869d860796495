"""Settings of the spot-fix click model: a frozen dataclass of plain values.

The run config's ``click_model:`` YAML section maps onto :class:`ClickModelConfig`
one-to-one (``from_dict`` rejects unknown keys); the decoder, the trainer and the
evaluation read only this object.
"""
from __future__ import annotations

from dataclasses import dataclass

from exits.settings import FrozenSettings

LOSSES = ("nfl", "bce_dice")
TRAIN_SOURCES = ("pseudo", "coco")


@dataclass(frozen=True)
class ClickModelConfig(FrozenSettings):
    """Decoder architecture, click encoding, training and inference settings.

    Decoder parts (each switchable for ablations): ``use_imsa`` interactive attention
    (InterFormer I-MSA), ``use_spm`` max/min cosine-similarity propagation (SPM),
    ``use_prototypes`` SGC prototypes + GPA allocation (ASGNet), ``use_zoom`` zoom-in on the
    region of interest (IAM), ``progressive`` CDNet progressive mode (inference only).

    Click encoding: ``disk_radius`` in crop pixels (the crop is the encoder's input size,
    e.g. 96 for the demo generator). Zoom: the RoI is the box of the previous mask and all clicks, grown
    by ``zoom_expand`` (1.4 as in RITM / InterFormer) and at least ``zoom_min_fraction`` of
    the crop side. ``decode_size``: the decoder works at Z = min(S, decode_size) pixels (the
    RoI, or the whole crop, is resampled to Z x Z and the logits pasted back to S x S), so a
    512 crop costs what a 256 one does; likewise the token grid is resampled to at most
    ``max_grid`` x ``max_grid`` cells for the click-level parts (a 512 crop's 64 x 64 grid is
    averaged 2 x 2; the 96 crop's 12 x 12 grid is untouched).

    Training: ``train_source`` "pseudo" uses the run's pseudo masks with the highest
    ``score`` (``train_top_fraction`` of them, at most ``max_train_objects``); "coco" uses
    the GT masks of the explicitly given ``train_json``. Iterative click simulation: a
    random number of rounds in [0, ``max_sim_rounds``] per batch, with probability
    ``p_start_from_mask`` starting from a corrupted copy of the target (editing a mask)
    instead of from scratch. ``loss``: "nfl" (normalized focal loss, gamma ``focal_gamma``)
    or "bce_dice".
    """

    dim: int = 64
    heads: int = 4
    imsa_depth: int = 1
    pool_sizes: tuple[int, ...] = (1, 2, 4, 6)
    use_imsa: bool = True
    use_spm: bool = True
    use_prototypes: bool = True
    use_zoom: bool = True
    progressive: bool = True
    enforce_clicks: bool = True
    max_prototypes: int = 4
    cells_per_prototype: int = 12
    sgc_iters: int = 8
    disk_radius: float = 3.0
    zoom_expand: float = 1.4
    zoom_min_fraction: float = 0.4
    decode_size: int = 256
    max_grid: int = 32
    train_source: str = "pseudo"
    train_json: str | None = None
    train_top_fraction: float = 0.6
    max_train_objects: int = 2000
    iterations: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_sim_rounds: int = 3
    p_start_from_mask: float = 0.5
    loss: str = "nfl"
    focal_gamma: float = 2.0
    max_clicks: int = 20
    device: str = "cpu"
    seed: int = 0
    feature_cache_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool_sizes", tuple(int(s) for s in self.pool_sizes))
        errors = []
        if self.loss not in LOSSES:
            errors.append(f"loss: {self.loss!r} is not one of {list(LOSSES)}")
        if self.train_source not in TRAIN_SOURCES:
            errors.append(f"train_source: {self.train_source!r} is not one of {list(TRAIN_SOURCES)}")
        if self.train_source == "coco" and not self.train_json:
            errors.append("train_source 'coco' needs train_json (a COCO json with masks for click training)")
        for name in ("dim", "heads", "iterations", "batch_size", "max_prototypes",
                     "cells_per_prototype", "max_clicks", "max_train_objects", "feature_cache_size", "decode_size", "max_grid"):
            if int(getattr(self, name)) < 1:
                errors.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("imsa_depth", "sgc_iters", "max_sim_rounds", "seed"):
            if int(getattr(self, name)) < 0:
                errors.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.dim % self.heads:
            errors.append(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not self.pool_sizes or any(s < 1 for s in self.pool_sizes):
            errors.append(f"pool_sizes: need positive sizes, got {list(self.pool_sizes)}")
        if not self.disk_radius > 0:
            errors.append(f"disk_radius: must be > 0, got {self.disk_radius}")
        if not self.zoom_expand >= 1:
            errors.append(f"zoom_expand: must be >= 1, got {self.zoom_expand}")
        if not 0 < self.zoom_min_fraction <= 1:
            errors.append(f"zoom_min_fraction: must be in (0, 1], got {self.zoom_min_fraction}")
        for name in ("train_top_fraction",):
            if not 0 < getattr(self, name) <= 1:
                errors.append(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.p_start_from_mask <= 1:
            errors.append(f"p_start_from_mask: must be in [0, 1], got {self.p_start_from_mask}")
        if not self.lr > 0 or self.weight_decay < 0 or self.focal_gamma < 0:
            errors.append("lr must be > 0; weight_decay and focal_gamma >= 0")
        if errors:
            raise ValueError("invalid ClickModelConfig: " + "; ".join(errors))
