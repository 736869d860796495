"""``exits loop``: the whole loop as one Prefect flow with a person in it (flows/loop.py).

    exits loop -i IMAGES -a ANNOTATIONS -w WORKDIR [--gt VAL_JSON]   start, or pick up the folder's run
    exits loop --resume WORKDIR                                       "review done" from a shell

A second ``exits loop`` on a folder whose loop run is suspended or resumed continues that run
(its stored parameters win) instead of starting a new one; a finished or failed one is
followed by a new run, in which every unchanged stage is a cache hit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from exits.cli.support import error_text, fail, quiet_tracebacks, setup_logging
from exits.config import ConfigError, load_config

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file, or a name in configs/ (demo, coco, lvis, voc)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config value, e.g. --set review.budget=20 (repeatable)")


def loop_command(
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="image folder"),
    annotations: Optional[Path] = typer.Option(None, "--annotations", "-a", help="COCO/LVIS instances json with extreme_points (or masks)"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", "-w", help="run folder (the same as `exits run`'s: same files, same cache)"),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    gt: Optional[Path] = typer.Option(None, "--gt", help="held-out json with GT masks (images in --images): the detector's mask AP after the loop"),
    report_gt: Optional[Path] = typer.Option(None, "--report-gt", help="json with GT masks for the pseudo-mask report and the fixed set's mIoU (default: --annotations when it has masks)"),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, help="review the K lowest-scoring masks (default: review.budget in the config)"),
    below_score: Optional[float] = typer.Option(None, "--below-score", min=0.0, max=1.0, help="review only masks scoring below this (default: review.below_score)"),
    no_review: bool = typer.Option(False, "--no-review", help="no human step: run straight through (CI, schedules)"),
    detach: bool = typer.Option(False, "--detach", help="end this process when the run suspends for review (the run waits in Prefect; continue with the page's 'review done' or --resume)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="RUN FOLDER: resume its suspended loop run (= 'review done') and continue it here"),
    reviewer: Optional[str] = typer.Option(None, "--reviewer", help="name recorded with --resume (default: login name)"),
) -> None:
    """The whole loop: pseudo labels -> report -> human review -> export -> Mask R-CNN -> summary.

    Runs the Prefect flow `exits-loop`. At the review the flow run suspends (it holds no
    process) with a message naming the spot-fix page (`exits spotfix -w WORKDIR`), whose
    queue is limited to the triage budget; its "review done" button resumes the run, as does
    `exits loop --resume WORKDIR`. Without --detach this process waits and continues the run
    itself. Writes WORKDIR/loop/ (loop.json: the flow run id; review.json; summary.json/.md).
    """
    setup_logging(False)
    from exits.cli.commands import _check_inputs, _check_trainable, _check_workdir

    try:
        if resume is not None:
            if any(v is not None for v in (images, annotations, workdir)):
                fail("--resume WORKDIR continues the folder's run with its stored inputs: leave out -i/-a/-w")
            _resume_and_continue(resume, reviewer)
            return
        if images is None or annotations is None or workdir is None:
            fail("exits loop needs --images, --annotations and --workdir (or --resume WORKDIR)")
        sets = list(overrides or [])
        sets += [f"review.budget={budget}"] if budget is not None else []
        sets += [f"review.below_score={below_score}"] if below_score is not None else []
        cfg = load_config(config, sets)
        _check_trainable(cfg)
        _check_inputs(images, annotations, gt)
        _check_inputs(images, annotations, report_gt)
        _check_workdir(workdir)
    except ConfigError as exc:
        fail(error_text(exc))
    from flows.loop import loop_parameters
    from flows.prefect_env import tie_temporary_server_to_process

    quiet_tracebacks()
    tie_temporary_server_to_process()
    run_id = _pick_up(workdir)
    if run_id is None:
        from flows.loop_control import start_loop_run

        params = loop_parameters(images, annotations, workdir, cfg, gt=gt, report_gt=report_gt, review=not no_review)
        run_id = start_loop_run(params)
        typer.echo(f"loop run {run_id} started (deployment exits-loop/on-demand)")
    _drive(workdir, run_id, detach)


def _pick_up(workdir: Path) -> Optional[str]:
    """The folder's loop run to continue (suspended or resumed), or None to start a new one.

    Raises (as one error line): a run another live process executes right now."""
    from flows.loop import read_loop_state
    from flows.loop_control import loop_run_state

    try:
        loop = read_loop_state(workdir)
    except ValueError as exc:
        fail(str(exc))
    if loop is None:
        return None
    state = loop_run_state(loop["flow_run_id"])
    if state is None or state.is_final():
        return None
    if state.is_paused() or state.is_scheduled():
        typer.echo(f"continuing loop run {loop['flow_run_id']} of {workdir} ({state.name}); its stored inputs and config apply")
        return loop["flow_run_id"]
    pid = loop.get("pid")
    if pid and _alive(int(pid)):
        fail(f"loop run {loop['flow_run_id']} of {workdir} is running in process {pid}; wait for it or stop it")
    _mark_crashed(loop["flow_run_id"])  # its process died mid-stage: a new run redoes only what is missing
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark_crashed(flow_run_id: str) -> None:
    from uuid import UUID

    from prefect import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(flow_run_id), Crashed(message="its `exits loop` process died"), force=True)


def _drive(workdir: Path, run_id: Any, detach: bool) -> None:
    """Execute the run; at a suspension wait for the resume (unless ``detach``) and go on."""
    from flows.loop import write_loop_state
    from flows.loop_control import execute_loop_run, loop_run_state, wait_for_resume

    while True:
        state = loop_run_state(run_id)
        if state is not None and state.is_paused():
            loop = _loop_state(workdir)
            typer.echo(loop.get("message") or f"loop run {run_id} waits for review")
            if detach:
                typer.echo(f"detached: the run waits in Prefect; `exits loop --resume {workdir}` continues it")
                return
            typer.echo("waiting for 'review done' (Ctrl+C leaves the run waiting; `exits loop` again picks it up)")
            try:
                state = wait_for_resume(workdir, run_id)
            except KeyboardInterrupt:
                typer.echo(f"\nstopped waiting; loop run {run_id} still waits for review "
                           f"(`exits loop --resume {workdir}` or the page's 'review done' continues it)")
                raise typer.Exit(130) from None
        if state is None or not state.is_scheduled():
            fail(f"loop run {run_id} is {state.name if state else 'unknown to the Prefect server'}; nothing to continue")
        write_loop_state(workdir, pid=os.getpid())
        outcome, summary = execute_loop_run(run_id)
        if outcome == "completed":
            _print_summary(summary or {})
            return


def _loop_state(workdir: Path) -> dict:
    from flows.loop import read_loop_state

    return read_loop_state(workdir) or {}


def _resume_and_continue(workdir: Path, reviewer: Optional[str]) -> None:
    from exits.spotfix.app import default_user
    from flows.loop_control import LoopError, NotWaitingForReview, loop_run_state, resume_loop
    from flows.prefect_env import tie_temporary_server_to_process

    quiet_tracebacks()
    tie_temporary_server_to_process()
    try:
        loop = _loop_state(workdir) if workdir.is_dir() else {}
        if not loop:
            raise LoopError(f"{workdir}: no loop run (loop/loop.json missing); start one with `exits loop -i -a -w`")
        state = loop_run_state(loop["flow_run_id"])
        if state is not None and state.is_paused():
            done = resume_loop(workdir, reviewer=reviewer or default_user(), note="exits loop --resume")
            typer.echo(f"resumed loop run {done['flow_run_id']} ({done['state']})")
        elif state is None or not state.is_scheduled():
            raise NotWaitingForReview(f"loop run {loop['flow_run_id']} of {workdir} is not waiting for review "
                                      f"(state: {state.name if state else 'unknown to the Prefect server'})")
    except (LoopError, ValueError) as exc:
        fail(str(exc))
    _drive(workdir, loop["flow_run_id"], detach=False)


def _print_summary(summary: dict) -> None:
    review = summary.get("review") or {}
    typer.echo(f"loop run {summary.get('flow_run_id')} completed in {summary.get('seconds')} s")
    typer.echo(f"reviewed: {summary.get('reviewed')}; fixed {review.get('fixed', 0)}, accepted {review.get('accepted', 0)}, "
               f"rejected {review.get('rejected', 0)} (budget {review.get('budget', 0)})")
    if review.get("fixed_miou"):
        fm = review["fixed_miou"]
        typer.echo(f"fixed masks vs GT: mIoU {fm['before']:.4f} before -> {fm['after']:.4f} after ({fm['count']} objects)")
    typer.echo(f"stage 2 trained on {summary.get('train_json')}")
    ap = summary.get("mask_ap") or {}
    if ap:
        before, after = ap.get("before"), ap.get("after")
        typer.echo(f"mask AP on {Path(str(ap.get('gt'))).name}: before fixes {before.get('mask_AP') if before else '–'}, "
                   f"after {after.get('mask_AP') if after else '–'}")
    elif summary.get("detector"):
        typer.echo(f"detector: {summary['detector']}")
    typer.echo(f"summary: {Path(summary.get('workdir', '.')) / 'loop' / 'summary.md'}")
