"""Flow ``exits-pseudo-labels`` (stage 1d): pseudo masks mapped over shards of objects.

One task per shard (rows ``[start, stop)`` of instances.parquet) writes
``WORKDIR/shards/pseudo-NNNNN.parquet`` (RLE + scores per object); a merge task writes
``pseudo_labels.json`` and ``pseudo_labels.parquet``. Shards run on the flow's task runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.engine import resolve_device
from exits.pipeline import StagePaths, num_instances, stage_pseudo_shard
from exits.stages.pseudo_labels import merge_pseudo_labels
from exits.stages.shards import shard_key, shard_ranges
from flows.caching import content_cache, current_cache_key, folder_fingerprint, output_record, run_shards, run_task
from flows.runtime import config_from, results_dir, sections, stage_result, transient_error

SECTIONS = ("device", "data", "backbone", "retrieval", "generator", "pseudo")


@task(name="pseudo-labels-shard", task_run_name="pseudo-{shard:05d}",
      cache_policy=content_cache("instances", "generator", "points"), persist_result=True,
      retries=1, retry_delay_seconds=2, retry_condition_fn=transient_error)
def pseudo_labels_shard_task(instances: str, generator: str, points: str | None, images: str,
                             images_fingerprint: str, workdir: str, shard: int, start: int, stop: int,
                             config: dict[str, Any]) -> dict[str, Any]:
    """Stage 1d for instances rows ``[start, stop)``. A shard file already written under this
    task's cache key (a run killed after writing it) is kept, not recomputed."""
    cfg = config_from(config)
    paths = StagePaths(Path(workdir))
    out = paths.shard("pseudo", shard)
    key = current_cache_key()
    reused = key is not None and shard_key(out) == key
    if not reused:
        stage_pseudo_shard(cfg, Path(images), paths, start, stop, out, resolve_device(cfg.device), key=key)
    return output_record({"shard": out}, rows=stop - start, reused=reused)


@task(name="merge-pseudo-labels", cache_policy=content_cache("shards", "annotations"), persist_result=True,
      retries=2, retry_delay_seconds=2, retry_condition_fn=transient_error)
def merge_pseudo_labels_task(shards: list[str], annotations: str, workdir: str) -> dict[str, Any]:
    """pseudo_labels.json / .parquet from the pseudo shards in order and the input json."""
    paths = StagePaths(Path(workdir))
    merge_pseudo_labels([Path(s) for s in shards], Path(annotations), paths.root)
    return output_record({"json": paths.pseudo_json, "parquet": paths.pseudo_parquet})


@flow(name="exits-pseudo-labels")
def pseudo_labels_flow(images: str, annotations: str, workdir: str,
                       config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pseudo masks for every object, ``flows.shard_size`` objects per task, then merged."""
    cfg = config_from(config)
    paths = StagePaths(Path(workdir))
    results = results_dir(workdir)
    points = str(paths.points) if cfg.generator.use_retrieval else None
    common = dict(instances=str(paths.instances), generator=str(paths.generator), points=points, images=images,
                  images_fingerprint=folder_fingerprint(images), workdir=workdir, config=sections(cfg, *SECTIONS))
    ranges = shard_ranges(num_instances(paths), cfg.flows.shard_size)
    records, states = run_shards(pseudo_labels_shard_task, results,
                                 [dict(common, shard=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)])
    merged, merge_state = run_task(merge_pseudo_labels_task, results, {"retries": cfg.flows.retries},
                                   shards=[r["outputs"]["shard"] for r in records], annotations=annotations,
                                   workdir=workdir)
    tasks = {f"pseudo-{i:05d}": s for i, s in enumerate(states)} | {"merge-pseudo-labels": merge_state}
    return stage_result(tasks, pseudo_labels=merged["outputs"]["json"], shards=len(ranges),
                        reused_shard_files=sum(bool(r["reused"]) for r in records))
