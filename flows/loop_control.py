"""Starting, waiting for, resuming and continuing ``exits-loop`` flow runs (``exits loop``,
the spot-fix page's "review done" button).

A loop run is a flow run of a deployment (Prefect re-runs a suspended run only through one):
``exits loop`` applies ``exits-loop/on-demand`` (no schedule), creates a flow run with the
run's parameters and executes it in its own process. At the review the run suspends: the
process may wait for the resume (default) or end (``--detach``); nothing is lost either way,
because the run's state lives in the Prefect server and its id in ``loop/loop.json``.

Who executes a resumed run: the ``exits loop`` process that waits for it (it holds
``loop/waiter.lock``), else the ``exits serve --loop`` process whose deployment it belongs
to, else a background ``exits loop --resume WORKDIR`` that :func:`continue_loop` starts
(log in ``loop/continue.log``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

from exits.run_folder import RunFolder
from flows.loop import ReviewDone, exits_loop, read_loop_state, write_loop_state

__all__ = ["ON_DEMAND_DEPLOYMENT", "LoopError", "NotWaitingForReview", "start_loop_run", "execute_loop_run",
           "loop_run_state", "wait_for_resume", "resume_loop", "continue_loop", "waiter_lock", "waiter_present"]

ON_DEMAND_DEPLOYMENT = "on-demand"
POLL_S = 2.0


class LoopError(RuntimeError):
    """A loop run cannot be found or continued (the message says why and what to do)."""


class NotWaitingForReview(LoopError):
    """The loop run is not suspended at the review (its state is in the message)."""


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


def start_loop_run(parameters: dict[str, Any]) -> UUID:
    """Apply ``exits-loop/on-demand`` and create a flow run of it with ``parameters``; its id
    is written to ``loop/loop.json`` at once (before anything runs)."""
    from prefect.types.entrypoint import EntrypointType

    deployment = exits_loop.to_deployment(name=ON_DEMAND_DEPLOYMENT, tags=["exits"],
                                          description="exits loop runs started from a shell",
                                          entrypoint_type=EntrypointType.MODULE_PATH)
    deployment_id = deployment.apply()
    with _client() as client:
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters, tags=["exits"])
    write_loop_state(parameters["workdir"], flow_run_id=str(flow_run.id), state="scheduled", executor="exits loop",
                     deployment=f"exits-loop/{ON_DEMAND_DEPLOYMENT}", review=parameters.get("review", True))
    return flow_run.id


def loop_run_state(flow_run_id: str | UUID) -> Any:
    """The flow run's current Prefect state (None when the server does not know the run).

    Raises:
        LoopError: the id is not a UUID.
    """
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = UUID(str(flow_run_id))
    except ValueError as exc:
        raise LoopError(f"not a flow run id: {flow_run_id!r}") from exc
    with _client() as client:
        try:
            return client.read_flow_run(run_id).state
        except ObjectNotFound:
            return None


def execute_loop_run(flow_run_id: str | UUID) -> tuple[str, dict[str, Any] | None]:
    """Execute the (scheduled or resumed) loop run in this process until it ends or suspends.

    Returns ("completed", summary) or ("suspended", None).
    Raises whatever the flow raised (a failed stage), after Prefect recorded the failure.
    """
    from prefect.engine import Pause
    from prefect.flow_engine import run_flow

    with _client() as client:
        flow_run = client.read_flow_run(UUID(str(flow_run_id)))
    try:
        summary = run_flow(exits_loop, flow_run=flow_run)
    except Pause:
        return "suspended", None
    return "completed", summary


def wait_for_resume(workdir: str | Path, flow_run_id: str | UUID, poll_s: float = POLL_S) -> Any:
    """Block while the run is suspended (holding ``loop/waiter.lock``, so "review done" knows
    this process continues it); returns the state it left suspension for."""
    with waiter_lock(workdir):
        while True:
            state = loop_run_state(flow_run_id)
            if state is None or not state.is_paused():
                return state
            time.sleep(poll_s)


@contextlib.contextmanager
def waiter_lock(workdir: str | Path) -> Iterator[None]:
    """Hold ``loop/waiter.lock`` (an flock the kernel drops when the process dies)."""
    path = RunFolder(workdir).loop_dir / "waiter.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def waiter_present(workdir: str | Path) -> bool:
    """Whether an ``exits loop`` process is waiting for this folder's review."""
    path = RunFolder(workdir).loop_dir / "waiter.lock"
    if not path.is_file():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def resume_loop(workdir: str | Path, reviewer: str = "", note: str = "") -> dict[str, Any]:
    """Resume the folder's suspended loop run through Prefect's API with a :class:`ReviewDone`.

    Returns ``{"flow_run_id", "state"}`` (the state after resuming: Scheduled).
    Raises:
        LoopError: the folder has no loop run (``loop/loop.json``) or Prefect does not know it.
        NotWaitingForReview: the run is not suspended (already resumed, finished, failed...).
    """
    from prefect.exceptions import FlowPauseTimeout, NotPausedError
    from prefect.flow_runs import resume_flow_run

    loop = read_loop_state(workdir)
    if loop is None:
        raise LoopError(f"{workdir}: no loop run ({RunFolder(workdir).loop_state} missing); start one with "
                        "`exits loop -i IMAGES -a ANNOTATIONS -w WORKDIR`")
    state = loop_run_state(loop["flow_run_id"])
    if state is None:
        raise LoopError(f"loop run {loop['flow_run_id']} of {workdir} is unknown to the Prefect server "
                        "(another PREFECT_API_URL / PREFECT_HOME?)")
    if not state.is_paused():
        raise NotWaitingForReview(f"loop run {loop['flow_run_id']} of {workdir} is not waiting for review "
                                  f"(state: {state.name})")
    run_input = ReviewDone(reviewer=reviewer, note=note).model_dump(include={"reviewer", "note"})
    try:
        resume_flow_run(UUID(loop["flow_run_id"]), run_input=run_input)
    except NotPausedError as exc:
        raise NotWaitingForReview(f"loop run {loop['flow_run_id']} is not waiting for review ({exc})") from exc
    except FlowPauseTimeout as exc:
        raise NotWaitingForReview(f"loop run {loop['flow_run_id']} waited longer than review.timeout_hours "
                                  "and can no longer be resumed; start a new one with `exits loop`") from exc
    write_loop_state(workdir, state="resumed", reviewer=reviewer, note=note)
    after = loop_run_state(loop["flow_run_id"])
    return {"flow_run_id": loop["flow_run_id"], "state": after.name if after else None}


def continue_loop(workdir: str | Path) -> dict[str, Any]:
    """After a resume: make sure something executes the run. Returns ``{"continued_by", ...}``:
    the waiting ``exits loop``, the ``exits serve`` process of the run's deployment, or a
    background ``exits loop --resume WORKDIR`` started here (``pid``, ``log``)."""
    loop = read_loop_state(workdir) or {}
    if waiter_present(workdir):
        return {"continued_by": "the waiting `exits loop` process"}
    if loop.get("executor") == "exits serve":
        return {"continued_by": f"the `exits serve` process serving {loop.get('deployment')}"}
    run = RunFolder(workdir)
    run.loop_dir.mkdir(parents=True, exist_ok=True)
    with open(run.loop_continue_log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "exits.cli", "loop", "--resume", str(Path(workdir).resolve())],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ))
    return {"continued_by": "a background `exits loop --resume`", "pid": proc.pid, "log": str(run.loop_continue_log)}
