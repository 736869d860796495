"""Stage 1a: the similarity extractor, a ViT trained a few epochs with the box MIL loss.

Its self-attention then defines the patch graph of point retrieval (stage 1b). Random-init
or ImageNet ViT attention does not separate object from background; a few epochs of MIL
on the target data make it object-aware (EXITS, sec. "Constructing Transition Probability
Matrix").
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from exits.engine import TrainSettings, train
from exits.engine.distributed import is_main_process
from exits.losses import mil_loss
from exits.models import save_mask_model
from exits.models.mask_model import MaskModel

log = logging.getLogger(__name__)


class MilTask:
    """L = L_mil(sigmoid(model(crop)), box mask): Dice of row/column max-projections."""

    def loss(self, model: nn.Module, batch: dict, teacher: nn.Module | None, epoch: int) -> tuple[torch.Tensor, dict]:
        prob = torch.sigmoid(model(batch["image"]).float())
        loss = mil_loss(prob[:, 0], batch["box_mask"])
        return loss, {"mil": float(loss.detach())}


def train_similarity_extractor(model: MaskModel, dataset: torch.utils.data.Dataset, settings: TrainSettings,
                               out_path: Path, progress: bool = True) -> Path:
    """Train ``model`` with the MIL loss and save it (frozen from here on) to ``out_path``.

    Under DDP every rank trains (identical weights); rank 0 alone writes ``out_path``."""
    result = train(model, dataset, MilTask(), settings, progress=progress)
    if is_main_process():
        save_mask_model(out_path, result.model, extra={"stage": "similarity", "history": result.history})
        log.info("similarity extractor: final MIL loss %.4f", result.history[-1]["loss"])
    return out_path
