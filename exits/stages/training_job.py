"""A training stage (1a similarity extractor, 1c generator) as a function of plain values.

What a flow's training task runs, in its own process (one training process) or in every
process of a torchrun job (:mod:`exits.engine.launch`, ``train.nproc_per_node`` > 1): the
arguments are JSON values (the config sections as a dict, paths as strings), so a worker
process rebuilds everything from them and inherits nothing of the flow run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from exits.config import ExitsConfig
from exits.run_folder import RunFolder

__all__ = ["TRAINING_STAGES", "stage_model_path", "prepare_training_stage", "train_stage_job"]

TRAINING_STAGES = ("similarity", "generator")


def _check_stage(stage: str) -> None:
    if stage not in TRAINING_STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {TRAINING_STAGES}")


def stage_model_path(stage: str, run: RunFolder) -> Path:
    """Where ``stage`` saves its model: ``similarity/model.pt`` or ``generator/model.pt``."""
    _check_stage(stage)
    return run.similarity if stage == "similarity" else run.generator


def prepare_training_stage(stage: str, config: dict[str, Any], workdir: str) -> None:
    """What the ranks of a job would otherwise each do at once: the generator's memory-mappable
    copy of the point labels (``cache/point-labels-*.arrow``) is written here, once."""
    _check_stage(stage)
    cfg = ExitsConfig.model_validate(config)
    if stage == "generator" and cfg.generator.use_retrieval:
        from exits.stages.generator import SparseLabels

        run = RunFolder(workdir)
        SparseLabels.open(run.points, run.cache_dir)


def train_stage_job(stage: str, config: dict[str, Any], instances: str, images: str, workdir: str,
                    checkpoint_dir: str, device: str) -> str:
    """Train ``stage`` on the crops of ``instances`` (streamed from ``images``) with epoch
    checkpoints in ``checkpoint_dir`` (resumed when present); returns the model's path.

    In a DDP job every rank calls this; the engine splits the batches and rank 0 alone writes
    checkpoints and the model.
    """
    from exits.pipeline import stage_generator, stage_similarity
    from exits.stages.object_crops import StreamingCropDataset

    _check_stage(stage)
    cfg = ExitsConfig.model_validate(config)
    run = RunFolder(workdir)
    body: Callable[..., Path] = stage_similarity if stage == "similarity" else stage_generator
    dataset = StreamingCropDataset(instances, images, cfg.data.crop_size)
    body(cfg, dataset, run, device, progress=False, checkpoint_dir=Path(checkpoint_dir))
    return str(stage_model_path(stage, run))
