"""The sharded stages on a Dask cluster started the way a user starts one: ``dask scheduler``
and two ``dask worker`` processes (subprocesses here), the run pointed at the scheduler's
address (``flows.dask_address``), the workers at the session's Prefect server.

- the cluster run writes the thread runner's outputs byte for byte, and logs each stage's progress;
- a worker that cannot see the run folder fails the shard with a message naming the path and the worker;
- a worker SIGKILLed (with its nanny) in the middle of a shard: Dask's scheduler runs the shard
  again on the other worker and the run finishes with the thread runner's outputs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exits.config import load_config
from exits.demo import generate_demo_dataset
from flows.pipeline import run_pipeline_flow
from tests.test_flows_pipeline import FLOW_TINY, N_SHARDS

REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")  # the venv's `dask` command

# Preloaded into each worker process (`dask worker --preload FILE`): Dask's own way to run code
# in a worker. It gives torch this process's number of threads: a Dask worker process runs
# with OMP_NUM_THREADS=1 (set by its nanny), and float reductions split over another number of
# threads differ in the last bits (a pseudo mask's float32 score in pseudo_labels.parquet; the
# json rounds scores to 5 decimals). It logs every shard attempt (file, worker, pid, nanny pid) and blocks the one
# attempt whose `block-<shard file>` exists in the control folder (renamed atomically on first
# use, so the rerun on another worker runs normally); the test kills the blocked worker.
WORKER_HOOK = '''
import os, time
from pathlib import Path

CONTROL = Path(os.environ["EXITS_TEST_CONTROL"])


def logged(real):
    from distributed import get_worker

    def shard(*args, **kwargs):
        out = Path(args[5])
        me = f"{out.name} {get_worker().address} {os.getpid()} {os.getppid()}"
        with open(CONTROL / "attempts.log", "a") as fh:
            fh.write(me + "\\n")
        try:
            os.rename(CONTROL / f"block-{out.name}", CONTROL / f"blocked-{out.name}")
        except FileNotFoundError:
            return real(*args, **kwargs)
        (CONTROL / "running.tmp").write_text(me)
        os.replace(CONTROL / "running.tmp", CONTROL / f"running-{out.name}")
        time.sleep(120)  # SIGKILLed here by the test, in the middle of the shard
    return shard


def dask_setup(worker):
    from distributed import Worker

    if not isinstance(worker, Worker):  # the nanny: no torch there
        return
    import torch
    import exits.pipeline, flows.pseudo_labels, flows.retrieval

    torch.set_num_threads(int(os.environ["EXITS_TEST_TORCH_THREADS"]))
    # The shard task reaches the stage function through `exits.pipeline` (cloudpickle ships the
    # task function by value, its globals by reference) or through the flow module's global.
    for name in ("stage_pseudo_shard", "stage_retrieval_shard"):
        wrapped = logged(getattr(exits.pipeline, name))
        setattr(exits.pipeline, name, wrapped)
        for module in (flows.pseudo_labels, flows.retrieval):
            if hasattr(module, name):
                setattr(module, name, wrapped)
'''


@dataclass
class Cluster:
    """`dask scheduler` + two `dask worker` processes; ``address`` once the scheduler is up."""
    root: Path
    control: Path
    scheduler: subprocess.Popen
    address: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def ready(self, n: int = 2, timeout: float = 180) -> str:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(n, timeout=timeout)
        return self.address

    def forget_attempts(self) -> None:
        (self.control / "attempts.log").unlink(missing_ok=True)

    def attempts(self) -> list[list[str]]:
        log = self.control / "attempts.log"
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the processes and their children (a worker's process under its nanny): a test
    cluster needs no graceful close (a closing worker waited 8 s for its Prefect threads)."""
    import psutil

    for proc in procs:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cluster(prefect_server, tmp_path_factory) -> Cluster:
    """Started first and awaited late (`ready`), so the workers boot while the reference runs."""
    root = tmp_path_factory.mktemp("dask_cluster")
    control, worker_cwd = root / "control", root / "worker-cwd"
    control.mkdir()
    worker_cwd.mkdir()
    (root / "hook.py").write_text(WORKER_HOOK)
    import torch

    env = dict(os.environ, PREFECT_API_URL=prefect_server, PREFECT_HOME=str(root / "prefect-home"),
               PYTHONPATH=str(REPO), EXITS_TEST_CONTROL=str(control),
               EXITS_TEST_TORCH_THREADS=str(torch.get_num_threads()))
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(root / f"{name}.log", "wb")
        procs.append(subprocess.Popen([str(DASK), *args], cwd=worker_cwd, env=env, stdout=log, stderr=log))
        log.close()
        return procs[-1]

    info = root / "scheduler.json"
    try:
        scheduler = start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                          "--scheduler-file", str(info))
        deadline = time.monotonic() + 120
        while not info.exists() and scheduler.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert info.exists(), (root / "scheduler.log").read_text()
        time.sleep(0.1)  # the file is written in one go; let it land
        address = json.loads(info.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        found = Cluster(root, control, scheduler, address)
        for i in range(2):
            found.workers.append(start(f"worker{i}", "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--no-dashboard", "--name", f"w{i}", "--death-timeout", "60",
                                       "--local-directory", str(root / f"dask-w{i}"),
                                       "--preload", str(root / "hook.py")))
        yield found
    finally:
        _stop(procs[::-1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cluster_demo")
    generate_demo_dataset(out, n_train=6, n_val=2, seed=3)
    return out


@pytest.fixture(scope="module")
def reference(demo, cluster, prefect_server, tmp_path_factory) -> Path:
    """The thread runner's run folder (the cluster boots meanwhile)."""
    work = tmp_path_factory.mktemp("threads") / "run"
    result = run_pipeline_flow(demo / "images", demo / "instances.json", work, load_config("demo", FLOW_TINY))
    print("thread run seconds per stage:", result["seconds"])
    return work


OUTPUTS = ("points.parquet", "pseudo_labels.json", "pseudo_labels.parquet")


@pytest.mark.slow
@pytest.mark.prefect
def test_cluster_run_writes_the_thread_runner_outputs(demo, reference, cluster, tmp_path, caplog):
    address = cluster.ready()
    cluster.forget_attempts()
    work = tmp_path / "run"
    cfg = load_config("demo", FLOW_TINY + ["flows.task_runner=dask", f"flows.dask_address={address}"])
    with caplog.at_level(logging.INFO, logger="flows.caching"):
        result = run_pipeline_flow(demo / "images", demo / "instances.json", work, cfg)
    print("cluster run seconds per stage:", result["seconds"])
    assert set(result["task_states"].values()) == {"Completed"}
    for name in OUTPUTS:
        assert (work / name).read_bytes() == (reference / name).read_bytes(), name
    # every shard of both stages ran once, in a worker process (not this one)
    attempts = cluster.attempts()
    assert sorted(a[0] for a in attempts) == sorted(f"{stage}-{i:05d}.parquet" for stage in ("points", "pseudo")
                                                    for i in range(N_SHARDS)), attempts
    assert {int(a[2]) for a in attempts}.isdisjoint({os.getpid()})
    assert {a[1] for a in attempts} <= _workers(address)
    # progress per stage in the log (what `exits run` prints)
    for task in ("retrieve-points-shard", "pseudo-labels-shard"):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{task}: shards ")]
        assert [line.split()[2] for line in lines] == [f"{i}/{N_SHARDS}," for i in range(1, N_SHARDS + 1)], lines


def _workers(address: str) -> set[str]:
    """The addresses of the cluster's workers now."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        return set(client.scheduler_info()["workers"])


def _stage_inputs(source: Path, work: Path) -> None:
    """What the pseudo-label stage reads, copied from a finished run."""
    for name in ("instances.parquet", "points.parquet", "generator/model.pt"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, work / name)


def _pseudo_flow(cfg, demo: Path, workdir: str, address: str) -> dict:
    from flows.pseudo_labels import pseudo_labels_flow
    from flows.runtime import config_dict, make_task_runner

    return pseudo_labels_flow.with_options(task_runner=make_task_runner(cfg.flows, address))(
        images=str(demo / "images"), annotations=str(demo / "instances.json"), workdir=workdir,
        config=config_dict(cfg))


@pytest.mark.slow
@pytest.mark.prefect
def test_worker_that_cannot_see_the_run_folder_fails_the_shard_naming_path_and_worker(
        demo, reference, cluster, tmp_path, monkeypatch):
    """The run folder given as a relative path: this process sees it, the workers (started in
    another folder) do not, as a worker on a machine without the shared storage."""
    from flows.stage_tasks import SharedPathError

    address = cluster.ready()
    _stage_inputs(reference, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", FLOW_TINY + ["flows.task_runner=dask"])
    with pytest.raises(SharedPathError) as err:
        _pseudo_flow(cfg, demo, "run", address)
    message = str(err.value)
    there = cluster.root / "worker-cwd" / "run"
    # The first shard on a worker misses the run folder; later ones may find the folder made by
    # Prefect's record of that failure (`run/.prefect-results`) and miss the instances table.
    there = re.escape(str(there))
    assert re.search(rf"^Dask worker (\S+) on host \S+ cannot see the (run folder run \(relative: {there} there\)"
                     rf"|instances table run/instances.parquet \(relative: {there}/instances.parquet there\))\. "
                     r"Every Dask worker needs the run folder", message), message
    assert message.split()[2] in _workers(address), message
    assert not (cluster.root / "worker-cwd" / "run" / "shards").exists()  # no stage ran there


def test_missing_run_folder_fails_a_thread_runner_shard_naming_path_and_host(tmp_path):
    from flows.stage_tasks import SharedPathError, compute_shard

    def never(*args, **kwargs):
        raise AssertionError("the stage must not start")

    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(SharedPathError, match=rf"^host \S+ \(pid {os.getpid()}\) cannot see the run folder "
                                              rf"{re.escape(str(tmp_path / 'gone'))}\. Was it moved"):
        compute_shard(never, "pseudo", {}, str(images), str(tmp_path / "gone"), 0, 0, 3)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SharedPathError, match=rf"cannot see the instances table {re.escape(str(run))}/instances\."):
        compute_shard(never, "pseudo", {}, str(images), str(run), 0, 0, 3)
    (run / "instances.parquet").touch()
    with pytest.raises(SharedPathError, match=rf"cannot see the image folder {re.escape(str(tmp_path))}/nowhere\. "):
        compute_shard(never, "pseudo", {}, str(tmp_path / "nowhere"), str(run), 0, 0, 3)


@pytest.mark.slow
@pytest.mark.prefect
def test_worker_killed_mid_shard_reruns_it_on_the_other_worker(demo, reference, cluster, tmp_path):
    """Runs last: it leaves the cluster one worker short."""
    address = cluster.ready()
    cluster.forget_attempts()
    work = tmp_path / "run"
    _stage_inputs(reference, work)
    shard = "pseudo-00001.parquet"
    (cluster.control / f"block-{shard}").touch()
    running = cluster.control / f"running-{shard}"
    killed: dict[str, int] = {}

    def kill_when_blocked() -> None:
        deadline = time.monotonic() + 240
        while not running.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if running.exists():
            _, _, pid, nanny = running.read_text().split()
            killed.update(pid=int(pid), nanny=int(nanny))
            os.kill(int(nanny), signal.SIGKILL)  # the whole worker: its nanny, then the worker process
            os.kill(int(pid), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_blocked, daemon=True)
    killer.start()
    cfg = load_config("demo", FLOW_TINY + ["flows.task_runner=dask"])
    out = _pseudo_flow(cfg, demo, str(work), address)
    killer.join(5)
    assert killed, cluster.logs()
    assert killed["nanny"] in {w.pid for w in cluster.workers}
    assert out["shards"] == N_SHARDS and set(out["tasks"].values()) == {"Completed"}, out["tasks"]
    tries = [a for a in cluster.attempts() if a[0] == shard]
    assert len(tries) == 2 and int(tries[0][2]) == killed["pid"] and int(tries[1][2]) != killed["pid"], tries
    assert tries[0][1] != tries[1][1]  # the other worker
    for name in ("pseudo_labels.json", "pseudo_labels.parquet"):
        assert (work / name).read_bytes() == (reference / name).read_bytes(), name
    assert len(_workers(address)) == 1
