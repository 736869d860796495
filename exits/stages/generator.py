"""Stage 1c: the pseudo-label generator (ViT + mask decoder) trained on retrieved points.

L = λ_point · L_point + λ_crf · L_crf (EXITS eq. 12), with
L_point = Dice(M~ ⊙ K, Y^) + 1[nothing retrieved] · λ_mil · L_mil and
L_crf = Dice(M, CRF((M + M_teacher) / 2)), teacher = EMA of the student.
Point dropout: each epoch a random subset of the retrieved points (never the extreme-point
seeds or the outside-box background) is left out.

With ``use_retrieval=False`` this is the box-supervised baseline: λ_mil · L_mil + λ_crf · L_crf.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from exits.engine import TrainSettings, train
from exits.losses import crf_loss, mil_loss, point_loss
from exits.models import save_mask_model
from exits.propagation import seed_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratorLoss:
    lambda_point: float
    lambda_crf: float
    lambda_mil: float
    point_dropout: float
    crf_warmup_epochs: int
    crf_impl: str
    crf_params: dict[str, Any]
    use_retrieval: bool = True


def point_label_masks(points: pa.Table, crop_points: np.ndarray, crop_boxes: np.ndarray, crop_size: int,
                      grid: int, delta_px: float) -> dict[str, torch.Tensor]:
    """Per-object patch sets as (num_objects, N*N) bool tensors: seed_fg, seed_bg, pseudo_fg, pseudo_bg.

    Seeds are recomputed from the extreme points (cheap, exact), plus the BG seeds the
    retrieval took from the image's other objects (``seed_bg_extra``); retrieved sets come
    from the points table, whose rows are in dataset order.
    """
    n = grid * grid
    seeds = seed_masks(torch.from_numpy(crop_points).float(), torch.from_numpy(crop_boxes).float(),
                       crop_size, grid, delta_px)
    seed_bg = seeds.bg.clone()
    if points is not None and "seed_bg_extra" in points.column_names:
        for i, idx in enumerate(points.column("seed_bg_extra").to_pylist()):
            seed_bg[i, idx] = True
        seed_bg &= ~seeds.fg
    out = {"seed_fg": seeds.fg, "seed_bg": seed_bg,
           "pseudo_fg": torch.zeros((len(crop_points), n), dtype=torch.bool),
           "pseudo_bg": torch.zeros((len(crop_points), n), dtype=torch.bool)}
    if points is not None:
        for key in ("pseudo_fg", "pseudo_bg"):
            for i, idx in enumerate(points.column(key).to_pylist()):
                out[key][i, idx] = True
    return out


class GeneratorTask:
    """Turns a batch of crops into the EXITS stage-1c loss (see module docstring)."""

    def __init__(self, labels: dict[str, torch.Tensor], grid: int, loss: GeneratorLoss):
        self.labels = labels
        self.grid = grid
        self.cfg = loss
        self.keep_fg = labels["pseudo_fg"]
        self.keep_bg = labels["pseudo_bg"]

    def on_epoch_start(self, epoch: int, rng: np.random.Generator) -> None:
        p = self.cfg.point_dropout
        if p <= 0:
            return
        shape = tuple(self.labels["pseudo_fg"].shape)
        self.keep_fg = self.labels["pseudo_fg"] & torch.from_numpy(rng.random(shape) >= p)
        self.keep_bg = self.labels["pseudo_bg"] & torch.from_numpy(rng.random(shape) >= p)

    def targets(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Y^ (B, N, N), K (B, N, N) and has_retrieved (B,) for the batch's objects."""
        idx = index.cpu()
        fg = self.labels["seed_fg"][idx] | self.keep_fg[idx]
        retrieved = self.keep_fg[idx] | self.keep_bg[idx]
        labelled = fg | self.labels["seed_bg"][idx] | self.keep_bg[idx]
        shape = (len(idx), self.grid, self.grid)
        return (fg.reshape(shape).to(device), labelled.reshape(shape).to(device), retrieved.any(dim=1).to(device))

    def loss(self, model: nn.Module, batch: dict, teacher: nn.Module | None, epoch: int) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        images = batch["image"]
        prob = torch.sigmoid(model(images).float())
        parts: dict[str, float] = {}
        if c.use_retrieval:
            target, labelled, has_retrieved = self.targets(batch["index"], images.device)
            l_point = point_loss(prob, target, labelled, has_retrieved, box_mask=batch["box_mask"], lambda_mil=c.lambda_mil)
            parts["retrieved_frac"] = float(has_retrieved.float().mean())
        else:
            l_point = c.lambda_mil * mil_loss(prob[:, 0], batch["box_mask"])
        total = c.lambda_point * l_point
        parts["point"] = float(l_point.detach())
        if c.lambda_crf > 0 and teacher is not None and epoch >= c.crf_warmup_epochs:
            with torch.no_grad():
                teacher_prob = torch.sigmoid(teacher(images).float())
            l_crf = crf_loss(prob, teacher_prob, images, impl=c.crf_impl, **c.crf_params)
            total = total + c.lambda_crf * l_crf
            parts["crf"] = float(l_crf.detach())
        return total, parts


def train_generator(model: nn.Module, dataset: torch.utils.data.Dataset, task: GeneratorTask,
                    settings: TrainSettings, out_path: Path, progress: bool = True) -> Path:
    """Train the generator; save the EMA teacher (the smoother of the two) to ``out_path``."""
    result = train(model, dataset, task, settings, progress=progress)
    final = result.teacher if result.teacher is not None else result.model
    save_mask_model(out_path, final, extra={"stage": "generator", "history": result.history})
    log.info("generator: final loss %.4f", result.history[-1]["loss"])
    return out_path
