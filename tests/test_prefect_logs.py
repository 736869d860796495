"""The library's own log records (`exits.*` loggers: training progress, ETA, stage summaries)
reach the flow run's log in the Prefect UI, not only the terminal (flows/prefect_env.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, logging, sys
import flows  # applies the project's Prefect defaults before Prefect is imported
from exits.cli.support import setup_logging
setup_logging()  # what every exits command does: INFO to stderr
from prefect import flow, task, get_client

@task
def train_like() -> None:
    logging.getLogger("exits.engine.loop").info("epoch 1/2, 1s elapsed, ETA 1s  loss 0.5")

@flow
def tiny() -> str:
    from prefect.runtime import flow_run
    train_like()
    return str(flow_run.id)

logging.getLogger("exits.cli").info("before any flow run")  # no run to send it to: no warning
run_id = tiny()
import time
from uuid import UUID
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
deadline = time.monotonic() + 30  # records reach the API in batches
with get_client(sync_client=True) as client:
    while True:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))
        if any(l.name.startswith("exits.") for l in logs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
print(json.dumps([[l.name, l.message] for l in logs]))
'''


@pytest.mark.prefect
def test_exits_log_records_reach_the_flow_runs_log(prefect_server: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    env.update(PREFECT_API_URL=prefect_server, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = json.loads(done.stdout.strip().splitlines()[-1])
    assert ["exits.engine.loop", "epoch 1/2, 1s elapsed, ETA 1s  loss 0.5"] in logs
    assert "attempted to send logs to the API without a flow run id" not in done.stderr
    assert "before any flow run" not in {m for _, m in logs}
