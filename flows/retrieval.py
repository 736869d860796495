"""Flow ``exits-retrieve-points`` (stage 1b): point retrieval mapped over shards of objects.

One task per shard (rows ``[start, stop)`` of instances.parquet) writes
``WORKDIR/shards/points-NNNNN.parquet``; a merge task writes ``points.parquet``. Shards run
on the flow's task runner (threads, or Dask workers on other machines).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.pipeline import stage_retrieval_shard
from exits.run_folder import RunFolder
from exits.stages.point_retrieval import merge_points
from flows.caching import content_cache, folder_fingerprint, output_record
from flows.runtime import config_from, sections, stage_result, transient_error
from flows.shard_limit import is_placeholder, placeholder_points_shard, shard_stride
from flows.stage_tasks import compute_shard, map_and_merge

SECTIONS = ("device", "data", "backbone", "retrieval")


@task(name="retrieve-points-shard", task_run_name="points-{shard:05d}",
      cache_policy=content_cache("instances", "extractor"), persist_result=True,
      retries=1, retry_delay_seconds=2, retry_condition_fn=transient_error)
def retrieve_points_shard_task(instances: str, extractor: str, images: str, images_fingerprint: str, workdir: str,
                               shard: int, start: int, stop: int, config: dict[str, Any],
                               shard_stride: int | None = None) -> dict[str, Any]:
    """Stage 1b for instances rows ``[start, stop)`` (a placeholder shard when
    ``flows.shard_limit`` skips it: flows/shard_limit.py)."""
    stage_fn = placeholder_points_shard if is_placeholder(shard, shard_stride) else stage_retrieval_shard
    return compute_shard(stage_fn, "points", config, images, workdir, shard, start, stop)


@task(name="merge-points", cache_policy=content_cache("shards"), persist_result=True,
      retries=2, retry_delay_seconds=2, retry_condition_fn=transient_error)
def merge_points_task(shards: list[str], workdir: str) -> dict[str, Any]:
    """points.parquet = the point shards in order."""
    run = RunFolder(workdir)
    merge_points([Path(s) for s in shards], run.points)
    return output_record({"points": run.points})


@flow(name="exits-retrieve-points")
def retrieve_points_flow(images: str, workdir: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrieve pseudo FG/BG points for every object, ``flows.shard_size`` objects per task."""
    cfg = config_from(config)
    run = RunFolder(workdir)
    common = dict(instances=str(run.instances), extractor=str(run.similarity), images=images,
                  images_fingerprint=folder_fingerprint(images), workdir=workdir, config=sections(cfg, *SECTIONS),
                  shard_stride=shard_stride(cfg, run, "retrieval"))
    merged, tasks, shards, reused = map_and_merge("points", retrieve_points_shard_task, merge_points_task, cfg,
                                                  workdir, common)
    return stage_result(tasks, points=merged["outputs"]["points"], shards=shards, reused_shard_files=reused)
