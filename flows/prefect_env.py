"""Prefect settings the project needs before Prefect is imported, and the fix for a temporary
server that does not come up.

Prefect reads its settings from the environment when it is imported, and a temporary
("ephemeral") server subprocess inherits the environment, so these defaults are applied at
the top of :mod:`flows` (nothing here imports Prefect).
"""
from __future__ import annotations

import os

__all__ = ["PREFECT_STARTUP_TIMEOUT_ENV", "PREFECT_STARTUP_TIMEOUT_S", "apply_prefect_defaults", "prefect_startup_hint"]

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
