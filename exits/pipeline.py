"""The EXITS pipeline as plain functions over a run folder: stage 0 -> 1a -> 1b -> 1c -> 1d -> report.

Each stage reads its inputs from files in ``workdir`` and writes its outputs there, so a
stage can be re-run, resumed (training resumes from its last epoch checkpoint) or
inspected on its own. Point retrieval and pseudo labels work per shard of objects (row
ranges of ``instances.parquet``, ``cfg.flows.shard_size`` rows each) and merge the shard
files. :func:`run_pipeline` runs everything in this process; the Prefect flows in
``flows/`` call the same stage functions piecewise (one task per stage or shard), with
caching, retries and a choice of task runner. GT masks enter only in the report.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from exits.config import ExitsConfig, dump_config
from exits.data.instances_table import read_instances_rows
from exits.engine import resolve_device
from exits.engine.device import amp_dtype
from exits.io import write_json
from exits.models import load_mask_model
from exits.stages.common import model_from_config, require_backbone_weights, train_settings
from exits.stages.generator import GeneratorLoss, GeneratorTask, PointLabelSource, SparseLabels, train_generator
from exits.stages.object_crops import ObjectCropDataset, StreamingCropDataset
from exits.stages.point_retrieval import (RetrievalParams, image_neighbours, merge_points,
                                         read_points_rows, retrieve_dataset_points)
from exits.stages.prepare import prepare_instances
from exits.run_folder import RunFolder
from exits.stages.image_crf_pool import ImageCRFRefiner, resolve_crf_workers
from exits.stages.pseudo_labels import merge_pseudo_labels, predict_crop_probs, shard_pseudo_label_table
from exits.stages.report import write_report
from exits.stages.shards import shard_ranges, write_shard
from exits.stages.similarity import train_similarity_extractor

log = logging.getLogger(__name__)

__all__ = ["run_pipeline", "write_report", "stage_prepare", "stage_similarity", "stage_retrieval_shard",
           "stage_generator", "stage_pseudo_shard", "stage_report", "write_run_files"]


def write_run_files(workdir: Path, cfg: ExitsConfig, images: Path, annotations: Path, gt: Path | None) -> None:
    """``config.yaml`` (the validated config) and ``run.json`` (the inputs) of a run folder."""
    RunFolder(workdir).write_run_files(dump_config(cfg), images, annotations, gt)


def stage_prepare(cfg: ExitsConfig, annotations: Path, images: Path, workdir: Path, progress: bool = True) -> dict:
    d = cfg.data
    return prepare_instances(annotations, images, workdir, crop_margin=d.crop_margin,
                             crop_min_margin_px=d.crop_min_margin_px, crop_size=d.crop_size,
                             derive_missing_points=d.derive_missing_points, point_tolerance_px=d.point_tolerance_px,
                             check_images=d.check_images, progress=progress)


def stage_similarity(cfg: ExitsConfig, dataset: ObjectCropDataset | StreamingCropDataset, paths: RunFolder,
                     device: str, progress: bool, checkpoint_dir: Path | None = None) -> Path:
    require_backbone_weights(cfg.backbone)
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg.backbone)
    settings = train_settings(cfg.similarity.optim, seed=cfg.seed, device=device, amp=cfg.amp,
                              checkpoint_dir=checkpoint_dir or paths.checkpoints(paths.similarity))
    return train_similarity_extractor(model, dataset, settings, paths.similarity, progress=progress)


def retrieval_params(cfg: ExitsConfig) -> RetrievalParams:
    r = cfg.retrieval
    return RetrievalParams(grid=cfg.backbone.grid, crop_size=cfg.data.crop_size, delta_px=r.delta_px, alpha=r.alpha,
                           tau_fg=r.tau_fg, tau_bg=r.tau_bg, sinkhorn_iters=r.sinkhorn_iters, normalize=r.normalize,
                           layers=tuple(r.layers), batch_size=r.batch_size,
                           appearance_weight=r.appearance_weight,
                           appearance_sigma=r.appearance_sigma, raw_scale=r.raw_scale, min_mass=r.min_mass,
                           neighbour_bg=r.neighbour_bg)


def shard_dataset(paths: RunFolder, images: Path, crop_size: int, start: int, stop: int) -> tuple[pa.Table, ObjectCropDataset]:
    """Rows ``[start, stop)`` of the instances table and their crops."""
    table = read_instances_rows(paths.instances, start, stop)  # only the row groups holding the shard
    return table, ObjectCropDataset(table, images, crop_size)


def stage_retrieval_shard(cfg: ExitsConfig, images: Path, paths: RunFolder, start: int, stop: int, out: Path,
                          device: torch.device, key: str | None = None, progress: bool = False) -> Path:
    """Stage 1b for instances rows ``[start, stop)``: one ``POINTS_SCHEMA`` shard file at ``out``.

    Neighbour BG seeds come from all the objects of the shard's images, also those in other
    shards (:func:`exits.stages.point_retrieval.image_neighbours`): the points do not depend
    on ``flows.shard_size``."""
    rows, dataset = shard_dataset(paths, images, cfg.data.crop_size, start, stop)
    extractor = load_mask_model(paths.similarity)
    params = retrieval_params(cfg)
    groups, others = image_neighbours(paths.instances, rows, start, stop, cfg.data.crop_size) \
        if params.neighbour_bg != "none" else (None, None)
    table = retrieve_dataset_points(extractor, dataset, params, device, progress=progress, groups=groups, others=others)
    return write_shard(table, out, key)


def generator_task(cfg: ExitsConfig, dataset: ObjectCropDataset | StreamingCropDataset,
                   points: pa.Table | SparseLabels | None) -> GeneratorTask:
    """The stage-1c loss for ``dataset``; ``points`` = its rows of points.parquet (same order:
    a shard's table, or the run's :class:`SparseLabels`) or None. Labels are built per batch."""
    g = cfg.generator
    points = points if g.use_retrieval else None
    sparse = SparseLabels.from_table(points) if isinstance(points, pa.Table) else points
    labels = PointLabelSource(dataset.geometry, len(dataset), sparse, crop_size=cfg.data.crop_size,
                              grid=cfg.backbone.grid, delta_px=cfg.retrieval.delta_px)
    crf_params = {"iters": g.crf.iters, **g.crf.params}
    loss = GeneratorLoss(lambda_point=g.lambda_point, lambda_crf=g.lambda_crf, lambda_mil=g.lambda_mil,
                         point_dropout=g.point_dropout if g.use_retrieval else 0.0,
                         crf_warmup_epochs=g.crf_warmup_epochs, crf_impl=g.crf.impl, crf_params=crf_params,
                         use_retrieval=g.use_retrieval)
    return GeneratorTask(labels, cfg.backbone.grid, loss)


def stage_generator(cfg: ExitsConfig, dataset: ObjectCropDataset | StreamingCropDataset, paths: RunFolder,
                    device: str, progress: bool, checkpoint_dir: Path | None = None) -> Path:
    """Stage 1c on ``dataset`` (the run's :class:`StreamingCropDataset` in the flows); the point
    labels are memory-mapped from ``cache/`` (a copy of points.parquet's label columns)."""
    require_backbone_weights(cfg.backbone)
    torch.manual_seed(cfg.seed + 1)
    points = SparseLabels.open(paths.points, paths.cache_dir) if cfg.generator.use_retrieval else None
    task = generator_task(cfg, dataset, points)
    model = model_from_config(cfg.backbone)
    settings = train_settings(cfg.generator.optim, seed=cfg.seed, device=device, amp=cfg.amp,
                              checkpoint_dir=checkpoint_dir or paths.checkpoints(paths.generator),
                              ema_decay=cfg.generator.ema_decay, ema_warmup=cfg.generator.ema_warmup)
    return train_generator(model, dataset, task, settings, paths.generator, progress=progress)


def pseudo_autocast_dtype(device: torch.device, amp: bool, cpu_bf16: bool) -> torch.dtype | None:
    """Stage 1d's forward precision: CUDA follows ``amp``; CPU is float32 unless ``pseudo.cpu_bf16``."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16 else None
    return amp_dtype(device, amp)


def stage_pseudo_shard(cfg: ExitsConfig, images: Path, paths: RunFolder, start: int, stop: int, out: Path,
                       device: torch.device, key: str | None = None, progress: bool = False) -> Path:
    """Stage 1d for instances rows ``[start, stop)``: one ``PSEUDO_SCHEMA`` shard (RLEs + scores) at ``out``."""
    table, dataset = shard_dataset(paths, images, cfg.data.crop_size, start, stop)
    generator = load_mask_model(paths.generator)
    p = cfg.pseudo
    crf = cfg.generator.crf
    refine = ImageCRFRefiner(dataset, p.image_crf, resolve_crf_workers(p.crf_workers)) \
        if p.crf_refine and p.refine_at == "image" else None
    crop_crf = p.crf_refine and p.refine_at == "crop"
    crf_agreement: list[float] | None = [] if crop_crf else None
    raw_probs: list[torch.Tensor] | None = [] if crop_crf else None  # the generator's own, before the crop CRF
    try:
        probs = predict_crop_probs(generator, dataset, batch_size=p.batch_size, device=device,
                                   crf_impl=p.crf_impl if crop_crf else None, crf_agreement=crf_agreement,
                                   threshold=p.threshold, raw_probs=raw_probs,
                                   crf_params={"iters": crf.iters, **crf.params}, progress=progress,
                                   autocast_dtype=pseudo_autocast_dtype(device, cfg.amp, p.cpu_bf16),
                                   on_batch=refine.submit if refine is not None else None)
        points = read_points_rows(paths.points, start, stop) if paths.points.exists() else None
        task = generator_task(cfg, dataset, points)
        target, labelled, _ = task.targets(torch.arange(len(dataset)), torch.device("cpu"))
        return write_shard(shard_pseudo_label_table(probs, table, dataset, labelled, target, p.threshold, progress,
                                                    refine=refine, crop_refine_agreement=crf_agreement,
                                                    generator_probs=torch.cat(raw_probs) if raw_probs else None),
                           out, key)
    finally:
        if refine is not None:
            refine.close()


def stage_report(cfg: ExitsConfig, workdir: Path, gt: Path | None) -> dict[str, Any] | None:
    """The mIoU report of a run (``WORKDIR/report/``); None when no evaluated object has a GT mask."""
    e = cfg.eval
    try:
        return write_report(workdir, gt=gt, separated_ids=e.separated_ids_path, min_part_pixels=e.separated_min_part_pixels,
                            min_part_fraction=e.separated_min_part_fraction, peer_sample=e.peer_sample)
    except ValueError as exc:
        log.info("no mIoU report: %s", exc)
        return None


def run_pipeline(images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig, gt: Path | None = None,
                 progress: bool = True, val_gt: Path | None = None) -> dict[str, Any]:
    """Stage 0 -> 1a -> 1b -> 1c -> 1d, then the mIoU report when GT masks are available,
    then stage 2 when ``cfg.train_detector`` (evaluated on ``val_gt`` when given).

    Everything runs in this process, shard after shard; ``flows.pipeline.exits_pipeline``
    runs the same stages as Prefect tasks and writes the same files.
    """
    images, annotations, workdir = Path(images), Path(annotations), Path(workdir)
    paths = RunFolder(workdir)
    write_run_files(workdir, cfg, images, annotations, gt)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %s done in %.1f s", name, timings[name])
        return out

    def sharded(stage: str, fn) -> list[Path]:
        ranges = shard_ranges(paths.num_instances(), cfg.flows.shard_size)
        return [fn(cfg, images, paths, a, b, paths.shard(stage, i), device) for i, (a, b) in enumerate(ranges)]

    summary = timed("prepare", stage_prepare, cfg, annotations, images, workdir, progress)
    # Crops cut per batch, as in the flows (issue 26): nothing per object held for 1a / 1c.
    dataset = timed("crops", StreamingCropDataset, paths.instances, images, cfg.data.crop_size)
    if cfg.generator.use_retrieval:
        timed("similarity", stage_similarity, cfg, dataset, paths, str(device), progress)
        timed("retrieval", lambda: merge_points(sharded("points", stage_retrieval_shard), paths.points))
    timed("generator", stage_generator, cfg, dataset, paths, str(device), progress)
    timed("pseudo_labels", lambda: merge_pseudo_labels(sharded("pseudo", stage_pseudo_shard), annotations, workdir))
    result: dict[str, Any] = {**summary, "workdir": str(workdir), "seconds": timings}
    report = stage_report(cfg, workdir, gt if gt is not None else annotations)
    if report is not None:
        result["miou_all"] = report["all"]["miou"]
        result["miou_separated"] = report["separated"]["miou"]
    if cfg.train_detector:
        from exits.stages.detector import evaluate_detector_stage, metrics_summary, train_detector_stage

        trained = timed("detector", train_detector_stage, workdir, cfg.detector, images)
        if val_gt is not None:
            metrics = evaluate_detector_stage(workdir, Path(val_gt), images, cfg.detector, Path(trained["checkpoint"]))
            result["detector"] = metrics_summary(metrics)
    write_json(paths.run_summary, result, indent=1)
    return result
