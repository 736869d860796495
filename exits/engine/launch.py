"""Run a function in every process of a DDP job started by ``torchrun``, and wait for it.

The training stages use it to train on every GPU of a machine (``train.nproc_per_node``)
or of several machines (``train.nnodes``). :func:`launch` writes a job folder, runs::

    python -m exits.engine.launch torchrun --nproc_per_node K (--standalone | --nnodes N
        --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id JOB) -m exits.engine.launch run JOB/job.json

(``... launch torchrun`` is ``python -m torch.distributed.run`` in a process that dies with
its parent, so a SIGKILLed ``exits run`` leaves no training behind)

and returns rank 0's return value. Each process (:func:`run_job`) joins the process group
(:func:`exits.engine.distributed.init_distributed` reads what torchrun set), calls the job's
``module:function`` with its keyword arguments, and rank 0 writes the result.

Why ``torchrun`` in a subprocess and not ``torch.multiprocessing`` spawn:

- fresh interpreters: a worker inherits nothing of the calling process, which is a Prefect
  flow run (its threads, event loop, API client and settings context); a process forked
  from one dies at once (see the DataLoader note in :mod:`exits.engine.loop`);
- one command for one machine and for many: the multi-machine case is the same job with
  other rendezvous arguments (``python -m exits.engine.launch follow`` starts the other
  machines' share of every job, :mod:`exits.engine.launch_follow`);
- torchrun picks a free port (``--standalone``), sets RANK / LOCAL_RANK / WORLD_SIZE /
  MASTER_ADDR / MASTER_PORT, and stops every rank as soon as one fails (a rank blocked in
  a collective never waits for a dead peer).

The cost is one interpreter start + ``import torch`` per process, seconds next to an epoch.

Job folder (on storage every machine of the job sees)::

    job.json             {"id", "target", "kwargs", "device", "nnodes", "rdzv_endpoint", ...}
    result.json          rank 0's return value (JSON), written atomically
    error-rank<r>.json   a failed rank's exception: type, message, traceback, host, pid, time

A failure in any rank fails :func:`launch` with :class:`RankFailedError` naming the rank
that failed first and its error; the job's output lines are logged here as they come
(rank 0 at INFO, the others' warnings and errors only).
"""
from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from exits.engine.device import resolve_device
from exits.engine.distributed import all_gather_objects, barrier, cleanup_distributed, init_distributed
from exits.io import write_json

__all__ = ["LaunchPlan", "RankFailedError", "resolve_nproc", "launch", "torchrun_command", "run_job",
           "process_group_summary"]

logger = logging.getLogger(__name__)

JOB_FILE, RESULT_FILE, ERROR_PREFIX = "job.json", "result.json", "error-rank"
OUTPUT_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1


class RankFailedError(RuntimeError):
    """A process of a launched job failed (its exception, or torchrun's exit status)."""


@dataclass(frozen=True)
class LaunchPlan:
    """Processes of a job: ``nproc_per_node`` on this machine, ``nnodes`` machines meeting at
    the c10d rendezvous ``rdzv_endpoint`` (host:port) within ``rdzv_timeout_s`` seconds."""

    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_timeout_s: int = 900

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"need nproc_per_node >= 1 and nnodes >= 1, got {self}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (host:port)")

    @property
    def distributed(self) -> bool:
        """More than one process in all: the job runs under torchrun."""
        return self.nproc_per_node * self.nnodes > 1


def resolve_nproc(nproc_per_node: str | int, device: str) -> int:
    """Processes to start on this machine: ``auto`` = one per CUDA device on CUDA, 1 on CPU;
    an int as given (on CPU: that many gloo processes).

    Raises ``ValueError`` when more processes than CUDA devices are asked for (one GPU per
    process), naming the devices this process sees.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        available = torch.cuda.device_count()
        if nproc_per_node == "auto":
            return max(1, available)
        if int(nproc_per_node) > available:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ValueError(f"train.nproc_per_node={nproc_per_node} but this machine has {available} CUDA "
                             f"device(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                             + f"; one process drives one GPU: use auto or at most {available}")
        return int(nproc_per_node)
    return 1 if nproc_per_node == "auto" else int(nproc_per_node)


def torchrun_command(job_file: Path, job_id: str, plan: LaunchPlan) -> list[str]:
    """The torchrun command that runs ``job_file`` on this machine: ``python -m exits.engine.launch
    torchrun ARGS`` is ``python -m torch.distributed.run ARGS`` in a process that dies with the
    one that started it (see :func:`_die_with_parent`).

    One machine: ``--standalone`` (a local rendezvous on a free port). Several: a c10d
    rendezvous at ``plan.rdzv_endpoint`` named by the job id, so every machine that runs
    this command for the same job joins the same group. ``--max_restarts 0``: a failed rank
    fails the job (the flow task decides about retries), with no restart of the others.
    """
    cmd = [sys.executable, "-m", "exits.engine.launch", "torchrun", "--nproc_per_node", str(plan.nproc_per_node),
           "--max_restarts", "0", "--monitor_interval", "0.5"]
    if plan.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(plan.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", str(plan.rdzv_endpoint),
                "--rdzv_id", job_id, "--rdzv_conf", f"join_timeout={plan.rdzv_timeout_s}"]
    return cmd + ["-m", "exits.engine.launch", "run", str(job_file)]


def worker_environment(nproc_per_node: int) -> dict[str, str]:
    """This process's environment for torchrun: unbuffered output, and the CPU cores shared out
    (``OMP_NUM_THREADS`` = cores / processes unless set; torchrun would set 1)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    return env


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: deliver ``sig`` to this process when the process (thread) that started it dies,
    so a SIGKILLed ``exits run`` leaves no training behind to race its re-run. No-op elsewhere.
    Called by the started process itself (not as ``preexec_fn``, unsafe in a process with
    threads such as a Prefect flow run)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _relay(line: str, tail: collections.deque) -> None:
    line = line.rstrip("\n")
    tail.append(line)
    if line.strip():
        logger.info("%s", line)


def launch(target: str, kwargs: Mapping[str, Any], plan: LaunchPlan, jobs_dir: Path, *, name: str,
           device: str) -> Any:
    """Run ``target(**kwargs)`` (``"package.module:function"``, plain JSON values in and out) in
    every process of ``plan`` and return rank 0's return value.

    The job folder is ``jobs_dir/<name>-<id>``; earlier folders of ``name`` (a killed or failed
    run) are removed first, this one after success. Blocks until every process has exited;
    a ``KeyboardInterrupt`` or any error while waiting stops them (SIGTERM, then SIGKILL).
    Raises :class:`RankFailedError` when a process fails.
    """
    jobs_dir = Path(jobs_dir)
    for old in jobs_dir.glob(f"{name}-*"):
        shutil.rmtree(old, ignore_errors=True)
    job_id = f"{name}-{uuid.uuid4().hex[:12]}"
    job_dir = jobs_dir / job_id
    job_dir.mkdir(parents=True)
    job = {"id": job_id, "target": target, "kwargs": dict(kwargs), "device": device, "created": time.time(),
           **asdict(plan)}
    write_json(job_dir / JOB_FILE, job)
    cmd = torchrun_command(job_dir / JOB_FILE, job_id, plan)
    logger.info("%s: %d process(es) x %d machine(s) under torchrun (job %s)", name, plan.nproc_per_node,
                plan.nnodes, job_dir)
    if plan.nnodes > 1:
        logger.info("%s: waiting up to %d s for %d more machine(s) at %s; on each run `python -m exits.engine.launch "
                    "follow %s` (README, 'Multi-GPU and multi-node training')", name, plan.rdzv_timeout_s,
                    plan.nnodes - 1, plan.rdzv_endpoint, jobs_dir)
    tail: collections.deque = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=worker_environment(plan.nproc_per_node))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            _relay(line, tail)
        rc = proc.wait()
    except BaseException:
        stop_process(proc)
        raise
    if rc != 0:
        raise job_failure(job_dir, rc, list(tail))
    result = json.loads((job_dir / RESULT_FILE).read_text())["result"]
    shutil.rmtree(job_dir, ignore_errors=True)
    return result


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (torchrun passes it to its workers), then SIGKILL after ``grace_s`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def job_failure(job_dir: Path, returncode: int, output_tail: list[str]) -> RankFailedError:
    """The error of a failed job: the exception of the rank that failed first (others often
    fail after it, e.g. a collective whose peer died), else torchrun's exit status and the
    last lines of output (a process killed by a signal or the OOM killer writes nothing)."""
    errors = []
    for path in job_dir.glob(f"{ERROR_PREFIX}*.json"):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not errors:
        shown = "\n".join(output_tail[-15:])
        return RankFailedError(f"training job {job_dir.name} failed: torchrun exited with status {returncode} and "
                               f"no process reported an error (killed by a signal or out of memory?); last output:\n{shown}")
    first = min(errors, key=lambda e: e["time"])
    others = sorted(e["rank"] for e in errors if e is not first)
    also = f" (rank(s) {others} failed after it)" if others else ""
    trace = "".join(first["traceback"][-6:]).rstrip()
    return RankFailedError(f"training rank {first['rank']} of {first['world_size']} failed on host {first['host']} "
                           f"(pid {first['pid']}): {first['type']}: {first['message']}{also}\n{trace}")


def process_group_summary(device: str = "auto") -> dict[str, Any]:
    """A job target that trains nothing: every rank's host, pid and device, gathered over the
    process group (a check that machines meet at the rendezvous and talk to each other)."""
    info = init_distributed(device)
    here = {"rank": info.rank, "host": socket.gethostname(), "pid": os.getpid(), "device": str(info.device)}
    return {"world_size": info.world_size, "processes": all_gather_objects(here, info)}


def _import_target(target: str) -> Any:
    module, _, func = target.partition(":")
    if not func:
        raise ValueError(f"job target must be 'module:function', got {target!r}")
    return getattr(importlib.import_module(module), func)


def _configure_worker_logging(rank: int) -> None:
    """Rank 0 logs at INFO (progress, ETA, summaries); the others log warnings and errors only,
    each line prefixed with its rank."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr, force=True,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def run_job(job_file: Path) -> None:
    """One process of a job (torchrun runs this in each): join the group, call the target,
    rank 0 writes ``result.json``; a failure writes ``error-rank<r>.json`` and re-raises."""
    _die_with_parent(signal.SIGKILL)  # torchrun gone (SIGKILL): nothing left training
    job_file = Path(job_file)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    _configure_worker_logging(rank)
    try:
        job = json.loads(job_file.read_text())
        info = init_distributed(job["device"])
        result = _import_target(job["target"])(**job["kwargs"])
        barrier(info)
        if info.is_main:
            write_json(job_file.parent / RESULT_FILE, {"result": result})
    except BaseException as exc:
        write_json(job_file.parent / f"{ERROR_PREFIX}{rank}.json", {
            "rank": rank, "world_size": world_size, "host": socket.gethostname(), "pid": os.getpid(),
            "time": time.time(), "type": type(exc).__name__, "message": str(exc),
            "traceback": traceback.format_exception(exc)})
        raise
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> None:
    """``python -m exits.engine.launch run JOB_FILE`` (what torchrun starts in each process),
    ``... torchrun ARGS`` (torchrun dying with its parent) or ``... follow JOBS_DIR ...`` (the
    other machines of a job)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["torchrun"]:
        from torch.distributed.run import main as torchrun_main

        _die_with_parent(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
        torchrun_main(argv[1:])
        return
    if argv[:1] == ["run"] and len(argv) == 2:
        run_job(Path(argv[1]))
        return
    if argv[:1] == ["follow"]:
        from exits.engine.launch_follow import follow_main

        follow_main(argv[1:])
        return
    sys.exit("usage: python -m exits.engine.launch follow JOBS_DIR [--nproc-per-node N|auto] [--once] "
             "| run JOB_FILE | torchrun TORCHRUN_ARGS")


if __name__ == "__main__":
    main()
