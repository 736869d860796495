"""The other machines of a multi-machine training job: ``python -m exits.engine.launch follow``.

With ``train.nnodes: N > 1`` the machine running ``exits run`` starts its share of each
training stage under torchrun with a c10d rendezvous at ``train.rdzv_endpoint`` and writes
the job to ``WORKDIR/cache/train-jobs/<stage>-<id>/job.json`` (shared storage). On each
of the N - 1 other machines::

    python -m exits.engine.launch follow WORKDIR/cache/train-jobs --nproc-per-node auto

watches that folder and runs every new multi-machine job it finds with the same torchrun
rendezvous (:func:`exits.engine.launch.torchrun_command`) and this machine's own number of
processes, one job after the other, until stopped (``--once``: after one job). Ranks are
numbered by the rendezvous; rank 0 writes the checkpoints and the result wherever it runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path

from exits.engine.launch import ERROR_PREFIX, JOB_FILE, RESULT_FILE, LaunchPlan, resolve_nproc, stop_process, \
    torchrun_command, worker_environment

__all__ = ["pending_jobs", "follow", "follow_main"]

logger = logging.getLogger(__name__)


def pending_jobs(jobs_dir: Path, seen: set[str]) -> list[Path]:
    """Job files under ``jobs_dir`` this follower should join: multi-machine, not run here
    before (``seen``), not finished or failed, and younger than their rendezvous timeout
    (older ones are left over from a killed run; nobody waits at their rendezvous)."""
    jobs = []
    for job_file in Path(jobs_dir).glob(f"*/{JOB_FILE}"):
        try:
            jobs.append((json.loads(job_file.read_text()), job_file))
        except (OSError, ValueError):
            continue  # being written or removed
    out = []
    for job, job_file in sorted(jobs, key=lambda j: float(j[0]["created"])):
        done = (job_file.parent / RESULT_FILE).exists() or any(job_file.parent.glob(f"{ERROR_PREFIX}*"))
        fresh = time.time() - float(job["created"]) < float(job["rdzv_timeout_s"])
        if job["id"] not in seen and int(job["nnodes"]) > 1 and not done and fresh:
            out.append(job_file)
    return out


def follow(jobs_dir: Path, nproc_per_node: str | int = "auto", *, once: bool = False, poll_s: float = 1.0) -> int:
    """Join every new multi-machine job under ``jobs_dir`` with this machine's processes;
    returns the number of jobs that failed here (the flow reports their errors)."""
    seen: set[str] = set()
    failures = 0
    logger.info("following training jobs in %s", jobs_dir)
    while True:
        for job_file in pending_jobs(jobs_dir, seen):
            job = json.loads(job_file.read_text())
            seen.add(job["id"])
            plan = LaunchPlan(resolve_nproc(nproc_per_node, job["device"]), int(job["nnodes"]), job["rdzv_endpoint"],
                              int(job["rdzv_timeout_s"]))
            logger.info("joining %s with %d process(es) at %s", job["id"], plan.nproc_per_node, plan.rdzv_endpoint)
            proc = subprocess.Popen(torchrun_command(job_file, job["id"], plan),
                                    env=worker_environment(plan.nproc_per_node))
            try:
                rc = proc.wait()
            except BaseException:
                stop_process(proc)
                raise
            failures += rc != 0
            logger.log(logging.INFO if rc == 0 else logging.ERROR, "%s finished with status %d", job["id"], rc)
            if once:
                return failures
        time.sleep(poll_s)


def follow_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m exits.engine.launch follow",
                                     description="Join the multi-machine training jobs of an exits run.")
    parser.add_argument("jobs_dir", type=Path, help="WORKDIR/cache/train-jobs of the run (shared storage)")
    parser.add_argument("--nproc-per-node", default="auto", help="processes on this machine: auto (one per GPU) or N")
    parser.add_argument("--once", action="store_true", help="exit after one job")
    args = parser.parse_args(argv)
    nproc = args.nproc_per_node if args.nproc_per_node == "auto" else int(args.nproc_per_node)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(1 if follow(args.jobs_dir, nproc, once=args.once) else 0)
