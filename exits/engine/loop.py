"""The training loop shared by EXITS stage 1a (similarity extractor) and 1c (generator).

Plain and explicit, in the style of torchvision's reference scripts: one ``train`` function
builds the data loader, optimizer, schedule, optional EMA teacher and DDP wrapper, then
runs ``train_one_epoch`` per epoch and writes a checkpoint after each. It knows nothing
about EXITS: a stage plugs in a *task* object that turns a batch into a loss.

Per optimizer step::

    batch  -> move_to_device
    loss, parts = task.loss(model, batch, teacher, epoch)     (under autocast on CUDA)
    backward (GradScaler for fp16) -> unscale -> clip_grad_norm_ -> AdamW step
    -> LR scheduler step (per iteration) -> EMA teacher update

``settings.batch_size`` is the GLOBAL batch: under DDP each of the ``world_size``
processes loads ``batch_size // world_size`` samples, so a run's hyper-parameters mean the
same thing on 1 GPU and on 8. Data order always comes from a ``DistributedSampler``
(also for a single process, with one replica), so one process sees, step by step, the
union of what the ranks of a distributed run see.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from tqdm import tqdm  # not tqdm.auto: it calls iter(loader) in __init__ (2x the DataLoader workers)

from exits.engine.checkpoint import LAST_CHECKPOINT, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from exits.engine.device import amp_dtype, move_to_device, resolve_device
from exits.engine.distributed import DistInfo, all_gather_objects, barrier, init_distributed
from exits.engine.ema import ModelEMA
from exits.engine.optim import build_optimizer
from exits.engine.schedule import build_scheduler
from exits.progress import Eta

__all__ = ["TrainSettings", "TrainTask", "TrainResult", "train", "train_one_epoch", "resolve_device", "seed_everything"]

logger = logging.getLogger(__name__)

# Settings whose change between a checkpoint and a resumed run makes the result differ
# from an uninterrupted run; a resume with different values is allowed but warned about.
_RESUME_SENSITIVE = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "seed", "ema_decay", "ema_warmup", "max_steps")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters and run options of one training run.

    batch_size: GLOBAL batch (summed over DDP processes). device: auto|cpu|cuda[:N].
    amp: mixed precision on CUDA only (bf16 where supported, else fp16 + GradScaler).
    ema_decay: None = no teacher. ema_warmup: the teacher's decay ramps up as
    min(ema_decay, (1+t)/(10+t)) (see ``ModelEMA``). log_every: steps between running-loss reports (tqdm
    postfix; a log line at INFO when the bar is off). checkpoint_dir: ``last.pt`` is
    written there atomically after every epoch, and a run resumes from it when present.
    find_unused_parameters: passed to DDP, for models whose loss skips some parameters.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    ema_decay: float | None = None
    ema_warmup: bool = False
    num_workers: int = 0
    log_every: int = 10
    checkpoint_dir: str | None = None
    find_unused_parameters: bool = False
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {self}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.num_workers < 0 or self.log_every < 1:
            raise ValueError(f"weight_decay, warmup_epochs, num_workers must be >= 0 and log_every >= 1; got {self}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")

    def epochs_to_run(self, steps_per_epoch: int) -> int:
        """Epochs actually run: ``epochs``, or fewer when ``max_steps`` ends training earlier
        (min(epochs, ceil(max_steps / steps_per_epoch))); the last one may stop part-way."""
        if self.max_steps is None:
            return self.epochs
        return min(self.epochs, math.ceil(self.max_steps / max(1, steps_per_epoch)))


class TrainTask(Protocol):
    """What a stage provides. Only ``loss`` is required.

    ``loss(model, batch, teacher, epoch) -> (loss, parts)``: ``batch`` is already on the
    device; ``loss`` is a scalar tensor that must be a MEAN over the batch's samples (DDP
    averages gradients over ranks, so a mean keeps 1-process and K-process runs equal);
    ``parts`` are floats to log (epoch means end up in the history). Call the student
    as ``model(...)``: under DDP ``model`` is the wrapper, and only its forward
    synchronises gradients. ``teacher`` is the EMA model (eval mode, no grad) or None;
    run it under ``torch.no_grad()``.

    Optional hooks, looked up with ``getattr``:
    ``on_epoch_start(epoch, rng)``: before each epoch's batches are drawn (e.g. point
    dropout); ``rng`` is a numpy Generator seeded by (seed, epoch), the same on every rank
    and in a resumed run. ``collate(items) -> batch``: defaults to ``default_collate``.
    """

    def loss(self, model: nn.Module, batch: Any, teacher: nn.Module | None, epoch: int) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class TrainResult:
    """The trained model (unwrapped, eval mode), the EMA teacher or None, and per-epoch
    records: ``epoch`` (0-based), ``loss`` and every task part (means over the epoch's
    steps, all ranks pooled; a part counts only on steps that report it), ``grad_norm`` (mean pre-clip norm, when clipping), ``lr`` (last step's),
    ``steps`` and ``seconds``."""

    model: nn.Module
    teacher: nn.Module | None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _RunState:
    """Everything ``train_one_epoch`` updates; ``model`` is the DDP wrapper when distributed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    autocast_dtype: torch.dtype | None
    global_step: int = 0
    step_eta: Eta | None = None  # over this run's optimizer steps: the ETA of the per-step log lines


class _MeanMeter:
    """Sums and counts per metric name; keys may appear on some steps only."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] += float(value)
            self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    def merged(self, info: DistInfo) -> "_MeanMeter":
        """One meter over all ranks (gathers; every rank must call it)."""
        total = _MeanMeter()
        for sums, counts in all_gather_objects((dict(self.sums), dict(self.counts)), info):
            for key in sums:
                total.sums[key] += sums[key]
                total.counts[key] += counts[key]
        return total


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, *extra: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, *extra]).generate_state(1)[0])


def _format(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in values.items())


def train_one_epoch(
    state: _RunState,
    loader: DataLoader,
    task: TrainTask,
    settings: TrainSettings,
    info: DistInfo,
    epoch: int,
    progress: bool,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch record (means over steps and ranks)."""
    state.model.train()
    meter = _MeanMeter()
    teacher = state.ema.teacher if state.ema is not None else None
    lr_used = state.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{settings.epochs_to_run(len(loader))}", disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)
    steps = 0
    planned = len(loader) if settings.max_steps is None else max(0, min(len(loader), settings.max_steps - state.global_step))
    for step, batch in enumerate(bar):
        if settings.max_steps is not None and state.global_step >= settings.max_steps:
            break
        steps += 1
        batch = move_to_device(batch, info.device)
        with torch.autocast(info.device.type, dtype=state.autocast_dtype, enabled=state.autocast_dtype is not None):
            loss, parts = task.loss(state.model, batch, teacher, epoch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, step {step}; parts: {parts}")

        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        metrics = {"loss": loss_value, **parts}
        if settings.grad_clip is not None:
            state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), settings.grad_clip)
            metrics["grad_norm"] = grad_norm.item()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        lr_used = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.model)
        state.global_step += 1
        meter.add(metrics)

        if (step + 1) % settings.log_every == 0:
            running = {**meter.means(), "lr": lr_used}
            if bar.disable:
                if info.is_main:
                    eta = f"  (steps {state.step_eta.describe(state.global_step)})" if state.step_eta is not None else ""
                    logger.info("epoch %d step %d/%d  %s%s", epoch + 1, step + 1, planned, _format(running), eta)
            else:
                bar.set_postfix({k: f"{v:.3g}" for k, v in running.items()})
    bar.close()
    return {"epoch": epoch, **meter.merged(info).means(), "lr": lr_used, "steps": steps, "seconds": time.perf_counter() - start}


def _build_loader(dataset: Dataset, task: TrainTask, settings: TrainSettings, info: DistInfo) -> tuple[DataLoader, DistributedSampler, torch.Generator]:
    per_rank_batch = settings.batch_size // info.world_size
    if per_rank_batch < 1:
        raise ValueError(f"batch_size {settings.batch_size} is the global batch; it must be >= world size {info.world_size}")
    if settings.batch_size % info.world_size:
        logger.warning("global batch %d is not divisible by world size %d; using %d per process (global %d)",
                       settings.batch_size, info.world_size, per_rank_batch, per_rank_batch * info.world_size)
    # Same permutation on every rank (seed, epoch); rank r takes positions r, r+K, r+2K, ...
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=settings.seed)
    # Seeds worker processes (their torch/numpy/random RNGs); reseeded per epoch, so data
    # augmentation in workers is reproducible and unaffected by resuming.
    generator = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=settings.num_workers,
        collate_fn=getattr(task, "collate", None) or default_collate,
        pin_memory=info.device.type == "cuda",
        drop_last=False,
        generator=generator,
        # Workers start from a fork server, not a fork of this process: a process that has run
        # a Prefect flow (every training task of `exits run`) forks workers that exit at once
        # with status 1 (tests/test_streaming_data.py reproduces it after a flow run).
        multiprocessing_context="forkserver" if settings.num_workers > 0 else None,
    )
    return loader, sampler, generator


def _resume(path: Path, settings: TrainSettings, info: DistInfo) -> dict[str, Any]:
    checkpoint = load_checkpoint(path, map_location=info.device)
    saved = checkpoint.get("settings", {})
    changed = {k: (saved.get(k), getattr(settings, k)) for k in _RESUME_SENSITIVE if saved.get(k) != getattr(settings, k)}
    if changed and info.is_main:
        logger.warning("resuming %s with changed settings (saved, now): %s", path, changed)
    return checkpoint


def train(model: nn.Module, dataset: Dataset, task: TrainTask, settings: TrainSettings, progress: bool = True) -> TrainResult:
    """Train ``model`` on ``dataset`` with ``task.loss``; see the module docstring.

    Resumes from ``<checkpoint_dir>/last.pt`` when present, at the epoch after the saved
    one (a finished run returns at once). Under ``torchrun`` (WORLD_SIZE > 1) or with an
    initialised process group, trains with DDP; only rank 0 logs and writes checkpoints.
    """
    if len(dataset) == 0:
        raise ValueError("empty dataset")
    info = init_distributed(settings.device)
    seed_everything(settings.seed + info.rank)  # ranks draw different numbers in their own torch ops (e.g. nn.Dropout)
    model.to(info.device)
    loader, sampler, loader_generator = _build_loader(dataset, task, settings, info)
    steps_per_epoch = len(loader)
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    epochs = settings.epochs_to_run(steps_per_epoch)
    warmup_steps = min(total_steps, round(settings.warmup_epochs * steps_per_epoch))

    checkpoint_path = Path(settings.checkpoint_dir) / LAST_CHECKPOINT if settings.checkpoint_dir else None
    checkpoint = _resume(checkpoint_path, settings, info) if checkpoint_path and checkpoint_path.exists() else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # before the DDP wrap, which broadcasts rank 0's weights

    wrapped: nn.Module = model
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=settings.find_unused_parameters)
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay)
    autocast_dtype = amp_dtype(info.device, settings.amp)
    state = _RunState(
        model=wrapped,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, total_steps, warmup_steps),
        scaler=torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16),
        ema=ModelEMA(model, settings.ema_decay, warmup=settings.ema_warmup) if settings.ema_decay is not None else None,
        autocast_dtype=autocast_dtype,
    )
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None:
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
        state.scaler.load_state_dict(checkpoint["scaler"])
        if state.ema is not None and checkpoint["teacher"] is not None:
            state.ema.load_state_dict(checkpoint["teacher"])
        state.global_step = checkpoint["global_step"]
        history = list(checkpoint["history"])
        start_epoch = checkpoint["epoch"] + 1
        rng_states = checkpoint["rng"]
        if len(rng_states) == info.world_size:
            restore_rng_state(rng_states[info.rank])
        else:
            logger.warning("checkpoint has RNG states of %d processes, this run has %d; reseeding", len(rng_states), info.world_size)
            seed_everything(settings.seed + info.rank + 1_000_003 * start_epoch)
        if info.is_main:
            logger.info("resumed from %s: epoch %d done, step %d", checkpoint_path, start_epoch, state.global_step)
        del checkpoint

    if info.is_main:
        logger.info("training %d epochs x %d steps, global batch %d on %d process(es), device %s, amp %s, ema %s",
                    epochs, steps_per_epoch, settings.batch_size, info.world_size, info.device, autocast_dtype, settings.ema_decay)
    eta = Eta(epochs, done_before=start_epoch)
    state.step_eta = Eta(total_steps, done_before=state.global_step)
    for epoch in range(start_epoch, epochs):
        on_epoch_start = getattr(task, "on_epoch_start", None)
        if on_epoch_start is not None:
            on_epoch_start(epoch, np.random.default_rng([settings.seed, epoch]))
        sampler.set_epoch(epoch)
        loader_generator.manual_seed(_epoch_seed(settings.seed, epoch, info.rank))
        record = train_one_epoch(state, loader, task, settings, info, epoch, progress)
        history.append(record)
        if info.is_main:
            logger.info("epoch %s  %s", eta.describe(epoch + 1), _format({k: v for k, v in record.items() if k != "epoch"}))
        if checkpoint_path is not None:
            _save(checkpoint_path, model, state, settings, info, epoch, history)

    model.eval()
    return TrainResult(model=model, teacher=state.ema.teacher if state.ema is not None else None, history=history)


def _save(path: Path, model: nn.Module, state: _RunState, settings: TrainSettings, info: DistInfo, epoch: int, history: list[dict]) -> None:
    """Rank 0 writes ``last.pt`` atomically; every rank contributes its RNG state and waits."""
    rng_states = all_gather_objects(capture_rng_state(), info)
    if info.is_main:
        save_checkpoint(path, {
            "model": model.state_dict(),
            "teacher": state.ema.state_dict() if state.ema is not None else None,
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),
            "epoch": epoch,
            "global_step": state.global_step,
            "history": history,
            "rng": rng_states,
            "world_size": info.world_size,
            "settings": dataclasses.asdict(settings),
        })
    barrier(info)  # nobody races ahead (or exits) while rank 0 is still writing
