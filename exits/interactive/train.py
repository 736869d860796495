"""Training the click decoder with iterative click simulation (RITM-style) on cached features.

Per batch (targets = the chosen training masks, see :mod:`exits.interactive.data`):
  1. start: with probability ``p_start_from_mask`` a corrupted copy of the target (an
     existing mask to edit: dilated/eroded, a part dropped, a blob added), else nothing;
  2. first click at the centre of the largest error region of the start;
  3. r ~ U{0..max_sim_rounds} rounds without gradient: predict, feed the prediction back
     as the previous mask, click at the centre of the largest error region of it;
  4. one prediction with gradient; loss (NFL or BCE + Dice) against the target.
The encoder is frozen: its tokens are computed once for all training crops.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from exits.interactive.clicks import Click
from exits.interactive.config import ClickModelConfig
from exits.interactive.data import ClickTrainingSet, build_training_set
from exits.interactive.decoder import ClickDecoder
from exits.interactive.features import encode_crops
from exits.interactive.inference import decode_logits, decode_probs
from exits.interactive.losses import click_loss
from exits.interactive.model_io import CLICK_MODEL_PATH, GENERATOR_PATH, save_click_model
from exits.interactive.robot import largest_error_click
from exits.models.checkpoint import load_mask_model

__all__ = ["corrupt_mask", "simulate_clicks", "train_click_decoder", "train_click_model"]

log = logging.getLogger(__name__)


def corrupt_mask(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible imperfect mask of ``target`` (S, S) bool: grow or shrink by 1-4 px, drop
    one connected part (when there are several) with prob. 0.3, add a random disk blob near
    the object with prob. 0.5."""
    out = np.asarray(target, bool).copy()
    iters = int(rng.integers(1, 5))
    out = ndimage.binary_dilation(out, iterations=iters) if rng.random() < 0.5 else ndimage.binary_erosion(out, iterations=iters)
    labels, n = ndimage.label(out)
    if n > 1 and rng.random() < 0.3:
        out &= labels != int(rng.integers(1, n + 1))
    if rng.random() < 0.5:
        s = out.shape[0]
        rows, cols = np.nonzero(target) if target.any() else (np.array([s // 2]), np.array([s // 2]))
        k = int(rng.integers(len(rows)))
        cy, cx = rows[k] + rng.normal(0, s / 8), cols[k] + rng.normal(0, s / 8)
        r = rng.uniform(s / 24, s / 8)
        yy, xx = np.mgrid[:s, :s]
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def simulate_clicks(decoder: ClickDecoder, tokens: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor,
                    targets: np.ndarray, config: ClickModelConfig, rng: np.random.Generator
                    ) -> tuple[list[list[Click]], list[np.ndarray | None]]:
    """Clicks and previous masks for the final (gradient) step of a batch; see module doc."""
    prevs: list[np.ndarray | None] = []
    clicks: list[list[Click]] = []
    for target in targets:
        prev = corrupt_mask(target, rng) if rng.random() < config.p_start_from_mask else None
        first = largest_error_click(target, prev if prev is not None else np.zeros_like(target))
        prevs.append(prev)
        clicks.append([first] if first is not None else [])
    for _ in range(int(rng.integers(0, config.max_sim_rounds + 1))):
        preds = decode_probs(decoder, tokens, grid, crops, clicks, prevs) > 0.5
        for i, target in enumerate(targets):
            prevs[i] = preds[i]
            nxt = largest_error_click(target, preds[i])
            if nxt is not None:
                clicks[i].append(nxt)
    return clicks, prevs


def _lr_factor(step: int, total: int, warmup: int = 20) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_click_decoder(tokens: torch.Tensor, grid: tuple[int, int], train_set: ClickTrainingSet,
                        config: ClickModelConfig, *, iterations: int | None = None, progress: bool = False
                        ) -> tuple[ClickDecoder, list[float]]:
    """Train a fresh decoder on cached ``tokens`` (K, L, C) of ``train_set``; returns it
    (eval mode) and the loss of every iteration."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    decoder = ClickDecoder(config, tokens.shape[-1]).to(device)
    optim = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = int(iterations if iterations is not None else config.iterations)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, total))
    targets_np = train_set.targets.numpy()
    history: list[float] = []
    for step in range(total):
        idx = rng.choice(len(train_set), size=min(config.batch_size, len(train_set)), replace=False)
        tok = tokens[idx].to(device)
        crops = train_set.crops[idx].float().div(255).to(device)
        target = targets_np[idx]
        decoder.eval()
        clicks, prevs = simulate_clicks(decoder, tok, grid, crops, target, config, rng)
        decoder.train()
        logits = decode_logits(decoder, tok, grid, crops, clicks, prevs)
        loss = click_loss(config.loss, logits, torch.from_numpy(target).to(device), config.focal_gamma)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optim.step()
        sched.step()
        history.append(float(loss.detach()))
        if progress and (step % 50 == 0 or step == total - 1):
            log.info("click model step %d/%d loss %.4f", step + 1, total, float(np.mean(history[-50:])))
    return decoder.eval(), history


def train_click_model(workdir: str | Path, config: ClickModelConfig, *, out_path: str | Path | None = None,
                      exclude: set[int] | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train on the run's masks and write WORKDIR/click_model/model.pt (or ``out_path``).

    Returns the path and a summary {objects, iterations, first/last loss, source}.
    """
    workdir = Path(workdir)
    encoder = load_mask_model(workdir / GENERATOR_PATH, map_location=config.device)
    crop_size = int(encoder.img_size)
    train_set = build_training_set(workdir, crop_size, source=config.train_source,
                                   top_fraction=config.train_top_fraction, max_objects=config.max_train_objects,
                                   train_json=config.train_json, exclude=exclude)
    tokens, grid = encode_crops(encoder, train_set.crops.float().div(255))
    decoder, history = train_click_decoder(tokens, grid, train_set, config, progress=progress)
    k = max(1, min(20, len(history) // 5))
    summary = {"objects": len(train_set), "iterations": len(history), "source": config.train_source,
               "loss_first": float(np.mean(history[:k])), "loss_last": float(np.mean(history[-k:]))}
    path = Path(out_path) if out_path is not None else workdir / CLICK_MODEL_PATH
    save_click_model(path, decoder.cpu(), encoder_path=str(GENERATOR_PATH), crop_size=crop_size,
                     extra={"train_summary": summary, "train_ann_ids": train_set.ann_ids})
    return path, summary
