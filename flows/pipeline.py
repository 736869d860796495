"""Flow ``exits-pipeline``: every stage flow of a run, in order.

prepare instances -> train similarity extractor -> retrieve points (sharded) -> train
generator -> pseudo labels (sharded) -> report -> (``train_detector: true``) stage 2: train
Mask R-CNN on the pseudo labels (or the exported human fixes) and evaluate it on ``val_gt``. Each stage is its own (sub)flow run with
cached tasks, so re-running a finished run recomputes nothing, a changed input or setting
recomputes only what depends on it, and a killed run picks up where it stopped.

With no ``PREFECT_API_URL`` Prefect runs it on a temporary local server in this process;
schedules and multi-machine Dask runs need ``prefect server start`` (see README).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow

from exits.config import ExitsConfig
from exits.io import write_json
from exits.pipeline import write_run_files
from exits.run_folder import RunFolder
from flows.detector import train_detector_flow
from flows.generator import train_generator_flow
from flows.prefect_env import tie_temporary_server_to_process
from flows.prepare import prepare_instances_flow
from flows.pseudo_labels import pseudo_labels_flow
from flows.report import report_flow
from flows.retrieval import retrieve_points_flow
from flows.runtime import config_dict, config_from, count_states, local_dask_cluster, make_task_runner
from flows.similarity import train_similarity_flow

__all__ = ["exits_pipeline", "run_pipeline_flow"]


@flow(name="exits-pipeline", description="EXITS: extreme points -> pseudo instance masks (+ mIoU report)")
def exits_pipeline(images: str, annotations: str, workdir: str, config: dict[str, Any] | None = None,
                   gt: str | None = None, val_gt: str | None = None) -> dict[str, Any]:
    """Run every stage on ``annotations`` + ``images`` into the run folder ``workdir``.

    Args:
        images: image folder. annotations: COCO/LVIS json with extreme points (or masks).
        workdir: run folder (outputs, shards, ``.prefect-results``).
        config: a validated config as a dict (``ExitsConfig.model_dump(mode="json")``);
            None = defaults.
        gt: json with GT masks for the report (default: ``annotations``).
        val_gt: held-out json with GT masks (images under ``images``) on which the stage-2
            detector is evaluated; only used with ``train_detector: true``.
    Returns:
        The run summary (also written to ``run_summary.json``): object counts, seconds per
        stage, mIoU when GT masks exist, and ``tasks``: how many tasks finished in which
        state (``Cached`` = cache hit, ``Completed`` = computed).
    """
    cfg = config_from(config)
    images, annotations, workdir = (str(Path(p).resolve()) for p in (images, annotations, workdir))
    gt = str(Path(gt).resolve()) if gt else None
    write_run_files(Path(workdir), cfg, Path(images), Path(annotations), Path(gt) if gt else None)
    full = config_dict(cfg)
    seconds: dict[str, float] = {}
    tasks: dict[str, str] = {}

    def stage(name: str, stage_flow: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = stage_flow(workdir=workdir, config=full, **kwargs)
        seconds[name] = round(time.perf_counter() - t0, 2)
        tasks.update({f"{name}/{task}": state for task, state in out["tasks"].items()})
        return out

    with local_dask_cluster(cfg.flows) as address:
        runner = make_task_runner(cfg.flows, address)
        prepared = stage("prepare", prepare_instances_flow, images=images, annotations=annotations)
        if cfg.generator.use_retrieval:
            stage("similarity", train_similarity_flow, images=images)
            stage("retrieval", retrieve_points_flow.with_options(task_runner=runner), images=images)
        stage("generator", train_generator_flow, images=images)
        stage("pseudo_labels", pseudo_labels_flow.with_options(task_runner=runner), images=images,
              annotations=annotations)
    report = stage("report", report_flow, gt=gt or annotations)
    result: dict[str, Any] = {**prepared["summary"], "workdir": workdir, "seconds": seconds}
    if report["miou_all"] is not None:
        result["miou_all"] = report["miou_all"]
        result["miou_separated"] = report["miou_separated"]
    if cfg.train_detector:
        detector = stage("detector", train_detector_flow, images=images,
                         val_gt=str(Path(val_gt).resolve()) if val_gt else None)
        if detector["metrics"] is not None:
            result["detector"] = detector["metrics"]
    result["tasks"] = count_states(tasks)
    result["task_states"] = tasks
    write_json(RunFolder(workdir).run_summary, result, indent=1)
    return result


def run_pipeline_flow(images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig,
                      gt: Path | None = None, val_gt: Path | None = None) -> dict[str, Any]:
    """Run :func:`exits_pipeline` in this process (``exits run``); returns its summary.

    A temporary Prefect server it starts dies with this process, even a SIGKILLed one
    (:func:`flows.prefect_env.tie_temporary_server_to_process`)."""
    tie_temporary_server_to_process()
    return exits_pipeline(images=str(images), annotations=str(annotations), workdir=str(workdir),
                          config=config_dict(cfg), gt=str(gt) if gt else None, val_gt=str(val_gt) if val_gt else None)
