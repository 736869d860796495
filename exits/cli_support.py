"""What every ``exits`` command shares: failing with a reason, logging, the run folder's config.

Errors a user can fix (a bad config value, a missing file, a bad record) end the command
with exit status 2 and one line naming the cause; tracebacks are for bugs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn, Sequence

import typer

__all__ = ["fail", "setup_logging", "run_config"]

def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` to stderr and exit with status 2."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr, one line per record; httpx's one line per
    Prefect API call only with ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def run_config(workdir: Path, config: str | None, overrides: Sequence[str] = (), prefix: str | None = None):
    """The validated config of a command on a run folder: ``--config`` when given, else
    ``WORKDIR/config.yaml``, else the defaults (a run folder made by hand).

    ``prefix``: section name prepended to overrides that lack it (``--set iterations=5`` for
    ``click_model.iterations=5``). Raises :class:`exits.config.ConfigError` naming the key.
    """
    from exits.run_folder import RunFolder

    if prefix is not None:
        overrides = [o if o.startswith(f"{prefix}.") else f"{prefix}.{o}" for o in overrides]
    return RunFolder(workdir).load_config(config, overrides)
