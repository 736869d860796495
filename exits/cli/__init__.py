"""The ``exits`` command line: :mod:`exits.cli.commands` (the Typer app and the stage-1
commands), :mod:`exits.cli.detector` (stage 2), :mod:`exits.cli.support` (errors, logging,
the run folder's config)."""
from exits.cli.commands import app, main

__all__ = ["app", "main"]
