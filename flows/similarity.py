"""Flow ``exits-train-similarity`` (stage 1a): the MIL-trained similarity extractor.

Training resumes from its epoch checkpoint after a crash or kill; the checkpoint folder is
keyed by the task's cache key, so a run with other data or settings starts afresh instead of
resuming another run's epochs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.engine import resolve_device
from exits.pipeline import StagePaths, stage_similarity
from flows.caching import content_cache, folder_fingerprint, keyed_checkpoint_dir, output_record, prune_other_dirs, run_task
from flows.runtime import config_from, crop_dataset, results_dir, sections, stage_result, transient_error

SECTIONS = ("seed", "device", "amp", "data", "backbone", "similarity")


@task(name="train-similarity-extractor", cache_policy=content_cache("instances"), persist_result=True,
      retries=1, retry_delay_seconds=5, retry_condition_fn=transient_error)
def train_similarity_task(instances: str, images: str, images_fingerprint: str, workdir: str,
                          config: dict[str, Any]) -> dict[str, Any]:
    """Stage 1a: MIL-trained ViT, saved to similarity/model.pt."""
    cfg = config_from(config)
    paths = StagePaths(Path(workdir))
    checkpoints = keyed_checkpoint_dir(paths.similarity.parent / "checkpoints")
    stage_similarity(cfg, crop_dataset(instances, images, cfg.data.crop_size), paths, str(resolve_device(cfg.device)),
                     progress=False, checkpoint_dir=checkpoints)
    prune_other_dirs(checkpoints)
    return output_record({"model": paths.similarity})


@flow(name="exits-train-similarity")
def train_similarity_flow(images: str, workdir: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the similarity extractor on the run's instances table."""
    cfg = config_from(config)
    paths = StagePaths(Path(workdir))
    record, state = run_task(train_similarity_task, results_dir(workdir), instances=str(paths.instances),
                             images=images, images_fingerprint=folder_fingerprint(images), workdir=workdir,
                             config=sections(cfg, *SECTIONS))
    return stage_result({"train-similarity-extractor": state}, model=record["outputs"]["model"])
