"""Flow ``exits-retrieve-points`` (stage 1b): point retrieval mapped over shards of objects.

One task per shard (rows ``[start, stop)`` of instances.parquet) writes
``WORKDIR/shards/points-NNNNN.parquet``; a merge task writes ``points.parquet``. Shards run
on the flow's task runner (threads, or Dask workers on other machines).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.engine import resolve_device
from exits.pipeline import StagePaths, num_instances, stage_retrieval_shard
from exits.stages.point_retrieval import merge_points
from exits.stages.shards import shard_key, shard_ranges
from flows.caching import content_cache, current_cache_key, folder_fingerprint, output_record, run_shards, run_task
from flows.runtime import config_from, results_dir, sections, stage_result, transient_error

SECTIONS = ("device", "data", "backbone", "retrieval")


@task(name="retrieve-points-shard", task_run_name="points-{shard:05d}",
      cache_policy=content_cache("instances", "extractor"), persist_result=True,
      retries=1, retry_delay_seconds=2, retry_condition_fn=transient_error)
def retrieve_points_shard_task(instances: str, extractor: str, images: str, images_fingerprint: str, workdir: str,
                               shard: int, start: int, stop: int, config: dict[str, Any]) -> dict[str, Any]:
    """Stage 1b for instances rows ``[start, stop)``. A shard file already written under this
    task's cache key (a run killed after writing it) is kept, not recomputed."""
    cfg = config_from(config)
    paths = StagePaths(Path(workdir))
    out = paths.shard("points", shard)
    key = current_cache_key()
    reused = key is not None and shard_key(out) == key
    if not reused:
        stage_retrieval_shard(cfg, Path(images), paths, start, stop, out, resolve_device(cfg.device), key=key)
    return output_record({"shard": out}, rows=stop - start, reused=reused)


@task(name="merge-points", cache_policy=content_cache("shards"), persist_result=True,
      retries=2, retry_delay_seconds=2, retry_condition_fn=transient_error)
def merge_points_task(shards: list[str], workdir: str) -> dict[str, Any]:
    """points.parquet = the point shards in order."""
    paths = StagePaths(Path(workdir))
    merge_points([Path(s) for s in shards], paths.points)
    return output_record({"points": paths.points})


@flow(name="exits-retrieve-points")
def retrieve_points_flow(images: str, workdir: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrieve pseudo FG/BG points for every object, ``flows.shard_size`` objects per task."""
    cfg = config_from(config)
    paths = StagePaths(Path(workdir))
    results = results_dir(workdir)
    common = dict(instances=str(paths.instances), extractor=str(paths.similarity), images=images,
                  images_fingerprint=folder_fingerprint(images), workdir=workdir, config=sections(cfg, *SECTIONS))
    ranges = shard_ranges(num_instances(paths), cfg.flows.shard_size)
    records, states = run_shards(retrieve_points_shard_task, results,
                                 [dict(common, shard=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)])
    merged, merge_state = run_task(merge_points_task, results, {"retries": cfg.flows.retries},
                                   shards=[r["outputs"]["shard"] for r in records], workdir=workdir)
    tasks = {f"points-{i:05d}": s for i, s in enumerate(states)} | {"merge-points": merge_state}
    return stage_result(tasks, points=merged["outputs"]["points"], shards=len(ranges),
                        reused_shard_files=sum(bool(r["reused"]) for r in records))
