"""`exits run` the way a new user runs it: the installed command in a subprocess, a brand-new
PREFECT_HOME (Prefect creates and migrates its database on this first start), no Prefect
server running, no test harness."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.prefect_env import PREFECT_STARTUP_TIMEOUT_ENV, PREFECT_STARTUP_TIMEOUT_S, prefect_startup_hint
from tests.test_cli_and_pipeline import TINY


def exits_command() -> list[str]:
    """The console script of this environment (what `pip install -e .` put beside python)."""
    script = Path(sys.executable).with_name("exits")
    return [str(script)] if script.exists() else [sys.executable, "-m", "exits.cli"]


def fresh_user_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no server, no harness settings
    env.update(PREFECT_HOME=str(home), **extra)
    return env


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first_run_demo")
    done = subprocess.run([*exits_command(), "demo-data", str(out), "--n-train", "4", "--n-val", "1", "--seed", "5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def run_args(demo: Path, workdir: Path) -> list[str]:
    args = [*exits_command(), "run", "-i", str(demo / "images"), "-a", str(demo / "instances.json"), "-w", str(workdir),
            "-c", "demo"]
    for o in TINY:
        args += ["--set", o]
    return args


@pytest.mark.slow
def test_first_exits_run_on_a_fresh_prefect_home_works(tiny_demo, tmp_path):
    home = tmp_path / "prefect-home"
    assert not home.exists()
    done = subprocess.run(run_args(tiny_demo, tmp_path / "run"), env=fresh_user_env(home), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Starting temporary server" in done.stderr  # really went through Prefect's temporary server
    assert list(home.rglob("*.db")), "Prefect made no database: PREFECT_HOME was not the one used"
    src = json.loads((tiny_demo / "instances.json").read_text())
    out = json.loads((tmp_path / "run" / "pseudo_labels.json").read_text())
    assert [a["id"] for a in out["annotations"]] == [a["id"] for a in src["annotations"]]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["tasks"].get("Completed", 0) >= 6 and set(summary["tasks"]) <= {"Completed"}
    assert 0.0 < summary["miou_all"] <= 1.0


@pytest.mark.slow
def test_a_server_that_does_not_start_fails_with_the_fix(tiny_demo, tmp_path):
    # 0 s: Prefect gives up at once, as it would on a machine too slow for the allowed time.
    env = fresh_user_env(tmp_path / "home", **{PREFECT_STARTUP_TIMEOUT_ENV: "0"})
    done = subprocess.run(run_args(tiny_demo, tmp_path / "run"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "prefect server start" in done.stderr and "PREFECT_API_URL" in done.stderr
    assert PREFECT_STARTUP_TIMEOUT_ENV in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "pseudo_labels.json").exists()


def test_startup_hint_only_for_the_startup_error():
    assert prefect_startup_hint(RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server."))
    assert prefect_startup_hint(RuntimeError("CUDA out of memory")) is None
    assert PREFECT_STARTUP_TIMEOUT_S >= 120  # the first start migrates a new database: give it minutes


def test_click_commands_fail_with_a_reason(tmp_path):
    """Errors a user can fix end with status 2 and the reason, not a traceback."""
    from typer.testing import CliRunner

    from exits.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["train-clicks", "-w", str(tmp_path), "--set", "iterations=0"])
    assert bad.exit_code == 2 and "iterations" in bad.output
    missing = runner.invoke(app, ["train-clicks", "-w", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "error:" in missing.output
    no_gt = runner.invoke(app, ["eval-clicks", "-w", str(tmp_path), "--gt", str(tmp_path / "gt.json")])
    assert no_gt.exit_code == 2 and "gt.json" in no_gt.output


@pytest.mark.parametrize("module", ["exits.spotfix.commands", "exits.interactive.commands", "exits.cli.loop",
                                    "exits.cli.detector", "exits.cli.support", "exits.cli"])
def test_every_command_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """A command module imported before the app (a test, a user's script) must not meet the
    app half-initialised: exits.cli.support once pulled in exits.cli.commands, which imports
    these modules back (ImportError: partially initialized module)."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
