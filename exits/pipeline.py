"""The EXITS pipeline as plain functions over a run folder: stage 0 -> 1a -> 1b -> 1c -> 1d -> report.

Each stage reads its inputs from files in ``workdir`` and writes its outputs there, so a
stage can be re-run, resumed (training resumes from its last epoch checkpoint) or
inspected on its own. GT masks enter only in the report, on the evaluation side.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from exits.config import ExitsConfig, dump_config
from exits.data.instances_table import read_instances_table
from exits.engine import resolve_device
from exits.io import atomic_open, write_json
from exits.models import load_mask_model
from exits.stages.common import model_from_config, train_settings
from exits.stages.generator import GeneratorLoss, GeneratorTask, point_label_masks, train_generator
from exits.stages.object_crops import ObjectCropDataset
from exits.stages.point_retrieval import RetrievalParams, read_points, retrieve_dataset_points, write_points
from exits.stages.prepare import prepare_instances
from exits.stages.pseudo_labels import mask_scores, paste_pseudo_masks, predict_crop_probs, write_pseudo_labels
from exits.stages.report import write_report
from exits.stages.similarity import train_similarity_extractor

log = logging.getLogger(__name__)

__all__ = ["run_pipeline", "write_report", "StagePaths"]


class StagePaths:
    """Where each stage writes inside a run folder."""

    def __init__(self, workdir: Path):
        self.root = Path(workdir)
        self.instances = self.root / "instances.parquet"
        self.similarity = self.root / "similarity" / "model.pt"
        self.points = self.root / "points.parquet"
        self.generator = self.root / "generator" / "model.pt"
        self.pseudo_json = self.root / "pseudo_labels.json"


def stage_similarity(cfg: ExitsConfig, dataset: ObjectCropDataset, paths: StagePaths, device: str, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg.backbone)
    settings = train_settings(cfg.similarity.optim, seed=cfg.seed, device=device, amp=cfg.amp,
                              checkpoint_dir=paths.similarity.parent / "checkpoints")
    return train_similarity_extractor(model, dataset, settings, paths.similarity, progress=progress)


def retrieval_params(cfg: ExitsConfig) -> RetrievalParams:
    r = cfg.retrieval
    return RetrievalParams(grid=cfg.backbone.grid, crop_size=cfg.data.crop_size, delta_px=r.delta_px, alpha=r.alpha,
                           tau_fg=r.tau_fg, tau_bg=r.tau_bg, sinkhorn_iters=r.sinkhorn_iters, normalize=r.normalize,
                           layers=tuple(cfg.similarity.layers), batch_size=r.batch_size,
                           appearance_weight=cfg.similarity.appearance_weight,
                           appearance_sigma=cfg.similarity.appearance_sigma)


def stage_retrieval(cfg: ExitsConfig, dataset: ObjectCropDataset, paths: StagePaths, device: torch.device,
                    progress: bool) -> Path:
    extractor = load_mask_model(paths.similarity)
    table = retrieve_dataset_points(extractor, dataset, retrieval_params(cfg), device, progress=progress)
    return write_points(table, paths.points)


def generator_task(cfg: ExitsConfig, dataset: ObjectCropDataset, points_path: Path | None) -> GeneratorTask:
    g = cfg.generator
    points = read_points(points_path) if (g.use_retrieval and points_path is not None) else None
    labels = point_label_masks(points, dataset.points_crop, dataset.boxes, cfg.data.crop_size, cfg.backbone.grid,
                               cfg.retrieval.delta_px)
    crf_params = {"iters": g.crf.iters, **g.crf.params}
    loss = GeneratorLoss(lambda_point=g.lambda_point, lambda_crf=g.lambda_crf, lambda_mil=g.lambda_mil,
                         point_dropout=g.point_dropout if g.use_retrieval else 0.0,
                         crf_warmup_epochs=g.crf_warmup_epochs, crf_impl=g.crf.impl, crf_params=crf_params,
                         use_retrieval=g.use_retrieval)
    return GeneratorTask(labels, cfg.backbone.grid, loss)


def stage_generator(cfg: ExitsConfig, dataset: ObjectCropDataset, paths: StagePaths, device: str,
                    progress: bool) -> Path:
    torch.manual_seed(cfg.seed + 1)
    task = generator_task(cfg, dataset, paths.points)
    model = model_from_config(cfg.backbone)
    settings = train_settings(cfg.generator.optim, seed=cfg.seed, device=device, amp=cfg.amp,
                              checkpoint_dir=paths.generator.parent / "checkpoints", ema_decay=cfg.generator.ema_decay)
    return train_generator(model, dataset, task, settings, paths.generator, progress=progress)


def stage_pseudo_labels(cfg: ExitsConfig, dataset: ObjectCropDataset, annotations: Path, paths: StagePaths,
                        device: torch.device, progress: bool) -> dict[str, Path]:
    import json

    generator = load_mask_model(paths.generator)
    p = cfg.pseudo
    crf = cfg.generator.crf
    probs = predict_crop_probs(generator, dataset, batch_size=p.batch_size, device=device,
                               crf_impl=p.crf_impl if p.crf_refine else None,
                               crf_params={"iters": crf.iters, **crf.params}, progress=progress)
    task = generator_task(cfg, dataset, paths.points if paths.points.exists() else None)
    all_idx = torch.arange(len(dataset))
    target, labelled, _ = task.targets(all_idx, torch.device("cpu"))
    box_masks = torch.stack([dataset[i]["box_mask"] for i in range(len(dataset))])
    certainty, agreement, score = mask_scores(probs, box_masks, labelled, target, p.threshold)
    table = read_instances_table(paths.instances)
    image_ids = table.column("image_id").to_pylist()
    with open(annotations, encoding="utf-8") as fh:
        images = {img["id"]: img for img in json.load(fh)["images"]}
    rows = paste_pseudo_masks(probs, dataset, images, image_ids, p.threshold, progress=progress)
    scores = {r["ann_id"]: {"score": float(score[i]), "certainty": float(certainty[i]), "agreement": float(agreement[i])}
              for i, r in enumerate(rows)}
    return write_pseudo_labels(annotations, rows, scores, paths.root)


def run_pipeline(images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig, gt: Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Stage 0 -> 1a -> 1b -> 1c -> 1d, then the mIoU report when GT masks are available."""
    images, annotations, workdir = Path(images), Path(annotations), Path(workdir)
    paths = StagePaths(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with atomic_open(workdir / "config.yaml") as fh:
        fh.write(dump_config(cfg))
    write_json(workdir / "run.json", {"images": str(images.resolve()), "annotations": str(annotations.resolve()),
                                      "gt": str(gt.resolve()) if gt else None})
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %s done in %.1f s", name, timings[name])
        return out

    d = cfg.data
    summary = timed("prepare", prepare_instances, annotations, images, workdir, crop_margin=d.crop_margin,
                    crop_min_margin_px=d.crop_min_margin_px, crop_size=d.crop_size,
                    derive_missing_points=d.derive_missing_points, point_tolerance_px=d.point_tolerance_px,
                    check_images=d.check_images, progress=progress)
    dataset = timed("crops", ObjectCropDataset, read_instances_table(paths.instances), images, d.crop_size,
                    progress=progress)
    if cfg.generator.use_retrieval:
        timed("similarity", stage_similarity, cfg, dataset, paths, str(device), progress)
        timed("retrieval", stage_retrieval, cfg, dataset, paths, device, progress)
    timed("generator", stage_generator, cfg, dataset, paths, str(device), progress)
    timed("pseudo_labels", stage_pseudo_labels, cfg, dataset, annotations, paths, device, progress)
    result: dict[str, Any] = {**summary, "workdir": str(workdir), "seconds": timings}
    gt_path = gt if gt is not None else annotations
    try:
        report = write_report(workdir, gt=gt_path, separated_ids=cfg.eval.separated_ids_path,
                              min_part_pixels=cfg.eval.separated_min_part_pixels,
                              min_part_fraction=cfg.eval.separated_min_part_fraction)
        result["miou_all"] = report["all"]["miou"]
        result["miou_separated"] = report["separated"]["miou"]
    except ValueError as exc:
        log.info("no mIoU report: %s", exc)
    write_json(workdir / "run_summary.json", result, indent=1)
    return result
