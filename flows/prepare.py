"""Flow ``exits-prepare-instances``: validate the annotations, write ``instances.parquet``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.pipeline import stage_prepare
from exits.run_folder import RunFolder
from flows.caching import content_cache, folder_fingerprint, output_record, run_task
from flows.runtime import config_from, results_dir, sections, stage_result, transient_error


@task(name="prepare-instances", cache_policy=content_cache("annotations"), persist_result=True,
      retries=2, retry_delay_seconds=2, retry_condition_fn=transient_error)
def prepare_instances_task(annotations: str, images: str, images_fingerprint: str, workdir: str,
                           config: dict[str, Any]) -> dict[str, Any]:
    """Stage 0. ``images_fingerprint`` (file list + sizes + mtimes) is there for the cache key."""
    cfg = config_from(config)
    summary = stage_prepare(cfg, Path(annotations), Path(images), Path(workdir), progress=False)
    run = RunFolder(workdir)
    return output_record({"instances": run.instances, "rejections": run.rejections}, summary=summary)


@flow(name="exits-prepare-instances")
def prepare_instances_flow(images: str, annotations: str, workdir: str,
                           config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``annotations`` against ``images``; write instances.parquet and rejections.json."""
    cfg = config_from(config)
    record, state = run_task(prepare_instances_task, results_dir(workdir), {"retries": cfg.flows.retries},
                             annotations=annotations, images=images, images_fingerprint=folder_fingerprint(images),
                             workdir=workdir, config=sections(cfg, "data"))
    return stage_result({"prepare-instances": state}, instances=record["outputs"]["instances"],
                        summary=record["summary"])
