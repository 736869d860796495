"""Flow ``exits-report``: mIoU report of the run's pseudo masks (``WORKDIR/report/``).

The report itself (files, figures, Prefect artifacts) is :func:`exits.pipeline.stage_report`;
this flow only caches it on the pseudo labels, the GT json and the ``eval`` settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from exits.pipeline import stage_report
from exits.run_folder import RunFolder
from flows.caching import content_cache, output_record, run_task
from flows.runtime import config_from, results_dir, sections, stage_result, transient_error

SECTIONS = ("eval",)


@task(name="report", cache_policy=content_cache("pseudo_labels", "gt", "instances"), persist_result=True,
      retries=2, retry_delay_seconds=2, retry_condition_fn=transient_error)
def report_task(pseudo_labels: str, gt: str, instances: str, workdir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Write WORKDIR/report/; no outputs (and no mIoU) when no object has a GT mask."""
    summary = stage_report(config_from(config), Path(workdir), Path(gt))
    if summary is None:
        return output_record({}, miou_all=None, miou_separated=None)
    return output_record({"report": RunFolder(workdir).report_dir}, miou_all=summary["all"]["miou"],
                         miou_separated=summary["separated"]["miou"])


@flow(name="exits-report")
def report_flow(workdir: str, gt: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """mIoU of ``WORKDIR/pseudo_labels.json`` against the GT masks in ``gt`` (a COCO json)."""
    cfg = config_from(config)
    paths = RunFolder(workdir)
    record, state = run_task(report_task, results_dir(workdir), {"retries": cfg.flows.retries},
                             pseudo_labels=str(paths.pseudo_json), gt=gt, instances=str(paths.instances),
                             workdir=workdir, config=sections(cfg, *SECTIONS))
    return stage_result({"report": state}, miou_all=record["miou_all"], miou_separated=record["miou_separated"])
