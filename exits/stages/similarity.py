"""Stage 1a: the similarity extractor, a ViT trained a few epochs with the box MIL loss.

Its self-attention then defines the patch graph of point retrieval (stage 1b). Random-init
or ImageNet ViT attention does not separate object from background; a few epochs of MIL
on the target data make it object-aware (EXITS, sec. "Constructing Transition Probability
Matrix").

Optionally (``similarity.warm_start.method: simmim``) the ViT is first pre-trained without any
label on the run's own crops by masked-image modelling (:func:`warm_start_backbone`), for
users whose domain no pretrained checkpoint covers; the MIL epochs then start from it.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from exits.engine import TrainSettings, train
from exits.losses import mil_loss
from exits.models import save_mask_model
from exits.models.mask_model import MaskModel
from exits.models.masked_image_modeling import SimMIM, block_mask
from exits.models.vit import grid_size

log = logging.getLogger(__name__)


class MilTask:
    """L = L_mil(sigmoid(model(crop)), box mask): Dice of row/column max-projections."""

    def loss(self, model: nn.Module, batch: dict, teacher: nn.Module | None, epoch: int) -> tuple[torch.Tensor, dict]:
        prob = torch.sigmoid(model(batch["image"]).float())
        loss = mil_loss(prob[:, 0], batch["box_mask"])
        return loss, {"mil": float(loss.detach())}


class MaskedImageModelingTask:
    """L = SimMIM masked L1 (``exits.models.masked_image_modeling``) of the crops, a random
    horizontal flip per crop and a fresh block mask per step; reads ``batch["image"]`` only
    (no box, no points, no mask)."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float, block: int) -> None:
        self.grid, self.mask_ratio, self.block = grid, mask_ratio, block

    def loss(self, model: nn.Module, batch: dict, teacher: nn.Module | None, epoch: int) -> tuple[torch.Tensor, dict]:
        images = batch["image"]
        # The crops are few (hundreds in the demo): flips double them at no cost. The train
        # loop seeds torch's RNG per run/epoch, so masks and flips are reproducible.
        flip = torch.rand(images.shape[0]) < 0.5
        images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
        mask = block_mask(images.shape[0], self.grid, self.mask_ratio, self.block, device=images.device)
        loss = model(images, mask)
        return loss, {"mim": float(loss.detach())}


def warm_start_backbone(model: MaskModel, dataset: torch.utils.data.Dataset, settings: TrainSettings, *,
                        mask_ratio: float = 0.6, block: int = 2, progress: bool = True) -> list[dict]:
    """SimMIM pre-training of ``model.backbone`` in place (the decoder is untouched); returns
    the per-epoch history. Checkpoints go to ``settings.checkpoint_dir``/warm_start, so a
    killed run resumes the warm start and the MIL epochs separately."""
    mim = SimMIM(model.backbone, model.pixel_mean, model.pixel_std, mask_ratio=mask_ratio, block=block)
    task = MaskedImageModelingTask(grid_size(model.backbone), mask_ratio, block)
    if settings.checkpoint_dir is not None:
        settings = dataclasses.replace(settings, checkpoint_dir=str(Path(settings.checkpoint_dir) / "warm_start"))
    result = train(mim, dataset, task, settings, progress=progress)
    model.backbone.load_state_dict(result.model.backbone.state_dict())
    log.info("similarity warm start (SimMIM): final masked L1 %.4f", result.history[-1]["loss"])
    return result.history


def train_similarity_extractor(model: MaskModel, dataset: torch.utils.data.Dataset, settings: TrainSettings,
                               out_path: Path, progress: bool = True, warm_start: TrainSettings | None = None,
                               mask_ratio: float = 0.6, mask_block: int = 2) -> Path:
    """Train ``model`` with the MIL loss and save it (frozen from here on) to ``out_path``.

    ``warm_start``: settings of an optional SimMIM pre-training run before the MIL epochs
    (:func:`warm_start_backbone`); None = start from the model's current weights.
    """
    extra: dict = {"stage": "similarity"}
    if warm_start is not None:
        extra["warm_start_history"] = warm_start_backbone(model, dataset, warm_start, mask_ratio=mask_ratio,
                                                          block=mask_block, progress=progress)
    result = train(model, dataset, MilTask(), settings, progress=progress)
    save_mask_model(out_path, result.model, extra={**extra, "history": result.history})
    log.info("similarity extractor: final MIL loss %.4f", result.history[-1]["loss"])
    return out_path
