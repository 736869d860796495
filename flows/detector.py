"""Flow ``exits-train-detector`` (stage 2): Mask R-CNN on the run's pseudo labels, then its
mask AP on a held-out GT json when one is given.

Trains on ``pseudo_labels_fixed.json`` (merged human fixes) when present, else on
``pseudo_labels.json`` (:func:`exits.stages.detector.detector_train_json`); the cache key
includes that file's bytes, so exporting new fixes retrains and nothing else does. Training
resumes after a kill from the checkpoint folder keyed by the task's cache key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.stages.detector import (DETECTOR_DIR, detector_train_json, evaluate_detector_stage, metrics_summary,
                                   train_detector_stage)
from flows.caching import content_cache, folder_fingerprint, keyed_checkpoint_dir, output_record, prune_other_dirs, run_task
from flows.runtime import config_from, results_dir, sections, stage_result, transient_error

SECTIONS = ("detector",)


# No retries: a failed detector training is hours of work to repeat, and the interrupted
# run resumes from its checkpoint when the user runs the command again.
@task(name="train-detector", cache_policy=content_cache("train_json"), persist_result=True, retries=0)
def train_detector_task(train_json: str, images: str, images_fingerprint: str, workdir: str,
                        config: dict[str, Any]) -> dict[str, Any]:
    """Stage 2: train; output = the final checkpoint."""
    cfg = config_from(config)
    checkpoints = keyed_checkpoint_dir(Path(workdir) / DETECTOR_DIR / "runs")
    record = train_detector_stage(Path(workdir), cfg.detector, Path(images), checkpoint_dir=checkpoints)
    prune_other_dirs(checkpoints)
    return output_record({"checkpoint": record["checkpoint"]}, train_json=record["train_json"])


@task(name="evaluate-detector", cache_policy=content_cache("checkpoint", "gt"), persist_result=True,
      retries=1, retry_delay_seconds=2, retry_condition_fn=transient_error)
def evaluate_detector_task(checkpoint: str, gt: str, images: str, workdir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Predict on ``gt``'s images and evaluate; output = the metrics json."""
    cfg = config_from(config)
    metrics = evaluate_detector_stage(Path(workdir), Path(gt), Path(images), cfg.detector, Path(checkpoint))
    return output_record({"metrics": Path(workdir) / DETECTOR_DIR / f"metrics-{Path(gt).stem}.json"},
                         summary=metrics_summary(metrics))


@flow(name="exits-train-detector")
def train_detector_flow(images: str, workdir: str, config: dict[str, Any] | None = None,
                        val_gt: str | None = None) -> dict[str, Any]:
    """Train the stage-2 detector; evaluate it on ``val_gt`` (images under ``images``) if given."""
    cfg = config_from(config)
    results = results_dir(workdir)
    settings = sections(cfg, *SECTIONS)
    trained, train_state = run_task(train_detector_task, results,
                                    train_json=str(detector_train_json(Path(workdir))), images=images,
                                    images_fingerprint=folder_fingerprint(images), workdir=workdir, config=settings)
    states = {"train-detector": train_state}
    summary = None
    if val_gt:
        evaluated, states["evaluate-detector"] = run_task(
            evaluate_detector_task, results, {"retries": cfg.flows.retries},
            checkpoint=trained["outputs"]["checkpoint"], gt=val_gt, images=images, workdir=workdir, config=settings)
        summary = evaluated["summary"]
    return stage_result(states, checkpoint=trained["outputs"]["checkpoint"], metrics=summary)
