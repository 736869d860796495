"""Flow ``exits-pseudo-labels`` (stage 1d): pseudo masks mapped over shards of objects.

One task per shard (rows ``[start, stop)`` of instances.parquet) writes
``WORKDIR/shards/pseudo-NNNNN.parquet`` (RLE + scores per object); a merge task writes
``pseudo_labels.json`` and ``pseudo_labels.parquet``. Shards run on the flow's task runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.pipeline import stage_pseudo_shard
from exits.run_folder import RunFolder
from exits.stages.pseudo_labels import merge_pseudo_labels
from flows.caching import content_cache, folder_fingerprint, output_record
from flows.runtime import config_from, sections, stage_result, transient_error
from flows.shard_limit import is_placeholder, placeholder_pseudo_shard, shard_stride
from flows.stage_tasks import compute_shard, map_and_merge

SECTIONS = ("device", "data", "backbone", "retrieval", "generator", "pseudo")


@task(name="pseudo-labels-shard", task_run_name="pseudo-{shard:05d}",
      cache_policy=content_cache("instances", "generator", "points"), persist_result=True,
      retries=1, retry_delay_seconds=2, retry_condition_fn=transient_error)
def pseudo_labels_shard_task(instances: str, generator: str, points: str | None, images: str,
                             images_fingerprint: str, workdir: str, shard: int, start: int, stop: int,
                             config: dict[str, Any], shard_stride: int | None = None) -> dict[str, Any]:
    """Stage 1d for instances rows ``[start, stop)`` (a placeholder shard when
    ``flows.shard_limit`` skips it: flows/shard_limit.py)."""
    stage_fn = placeholder_pseudo_shard if is_placeholder(shard, shard_stride) else stage_pseudo_shard
    return compute_shard(stage_fn, "pseudo", config, images, workdir, shard, start, stop)


@task(name="merge-pseudo-labels", cache_policy=content_cache("shards", "annotations"), persist_result=True,
      retries=2, retry_delay_seconds=2, retry_condition_fn=transient_error)
def merge_pseudo_labels_task(shards: list[str], annotations: str, workdir: str) -> dict[str, Any]:
    """pseudo_labels.json / .parquet from the pseudo shards in order and the input json."""
    run = RunFolder(workdir)
    merge_pseudo_labels([Path(s) for s in shards], Path(annotations), run.root)
    return output_record({"json": run.pseudo_json, "parquet": run.pseudo_parquet})


@flow(name="exits-pseudo-labels")
def pseudo_labels_flow(images: str, annotations: str, workdir: str,
                       config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pseudo masks for every object, ``flows.shard_size`` objects per task, then merged."""
    cfg = config_from(config)
    run = RunFolder(workdir)
    points = str(run.points) if cfg.generator.use_retrieval else None
    common = dict(instances=str(run.instances), generator=str(run.generator), points=points, images=images,
                  images_fingerprint=folder_fingerprint(images), workdir=workdir, config=sections(cfg, *SECTIONS),
                  shard_stride=shard_stride(cfg, run, "pseudo labels"))
    merged, tasks, shards, reused = map_and_merge("pseudo", pseudo_labels_shard_task, merge_pseudo_labels_task, cfg,
                                                  workdir, common, annotations=annotations)
    return stage_result(tasks, pseudo_labels=merged["outputs"]["json"], shards=shards, reused_shard_files=reused)
