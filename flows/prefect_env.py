"""Prefect settings the project needs before Prefect is imported, the fix for a temporary
server that does not come up, and a temporary server that dies with its process.

Prefect reads its settings from the environment when it is imported, and a temporary
("ephemeral") server subprocess inherits the environment, so these defaults are applied at
the top of :mod:`flows` (nothing here imports Prefect at import time).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any, Callable

__all__ = ["PREFECT_STARTUP_TIMEOUT_ENV", "PREFECT_STARTUP_TIMEOUT_S", "apply_prefect_defaults", "prefect_startup_hint",
           "tie_temporary_server_to_process"]

# Prefect's temporary server gets 20 s by default to come up. On a new PREFECT_HOME its first
# start creates and migrates its SQLite database, which took longer than that on a 2-core
# machine (the first `make demo` failed; the second worked). Our default leaves room for a
# slow first start; the variable is Prefect's own setting, so a user's value wins.
PREFECT_STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PREFECT_STARTUP_TIMEOUT_S = 300


def apply_prefect_defaults() -> None:
    """Environment defaults for Prefect, set before Prefect is imported (its settings are read
    then, and a temporary server subprocess inherits them). Values already set are kept."""
    os.environ.setdefault(PREFECT_STARTUP_TIMEOUT_ENV, str(PREFECT_STARTUP_TIMEOUT_S))
    # Machines here are offline: a (temporary) Prefect server must not try to send analytics.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The project logs through `exits.*` (training progress and ETA, stage summaries), `flows.*`
    # and `detectors.*` (stage-2 iterations):
    # Prefect sends those records to the flow run's log in its UI too, not only to the terminal.
    # Outside a flow run (the CLI before and after it) there is no run to send them to: say
    # nothing instead of Prefect's warning per record.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "exits,flows,detectors")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def prefect_startup_hint(exc: BaseException) -> str | None:
    """A fix for Prefect's "temporary server did not start" error; None for other errors."""
    text = str(exc)
    if "ephemeral Prefect API server" not in text and "temporary server" not in text:
        return None
    waited = os.environ.get(PREFECT_STARTUP_TIMEOUT_ENV, "20")
    first = text.splitlines()[0] if text else type(exc).__name__
    return (f"Prefect's temporary server did not start within {waited} s ({first}). "
            f"Either give it longer ({PREFECT_STARTUP_TIMEOUT_ENV}=600 exits run ...), or start a server once "
            "and point the runs at it: `prefect server start` in another shell, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`.")


# --- the temporary server must not outlive its process ------------------------------------
# Prefect starts its temporary server as a child process (`python -m uvicorn ...`,
# SubprocessASGIServer._run_uvicorn_command -> subprocess.Popen) and stops it from an atexit
# hook. A process killed with SIGKILL (or the OOM killer) runs no atexit hook, so the server
# lived on, orphaned, holding PREFECT_HOME's database and a port. On Linux the child now asks
# the kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG): uvicorn shuts down as
# on Prefect's own stop(). PDEATHSIG fires when the parent *thread* that forked exits, so it
# is set only when the main thread starts the server (the flow engine does, for `exits run`;
# the main thread lives as long as the process); elsewhere Prefect's behaviour is unchanged.

PR_SET_PDEATHSIG = 1


def _parent_death_signal(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent_pid`` dies; None off
    Linux or without a usable libc ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _SubprocessDyingWithParent:
    """Stands in for the ``subprocess`` module inside ``prefect.server.api.server`` (which
    uses it only to start and stop the temporary server): ``Popen`` from the main thread
    gets :func:`_parent_death_signal`; everything else is the real module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - the module's name
        if kwargs.get("preexec_fn") is None and threading.current_thread() is threading.main_thread():
            kwargs["preexec_fn"] = _parent_death_signal(os.getpid())
        return subprocess.Popen(*args, **kwargs)


def tie_temporary_server_to_process() -> bool:
    """Make a temporary Prefect server started by this process die with it (Linux; see
    above). Call before the flow runs; a no-op with ``PREFECT_API_URL`` (a real server) or
    off Linux. Returns whether the temporary server will be tied. Idempotent."""
    if not sys.platform.startswith("linux") or _parent_death_signal(os.getpid()) is None:
        return False
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return False
    import prefect.server.api.server as server_module

    if not isinstance(server_module.subprocess, _SubprocessDyingWithParent):
        server_module.subprocess = _SubprocessDyingWithParent()
    return True
