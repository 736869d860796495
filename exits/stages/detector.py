"""Stage 2 over a run folder: train the instance segmenter on the run's pseudo labels, then
predict and evaluate it on a held-out GT json.

Leak boundary: the training json is always one the run wrote itself — the merged human
fixes (``pseudo_labels_fixed.json``, from ``exits export``) when present, else the pseudo
labels (``pseudo_labels.json``). Nothing here accepts a GT json for training; GT masks only
enter :func:`evaluate_detector_stage`, which never trains.

Outputs (``WORKDIR/detector/``): the backend's checkpoints and ``train_log.json``,
``train_source.json`` (which json, its digest, the backend and settings), and per
evaluation ``predictions-<name>.json`` + ``metrics-<name>.json``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from detectors import DetectorConfig, get_backend
from detectors.evaluation import evaluate
from exits.io import file_digest, write_json
from exits.run_folder import DETECTOR_DIR, FIXED_JSON, RunFolder

log = logging.getLogger(__name__)

FIXED_PSEUDO_JSON = FIXED_JSON
TRAIN_SOURCE = "train_source.json"

__all__ = ["DETECTOR_DIR", "FIXED_PSEUDO_JSON", "detector_train_json", "train_detector_stage",
           "evaluate_detector_stage", "final_checkpoint"]


def detector_train_json(workdir: Path) -> Path:
    """The json stage 2 trains on (:meth:`exits.run_folder.RunFolder.training_labels`).

    Raises:
        FileNotFoundError: the run has no pseudo labels yet (names the folder).
    """
    return RunFolder(workdir).training_labels()


def run_images_dir(workdir: Path) -> Path:
    """The image folder the run was made from (``run.json``)."""
    return RunFolder(workdir).images_dir()


def train_detector_stage(workdir: Path, cfg: DetectorConfig, images: Path | None = None,
                         checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Train ``cfg.backend`` on the run's (fixed) pseudo labels; resumes an interrupted run.

    ``checkpoint_dir``: where the backend writes (default ``WORKDIR/detector``; the flow
    passes a folder keyed by its cache key so other settings never resume these weights).
    Returns ``{"checkpoint", "train_json", "backend", "seconds", ...}`` (also written to
    ``detector/train_source.json``).
    """
    workdir = Path(workdir)
    train_json = detector_train_json(workdir)
    images = Path(images) if images is not None else run_images_dir(workdir)
    out_dir = Path(checkpoint_dir) if checkpoint_dir is not None else RunFolder(workdir).detector_dir
    backend = get_backend(cfg.backend)  # fails here, before any work, if the backend is missing
    log.info("stage 2: training %s (%s) on %s", cfg.backend, cfg.arch, train_json.name)
    t0 = time.perf_counter()
    checkpoint = backend.train(train_json, images, cfg, out_dir)
    record = {"checkpoint": str(checkpoint), "train_json": str(train_json), "train_json_blake2b": file_digest(train_json),
              "fixed": train_json.name == FIXED_PSEUDO_JSON, "backend": cfg.backend, "config": cfg.to_dict(),
              "seconds": round(time.perf_counter() - t0, 2)}
    write_json(RunFolder(workdir).detector_dir / TRAIN_SOURCE, record, indent=1)
    return record


def final_checkpoint(workdir: Path) -> Path:
    """The checkpoint recorded by the last finished :func:`train_detector_stage`."""
    source = RunFolder(workdir).detector_dir / TRAIN_SOURCE
    if not source.is_file():
        raise FileNotFoundError(f"{workdir}: no trained detector ({source} missing; run `exits train-detector`)")
    return Path(json.loads(source.read_text(encoding="utf-8"))["checkpoint"])


def evaluate_detector_stage(workdir: Path, gt_json: Path, images: Path, cfg: DetectorConfig,
                            checkpoint: Path | None = None, name: str | None = None) -> dict[str, Any]:
    """Predict on every image of ``gt_json`` and evaluate (COCO/LVIS AP, separated AP).

    Writes ``detector/predictions-<name>.json`` and ``detector/metrics-<name>.json``
    (``name`` defaults to the GT file's stem). Returns the metrics.
    """
    workdir, gt_json = Path(workdir), Path(gt_json)
    checkpoint = Path(checkpoint) if checkpoint is not None else final_checkpoint(workdir)
    name = name or gt_json.stem
    backend = get_backend(cfg.backend)
    t0 = time.perf_counter()
    predictions = backend.predict(checkpoint, images, gt_json, cfg)
    predict_s = time.perf_counter() - t0
    metrics = evaluate(predictions, gt_json)
    metrics.update({"checkpoint": str(checkpoint), "gt_json": str(gt_json), "predict_seconds": round(predict_s, 2)})
    out_dir = RunFolder(workdir).detector_dir
    write_json(out_dir / f"predictions-{name}.json", predictions)
    write_json(out_dir / f"metrics-{name}.json", metrics, indent=1)
    return metrics


def metrics_summary(metrics: dict[str, Any]) -> dict[str, float]:
    """Headline numbers (AP in %, -1 where undefined) of :func:`evaluate_detector_stage`."""
    out = {}
    for iou_type in ("segm", "bbox"):
        stats = metrics.get("coco", {}).get(iou_type)
        if stats:
            prefix = "mask" if iou_type == "segm" else "box"
            out[f"{prefix}_AP"] = round(100 * stats["AP"], 2)
            out[f"{prefix}_AP50"] = round(100 * stats["AP50"], 2)
    sep = metrics.get("separated", {}).get("segm")
    if sep:
        out["separated_mask_AP"] = round(100 * sep["AP"], 2)
    lvis = metrics.get("lvis", {}).get("segm")
    if lvis:
        out.update({f"lvis_{k}": round(100 * lvis[k], 2) for k in ("AP", "APr", "APc", "APf")})
    return out
