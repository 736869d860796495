"""The ``exits`` command line: :mod:`exits.cli.commands` (the Typer app and the stage-1
commands), :mod:`exits.cli.detector` (stage 2), :mod:`exits.cli.loop` (the whole loop),
:mod:`exits.cli.support` (errors, logging, the run folder's config).

``app`` and ``main`` are looked up on first use: the command modules of other packages
(``exits.spotfix.commands``, ``exits.interactive.commands``) import ``exits.cli.support``, and
importing the app here would import them back half-initialised.
"""
from typing import Any

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from exits.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'exits.cli' has no attribute {name!r}")
