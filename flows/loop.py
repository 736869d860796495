"""Flow ``exits-loop``: the whole loop, with a person in it.

stage 1 + report (the ``exits-pipeline`` subflow: same run folder, same cache as ``exits run``)
-> triage budget (``review:`` in the config: the K lowest-scoring masks and/or those below a
score; ``loop/review.json``) -> the flow run *suspends* (Prefect's ``suspend_flow_run``: the
run waits in the Prefect server as "Suspended", holding no process) with a message naming
the spot-fix page -> a reviewer fixes masks in the page and presses "review done", which
resumes the run with a :class:`ReviewDone` input (or ``exits loop --resume WORKDIR``, or
"Resume" in the Prefect UI) -> ``exits export`` -> stage 2 (``exits-train-detector``
subflow) -> its mask AP on ``val_gt`` -> ``loop/summary.json`` + ``.md``.

Suspending needs a deployment (Prefect re-runs a resumed flow run from it): ``exits loop``
runs the flow through the deployment ``exits-loop/on-demand`` and executes the flow run in
its own process (:mod:`flows.loop_control`); ``exits serve --loop`` serves a scheduled one.
A resumed run executes the flow function again from the top: every stage before the review
is a cache hit, and ``suspend_flow_run`` with the same key returns the reviewer's input
instead of suspending again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from pydantic import Field

from exits.config import ExitsConfig
from exits.io import read_json_if_exists, write_json
from exits.run_folder import RunFolder
from exits.stages.review import (detector_before_after, record_detector_metrics, review_outcome, write_loop_summary,
                                 write_review_queue)
from flows.detector import train_detector_flow
from flows.pipeline import exits_pipeline
from flows.runtime import config_dict, config_from, transient_error

__all__ = ["ReviewDone", "exits_loop", "REVIEW_KEY", "loop_parameters", "write_loop_state", "read_loop_state"]

log = logging.getLogger(__name__)

# The suspension's key: a resumed run that reaches suspend_flow_run again with this key gets
# the reviewer's input back instead of suspending a second time.
REVIEW_KEY = "review"


class ReviewDone(RunInput):
    """What "review done" sends with the resume (the Prefect UI shows it as a form)."""

    reviewer: str = Field("", description="who reviewed")
    note: str = Field("", description="free text kept in the loop's summary")


def loop_parameters(images: Path, annotations: Path, workdir: Path, cfg: ExitsConfig, gt: Path | None = None,
                    report_gt: Path | None = None, review: bool = True, served: bool = False) -> dict[str, Any]:
    """Parameters of ``exits-loop`` (absolute paths: a served run may start elsewhere)."""
    def absolute(p: Path | None) -> str | None:
        return str(Path(p).resolve()) if p else None

    return {"images": absolute(images), "annotations": absolute(annotations), "workdir": absolute(workdir),
            "config": config_dict(cfg), "gt": absolute(gt), "report_gt": absolute(report_gt), "review": review,
            "served": served}


def read_loop_state(workdir: str | Path) -> dict[str, Any] | None:
    """``loop/loop.json`` (None when there is none).

    Raises:
        ValueError: the file is not valid JSON or names no flow run (names the file).
    """
    path = RunFolder(workdir).loop_state
    data = read_json_if_exists(path, "delete it to start a new loop run")
    if data is None:
        return None
    if not isinstance(data, dict) or not data.get("flow_run_id"):
        raise ValueError(f"{path}: names no flow run (no 'flow_run_id'); delete it to start a new loop run")
    return data


def write_loop_state(workdir: str | Path, **fields: Any) -> dict[str, Any]:
    """Update ``loop/loop.json`` with ``fields`` (atomically); returns the new content."""
    run = RunFolder(workdir)
    run.loop_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = read_loop_state(workdir) or {}
    except ValueError:
        state = {}
    if fields.get("flow_run_id") not in (None, state.get("flow_run_id")):
        state = {}  # a new loop run: nothing of the old one carries over
    state.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(run.loop_state, state, indent=1)
    return state


@task(name="export-fixes", retries=2, retry_delay_seconds=2, retry_condition_fn=transient_error)
def export_fixes_task(workdir: str) -> dict[str, Any]:
    """``exits export``: merge the decisions over the pseudo labels -> pseudo_labels_fixed.json."""
    from dataclasses import asdict

    from exits.spotfix.export import run_export

    result = run_export(workdir)
    return {"path": str(result.path), **asdict(result.counts)}


def review_message(workdir: str, queue: dict[str, Any], page_url: str) -> str:
    """The suspension message: what to review, where, and how to continue."""
    return (f"exits loop waits for review: {len(queue['ann_ids'])} of {queue['objects']} masks "
            f"(lowest scores) in {workdir}. Open the spot-fix page at {page_url} "
            f"(serve it with `exits spotfix -w {workdir}`), fix/accept/reject them, then press "
            f"'review done' (or run `exits loop --resume {workdir}`, or Resume in the Prefect UI).")


@flow(name="exits-loop", persist_result=True,
      description="EXITS loop: pseudo labels -> report -> human review (suspends) -> export -> Mask R-CNN -> summary")
def exits_loop(images: str, annotations: str, workdir: str, config: dict[str, Any] | None = None,
               gt: str | None = None, report_gt: str | None = None, review: bool = True,
               served: bool = False) -> dict[str, Any]:
    """The whole loop on one run folder.

    Args:
        images, annotations, workdir: as for ``exits-pipeline``.
        config: the validated config as a dict (``review:`` holds the triage budget).
        gt: held-out json with GT masks (images under ``images``) the detector is evaluated on.
        report_gt: json with GT masks for the pseudo-mask report (default: the annotations).
        review: False = no human step (CI, schedules without a reviewer).
        served: the run is executed by ``exits serve --loop`` (the page then only resumes it).
    Returns:
        The loop summary (also ``loop/summary.json``).
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    cfg = config_from(config)
    run = RunFolder(workdir)
    flow_run_id = str(flow_run.id)
    t0 = time.perf_counter()
    deployment_name = _deployment_name()
    write_loop_state(workdir, flow_run_id=flow_run_id, state="running", executor="exits serve" if served else "exits loop",
                     deployment=deployment_name and f"exits-loop/{deployment_name}", review=review)
    stage1 = exits_pipeline(images=images, annotations=annotations, workdir=workdir,
                            config=config_dict(cfg.model_copy(update={"train_detector": False})), gt=report_gt)
    queue = write_review_queue(workdir, cfg.review.budget, cfg.review.below_score)
    reviewed: ReviewDone | None = None
    if review:
        if not _review_fired(flow_run_id):  # a resumed run passes straight through with the input
            message = review_message(workdir, queue, cfg.review.page_url)
            write_loop_state(workdir, state="waiting_for_review", page_url=cfg.review.page_url, message=message,
                             budget=len(queue["ann_ids"]))
            _publish_review_artifact(queue, message)
            logger.info(message)
        timeout = None if cfg.review.timeout_hours is None else int(cfg.review.timeout_hours * 3600)
        reviewed = suspend_flow_run(wait_for_input=ReviewDone, timeout=timeout, key=REVIEW_KEY)
        write_loop_state(workdir, state="resumed", reviewer=reviewed.reviewer, note=reviewed.note)
        logger.info("review done (%s); exporting the fixes", reviewed.reviewer or "no name given")
    exported = export_fixes_task(workdir)
    train_json = run.training_labels()
    detector = train_detector_flow(images=images, workdir=workdir, config=config_dict(cfg), val_gt=gt)
    report_truth = report_gt or _report_gt(run)
    summary: dict[str, Any] = {
        "flow_run_id": flow_run_id, "workdir": workdir, "reviewed": reviewed is not None,
        "reviewer": reviewed.reviewer if reviewed else None, "note": reviewed.note if reviewed else None,
        "review": review_outcome(workdir, queue["ann_ids"], report_truth),
        "export": exported, "train_json": train_json.name,
        "miou_all": stage1.get("miou_all"), "miou_separated": stage1.get("miou_separated"),
        "detector": detector["metrics"], "mask_ap": None,
    }
    if gt and detector["metrics"] is not None:
        decisions = int(exported["accepted"]) + int(exported["rejected"]) if train_json == run.fixed_json else 0
        record_detector_metrics(workdir, train_json, decisions, gt, detector["metrics"])
        summary["mask_ap"] = {"gt": gt, **detector_before_after(workdir, gt, train_json)}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_loop_summary(workdir, summary)
    write_loop_state(workdir, state="completed", summary=str(run.loop_summary))
    return summary


def _review_fired(flow_run_id: str) -> bool:
    """Whether this flow run already suspended for the review (it is being re-run after the resume)."""
    from uuid import UUID

    from prefect import get_client

    with get_client(sync_client=True) as client:
        policy = client.read_flow_run(UUID(flow_run_id)).empirical_policy
    return REVIEW_KEY in (policy.pause_keys or set())


def _deployment_name() -> str | None:
    from prefect.runtime import deployment

    return deployment.name


def _report_gt(run: RunFolder) -> str | None:
    """The GT json the report used (the run's gt, else its annotations), if it exists."""
    try:
        path = run.gt_json()
    except FileNotFoundError:
        return None
    return str(path) if Path(path).is_file() else None


def _publish_review_artifact(queue: dict[str, Any], message: str) -> None:
    """A Markdown artifact on the flow run: the message and the budget (a view for the UI;
    failing to write it never fails the run)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        rows = "\n".join(f"| {a} | {s} |" for a, s in zip(queue["ann_ids"][:200], queue["scores"][:200]))
        create_markdown_artifact(key="exits-review-queue", description="masks waiting for review",
                                 markdown=f"{message}\n\n| ann_id | score |\n|---|---|\n{rows}\n")
    except Exception as exc:  # noqa: BLE001 - an artifact is a view, never a failure
        log.warning("could not publish the review-queue artifact: %s", exc)
