"""`exits serve` registers `exits-pipeline` as a deployment with a cron schedule on a real
Prefect server (`prefect server start` in a subprocess, its own PREFECT_HOME and SQLite)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from exits.cli import app

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process this test started (and the children in its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def prefect_server_process(tmp_path):
    """A real `prefect server start` on 127.0.0.1:<free port>; yields its API URL; always stopped."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    url = f"http://127.0.0.1:{port}/api"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prefect server did not start in time"
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()


def read_deployment(url: str, name: str):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            return client.read_deployment_by_name(name)


def test_serve_registers_the_pipeline_with_its_cron_schedule(prefect_server_process, tiny_coco, tmp_path):
    from prefect.exceptions import ObjectNotFound

    url = prefect_server_process
    work = tmp_path / "nightly-run"
    cmd = [sys.executable, "-m", "exits.cli", "serve", "--cron", "0 2 * * *", "-i", str(tiny_coco.parent / "images"),
           "-a", str(tiny_coco), "-w", str(work), "-c", "demo", "--set", "flows.shard_size=5", "--name", "nightly",
           "--val", str(tiny_coco)]
    env = dict(os.environ, PREFECT_API_URL=url, PYTHONPATH=str(REPO))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "deployment not registered in time"
            try:
                deployment = read_deployment(url, "exits-pipeline/nightly")
            except ObjectNotFound:
                time.sleep(0.5)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        assert all(s.active for s in deployment.schedules)
        assert deployment.entrypoint == "flows.pipeline.exits_pipeline"
        params = deployment.parameters
        assert params["workdir"] == str(work.resolve()) and params["annotations"] == str(tiny_coco.resolve())
        assert params["config"]["name"] == "demo" and params["config"]["flows"]["shard_size"] == 5
        assert params["val_gt"] == str(tiny_coco.resolve())  # stage 2's held-out GT travels with the schedule
        assert proc.poll() is None  # `serve` keeps running, waiting for scheduled runs
    finally:
        stop(proc, signal.SIGINT)
        log.close()
    assert not work.exists()  # registering runs nothing


def test_serve_rejects_a_bad_cron_before_contacting_a_server(tiny_coco, tmp_path):
    result = CliRunner().invoke(app, ["serve", "--cron", "every night", "-i", str(tiny_coco.parent / "images"),
                                      "-a", str(tiny_coco), "-w", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert 'Invalid cron string: "every night"' in result.output
