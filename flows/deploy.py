"""Schedules: the pipeline as a Prefect deployment with a cron schedule (``exits serve``).

``serve_pipeline`` registers the deployment with the Prefect server at ``PREFECT_API_URL``
and keeps running: at each scheduled time it runs ``exits-pipeline`` with the stored
parameters (inputs, run folder, the validated config) in a subprocess. Because every stage
is cached, a nightly run over unchanged data recomputes nothing; new or changed annotations
or images recompute only what depends on them. A temporary (ephemeral) server cannot run
schedules: start one with ``prefect server start``.

``serve_loop`` does the same for ``exits-loop`` (flows/loop.py): a scheduled loop run that
reaches the review suspends and shows in the UI as Suspended, waiting for input; once resumed
(the spot-fix page's "review done", ``exits loop --resume``, or the UI's Resume form) the
serving process runs the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from exits.config import ExitsConfig
from flows.pipeline import exits_pipeline
from flows.runtime import config_dict

__all__ = ["pipeline_parameters", "build_deployment", "serve_pipeline", "build_loop_deployment", "serve_loop"]


def pipeline_parameters(images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig,
                        gt: Path | None = None, val_gt: Path | None = None) -> dict[str, Any]:
    """Parameters of ``exits-pipeline`` (absolute paths: scheduled runs may start elsewhere)."""
    return {"images": str(Path(images).resolve()), "annotations": str(Path(annotations).resolve()),
            "workdir": str(Path(workdir).resolve()), "config": config_dict(cfg),
            "gt": str(Path(gt).resolve()) if gt else None, "val_gt": str(Path(val_gt).resolve()) if val_gt else None}


def build_deployment(*, cron: str, images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig,
                     gt: Path | None = None, name: str | None = None, timezone: str | None = None,
                     val_gt: Path | None = None) -> RunnerDeployment:
    """The ``exits-pipeline`` deployment ``name`` (default: the config's name) on a cron schedule.

    The flow is referenced by module path (``flows.pipeline.exits_pipeline``), so runs work
    from any folder where the package is installed.

    Raises:
        ValueError: ``cron`` is not a valid cron expression, or ``timezone`` is unknown.
    """
    return exits_pipeline.to_deployment(
        name=name or cfg.name,
        schedule=Cron(cron, timezone=timezone),
        parameters=pipeline_parameters(images, annotations, workdir, cfg, gt, val_gt),
        description=f"EXITS pseudo labels for {Path(annotations).name} into {Path(workdir).resolve()}",
        tags=["exits"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_pipeline(*, cron: str, images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig,
                   gt: Path | None = None, name: str | None = None, timezone: str | None = None,
                   val_gt: Path | None = None) -> None:
    """Register the deployment and serve it until interrupted (blocks; Ctrl-C stops it)."""
    from prefect import serve

    deployment = build_deployment(cron=cron, images=images, annotations=annotations, workdir=workdir, cfg=cfg,
                                  gt=gt, name=name, timezone=timezone, val_gt=val_gt)
    serve(deployment)


def build_loop_deployment(*, cron: str, images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig,
                          gt: Path | None = None, report_gt: Path | None = None, name: str | None = None,
                          timezone: str | None = None, review: bool = True) -> RunnerDeployment:
    """The ``exits-loop`` deployment ``name`` (default: the config's name) on a cron schedule;
    ``gt`` = held-out GT of the detector, ``report_gt`` = GT of the pseudo-mask report.

    Raises:
        ValueError: ``cron`` is not a valid cron expression, or ``timezone`` is unknown.
    """
    from flows.loop import exits_loop, loop_parameters

    return exits_loop.to_deployment(
        name=name or cfg.name,
        schedule=Cron(cron, timezone=timezone),
        parameters=loop_parameters(images, annotations, workdir, cfg, gt=gt, report_gt=report_gt, review=review,
                                   served=True),
        description=f"EXITS loop (pseudo labels -> review -> Mask R-CNN) for {Path(annotations).name} "
                    f"into {Path(workdir).resolve()}",
        tags=["exits"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_loop(*, cron: str, images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig,
               gt: Path | None = None, report_gt: Path | None = None, name: str | None = None,
               timezone: str | None = None, review: bool = True) -> None:
    """Register the loop deployment and serve it until interrupted (blocks; Ctrl-C stops it)."""
    from prefect import serve

    serve(build_loop_deployment(cron=cron, images=images, annotations=annotations, workdir=workdir, cfg=cfg, gt=gt,
                                report_gt=report_gt, name=name, timezone=timezone, review=review))
