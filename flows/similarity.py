"""Flow ``exits-train-similarity`` (stage 1a): the MIL-trained similarity extractor.

Training resumes from its epoch checkpoint after a crash or kill; the checkpoint folder is
keyed by the task's cache key, so a run with other data or settings starts afresh instead of
resuming another run's epochs. ``train.nproc_per_node`` / ``train.nnodes`` (the task's
``launch`` argument, left out of its cache key) train on every GPU of the machine, or of
several, under torchrun (:func:`flows.stage_tasks.train_stage`).
"""
from __future__ import annotations

from typing import Any

from prefect import flow, task

from exits.run_folder import RunFolder
from flows.caching import content_cache, folder_fingerprint, run_task
from flows.runtime import config_from, results_dir, sections, stage_result, transient_error
from flows.stage_tasks import train_stage

SECTIONS = ("seed", "device", "amp", "data", "backbone", "similarity")


@task(name="train-similarity-extractor", cache_policy=content_cache("instances") - "launch", persist_result=True,
      retries=1, retry_delay_seconds=5, retry_condition_fn=transient_error)
def train_similarity_task(instances: str, images: str, images_fingerprint: str, workdir: str,
                          config: dict[str, Any], launch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 1a: MIL-trained ViT, saved to similarity/model.pt."""
    return train_stage("similarity", config, launch, instances, images, workdir)


@flow(name="exits-train-similarity")
def train_similarity_flow(images: str, workdir: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the similarity extractor on the run's instances table."""
    cfg = config_from(config)
    run = RunFolder(workdir)
    record, state = run_task(train_similarity_task, results_dir(workdir), instances=str(run.instances),
                             images=images, images_fingerprint=folder_fingerprint(images), workdir=workdir,
                             config=sections(cfg, *SECTIONS), launch=sections(cfg, "train")["train"])
    return stage_result({"train-similarity-extractor": state}, model=record["outputs"]["model"])
