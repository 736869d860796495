"""Training loop for torchvision Mask R-CNN: iterations, warm-up + step decay, checkpoints.

Exact resume: batch ``i`` is a pure function of (seed, i): the image order is a stream of
per-epoch permutations seeded by (seed, epoch), and each sample's augmentation generator
is seeded by (seed, i, slot); the global torch generator (Mask R-CNN's proposal sampling)
is reseeded by (seed, i) before each step. A checkpoint stores model, optimizer, scheduler and AMP scaler
states and the iteration; resuming replays the same batches a straight run would see.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from detectors.config import DetectorConfig
from detectors.torchvision_backend.dataset import CocoInstanceDataset, collate
from detectors.torchvision_backend.sampling import IterationBatchSampler, mix_seed, repeat_factors
from exits.engine.device import resolve_device
from exits.io import atomic_path, write_json

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint.pth"
FINAL_CHECKPOINT = "model_final.pth"
TRAIN_LOG = "train_log.json"


def lr_factor(iteration: int, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based).

    f(t) = warmup_factor + (1 - warmup_factor) * t / warmup_iters   for t < warmup_iters,
    f(t) = gamma ** #{s in steps : s <= t}                          otherwise.
    """
    if iteration < warmup_iters:
        return warmup_factor + (1.0 - warmup_factor) * iteration / warmup_iters
    return gamma ** sum(1 for s in steps if s <= iteration)


def _build_optimizer(model: torch.nn.Module, cfg: DetectorConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    keys = ("boxes", "labels", "masks")
    return [{k: t[k].to(device, non_blocking=True) for k in keys} for t in targets]


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict[str, Any], **states: Any) -> Path:
    """Atomically save ``{"model": state_dict, "meta": meta, **states}``."""
    payload = {"model": model.state_dict(), "meta": meta}
    payload.update({k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in states.items()})
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def train_model(
    model: torch.nn.Module,
    dataset: CocoInstanceDataset,
    cfg: DetectorConfig,
    out_dir: str | Path,
    meta: dict[str, Any],
) -> Path:
    """Train ``model`` for ``cfg.iterations``; return the final checkpoint path.

    Resumes from ``out_dir/last_checkpoint.pth`` when present. Writes ``train_log.json``
    (per-iteration losses and learning rate) beside the checkpoints.

    Raises:
        FloatingPointError: a non-finite loss (names the iteration and the loss terms).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # model init happened before; this seeds anything random in the loop
    random.seed(cfg.seed)
    model.to(device).train()
    optimizer = _build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: lr_factor(t, cfg.warmup_iters, cfg.warmup_factor, cfg.lr_steps, cfg.lr_gamma)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[dict[str, float]] = []
    start = 0
    final_path, last_path = out / FINAL_CHECKPOINT, out / LAST_CHECKPOINT
    resume_from = last_path if last_path.exists() else None
    if resume_from is not None:
        state = torch.load(resume_from, map_location=device, weights_only=True)
        if state["meta"].get("category_ids") != meta.get("category_ids"):
            raise ValueError(f"{resume_from} was trained on other categories; use a fresh out_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        history = list(state.get("history", []))
        log.info("resuming from %s at iteration %d", resume_from, start)
        if start >= cfg.iterations and final_path.exists():
            return final_path

    factors = None
    if cfg.repeat_factor_threshold is not None:
        factors = repeat_factors(dataset.image_labels(), cfg.repeat_factor_threshold)
        log.info("repeat-factor sampling (t=%g): %.2f images per epoch per image on average, max factor %.1f",
                 cfg.repeat_factor_threshold, float(factors.mean()), float(factors.max()))
    sampler = IterationBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start, cfg.iterations, factors)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        # Forked workers of a process that has run a Prefect flow (stage 2 inside `exits run`)
        # exit at once with status 1; a fork server's workers do not (as in exits.engine.loop).
        multiprocessing_context="forkserver" if cfg.num_workers > 0 else None,
    )
    meta = {**meta, "config": cfg.to_dict()}
    iteration = start
    tick = time.perf_counter()
    for images, targets in loader:
        # The model draws random numbers too (RPN / RoI sampling): reseeding the global
        # generator per iteration makes them a function of (seed, iteration) as well.
        torch.manual_seed(mix_seed(cfg.seed, iteration, 2))
        images = [im.to(device, non_blocking=True) for im in images]
        with torch.autocast(device_type=device.type, enabled=use_amp):
            losses = model(images, _to_device(targets, device))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            terms = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"non-finite loss at iteration {iteration}: {terms}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        record = {"iteration": iteration, "lr": optimizer.param_groups[0]["lr"], "loss": float(loss.detach()),
                  "seconds": time.perf_counter() - tick}
        record.update({k: float(v.detach()) for k, v in losses.items()})
        history.append(record)
        scheduler.step()
        iteration += 1
        tick = time.perf_counter()
        if iteration % 20 == 0 or iteration == start + 1:
            log.info("iter %d/%d loss %.4f lr %.2e", iteration, cfg.iterations, record["loss"], record["lr"])
        if cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0 and iteration < cfg.iterations:
            save_checkpoint(last_path, model, meta, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            iteration=iteration, history=history)
    save_checkpoint(last_path, model, meta, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                    iteration=iteration, history=history)
    save_checkpoint(final_path, model, {**meta, "iteration": iteration})
    write_json(out / TRAIN_LOG, {"iterations": iteration, "history": history}, indent=1)
    return final_path
