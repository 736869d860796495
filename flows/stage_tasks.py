"""The bodies the stage tasks share: a shard of a sharded stage, a training stage, and the
map-then-merge of a sharded stage flow.

The Prefect tasks themselves stay one decorated function per stage (each has its own
parameters, which its cache key is built from); what they do is the same and lives here.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from prefect import Task

from exits.config import ExitsConfig
from exits.config.schema import TrainLaunchConfig
from exits.engine import resolve_device
from exits.engine.launch import LaunchPlan, launch, resolve_nproc
from exits.run_folder import RunFolder
from exits.stages.shards import shard_key, shard_ranges
from exits.stages.training_job import prepare_training_stage, stage_model_path, train_stage_job
from flows.caching import current_cache_key, keyed_checkpoint_dir, output_record, prune_other_dirs, run_shards, run_task
from flows.runtime import config_from

__all__ = ["SharedPathError", "check_shared_paths", "compute_shard", "train_stage", "map_and_merge"]

ShardFn = Callable[..., Path]  # (cfg, images, run, start, stop, out, device, key=) -> shard file
TRAIN_JOB_TARGET = "exits.stages.training_job:train_stage_job"
TRAIN_JOBS_DIR = "train-jobs"  # under the run's cache/: job folders of torchrun launches


class SharedPathError(RuntimeError):
    """The process running a shard cannot see a path of the run (a Dask worker without the
    shared storage). Not an ``OSError``: a shard fails at once instead of being retried."""


def where_this_runs() -> tuple[str, bool]:
    """(``Dask worker tcp://10.0.0.5:38211 on host gpu-3``, True) inside a Dask worker, else
    (``host gpu-3 (pid 1234)``, False): who to blame in an error."""
    host = socket.gethostname()
    if "distributed" in sys.modules:  # never import Dask for the thread runner
        from distributed import get_worker

        try:
            return f"Dask worker {get_worker().address} on host {host}", True
        except ValueError:  # not in a Dask worker
            pass
    return f"host {host} (pid {os.getpid()})", False


def check_shared_paths(workdir: str, images: str) -> None:
    """Raise :class:`SharedPathError` naming the path and the worker when the run folder, its
    instances table or the image folder is not visible here (a Dask worker on a machine
    without the shared storage), instead of a cryptic error deep inside a stage."""
    run = RunFolder(workdir)
    for what, path, exists in (("run folder", Path(workdir), Path.is_dir),
                               ("instances table", run.instances, Path.is_file),
                               ("image folder", Path(images), Path.is_dir)):
        if not exists(path):
            who, in_dask = where_this_runs()
            here = "" if path.is_absolute() else f" (relative: {path.absolute()} there)"
            hint = ("Every Dask worker needs the run folder, the images and the annotation json at the same "
                    "absolute paths as the machine that starts the run (shared storage such as NFS; README, "
                    "'Task runners')." if in_dask else "Was it moved, deleted or unmounted during the run?")
            raise SharedPathError(f"{who} cannot see the {what} {path}{here}. {hint}")


def compute_shard(stage_fn: ShardFn, stage: str, config: Mapping[str, Any], images: str, workdir: str,
                  shard: int, start: int, stop: int) -> dict[str, Any]:
    """Rows ``[start, stop)`` of a sharded stage into ``shards/<stage>-NNNNN.parquet``.

    A shard file already written under the running task's cache key (a run killed after
    writing it, before Prefect stored the result) is kept, not recomputed. A worker that
    cannot see the run's paths fails the shard with :class:`SharedPathError`.
    """
    check_shared_paths(workdir, images)
    cfg = config_from(config)
    run = RunFolder(workdir)
    out = run.shard(stage, shard)
    key = current_cache_key()
    reused = key is not None and shard_key(out) == key
    if not reused:
        stage_fn(cfg, Path(images), run, start, stop, out, resolve_device(cfg.device), key=key)
    return output_record({"shard": out}, rows=stop - start, reused=reused)


def train_stage(stage: str, config: Mapping[str, Any], launch_settings: Mapping[str, Any] | None, instances: str,
                images: str, workdir: str) -> dict[str, Any]:
    """A training stage in a task: checkpoints keyed by the task's cache key (a changed setting
    never resumes another run's epochs), superseded checkpoint folders removed at the end.

    ``launch_settings`` (the ``train`` section; not in the cache key: 1 or 8 processes train
    the same model) picks where it runs: in this process when it comes to one process in all,
    else under torchrun in ``nproc_per_node`` processes on this machine (x ``nnodes``
    machines), whose rank 0 writes the checkpoints and the model the task's record points to.
    A failed rank fails the task with that rank's error; a killed run resumes from the last
    epoch checkpoint, with any number of processes.
    """
    cfg = config_from(config)
    plan_cfg = TrainLaunchConfig.model_validate(dict(launch_settings or {}))
    run = RunFolder(workdir)
    model = stage_model_path(stage, run)
    checkpoints = keyed_checkpoint_dir(run.checkpoints(model))
    device = str(resolve_device(cfg.device))
    plan = LaunchPlan(resolve_nproc(plan_cfg.nproc_per_node, device), plan_cfg.nnodes, plan_cfg.rdzv_endpoint,
                      plan_cfg.rdzv_timeout_s)
    job = {"stage": stage, "config": dict(config), "instances": instances, "images": images, "workdir": workdir,
           "checkpoint_dir": str(checkpoints), "device": device}
    if plan.distributed:
        # Absolute paths: the workers may run on other machines (same shared paths) or cwd.
        job.update({k: str(Path(job[k]).absolute()) for k in ("instances", "images", "workdir", "checkpoint_dir")})
        prepare_training_stage(stage, job["config"], workdir)
        written = launch(TRAIN_JOB_TARGET, job, plan, run.cache_dir / TRAIN_JOBS_DIR, name=stage, device=device)
        if not Path(written).exists() or not Path(written).samefile(model):
            raise RuntimeError(f"training job of {stage} reported {written}, expected it to write {model}")
    else:
        train_stage_job(**job)
    prune_other_dirs(checkpoints)
    return output_record({"model": model})


def map_and_merge(stage: str, shard_task: Task, merge_task: Task, cfg: ExitsConfig, workdir: str,
                  common: Mapping[str, Any], **merge_kwargs: Any) -> tuple[dict[str, Any], dict[str, str], int, int]:
    """One ``shard_task`` per ``flows.shard_size`` rows of the instances table, then
    ``merge_task(shards=[...in order], workdir=..., **merge_kwargs)``.

    Returns (the merge's output record, {task name: state}, number of shards, shard files
    reused from a killed run).
    """
    run = RunFolder(workdir)
    ranges = shard_ranges(run.num_instances(), cfg.flows.shard_size)
    records, states = run_shards(shard_task, run.prefect_results,
                                 [dict(common, shard=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)])
    merged, merge_state = run_task(merge_task, run.prefect_results, {"retries": cfg.flows.retries},
                                   shards=[r["outputs"]["shard"] for r in records], workdir=workdir, **merge_kwargs)
    tasks = {f"{stage}-{i:05d}": s for i, s in enumerate(states)} | {merge_task.name: merge_state}
    return merged, tasks, len(ranges), sum(bool(r["reused"]) for r in records)
