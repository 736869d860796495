"""What every ``exits`` command shares: failing with a reason, logging, the run folder's config.

Errors a user can fix (a bad config value, a missing file, a bad record, a full disk, a
read-only run folder) end the command with exit status 2 and one line naming the cause;
anything else is a bug: exit status 1, one line, and ``exits --debug ...`` (or
``EXITS_DEBUG=1``) shows its traceback. Log records keep their tracebacks only with
``--debug`` too (the console shows one line per record; a Prefect server's UI still gets the
full record).
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from exits.io import format_os_error

__all__ = ["fail", "setup_logging", "run_config", "DEBUG_ENV", "set_debug", "debug_enabled", "describe_error",
           "format_os_error", "error_text", "report_error", "quiet_tracebacks", "ExitsGroup", "check_input_file"]

DEBUG_ENV = "EXITS_DEBUG"
_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[2] / d) + os.sep for d in ("exits", "flows", "detectors"))
_state = {"debug": False}


def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` to stderr and exit with status 2."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def set_debug(flag: bool) -> None:
    """``--debug`` of this invocation (the app's callback sets it before any command runs)."""
    _state["debug"] = bool(flag)


def debug_enabled() -> bool:
    """``--debug`` was given, or ``EXITS_DEBUG`` is set to something other than 0/false/no."""
    return _state["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _raised_in_project(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is code of this project (our own
    validation), not of a library."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PROJECT_DIRS)


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ended a command.

    2 for what a user can fix: any ``OSError`` (``<file>: <reason> (<ERRNO>)``), a bad config
    (ConfigError) or dataset (DatasetError), a ``ValueError`` raised by this project's own
    checks, a Prefect temporary server that did not start (with the fix); 1 for anything
    else (a bug: ``internal error: <Type>: <message> (run with --debug for the traceback)``).
    """
    if isinstance(exc, OSError):
        return 2, format_os_error(exc)
    # Only modules already imported can have raised (importing exits.data would load torch,
    # flows would load Prefect: seconds, for a message).
    known = tuple(cls for module, name in (("exits.config", "ConfigError"), ("exits.data", "DatasetError"))
                  if (cls := getattr(sys.modules.get(module), name, None)) is not None)
    if isinstance(exc, known) or (isinstance(exc, ValueError) and _raised_in_project(exc)):
        return 2, error_text(exc)
    prefect_env = sys.modules.get("flows.prefect_env")
    hint = prefect_env.prefect_startup_hint(exc) if prefect_env is not None else None
    if hint is not None:
        return 2, hint
    return 1, f"internal error: {type(exc).__name__}: {_one_line(str(exc))} (run with --debug for the traceback)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_text(exc: BaseException) -> str:
    """The one-line message of an error a command caught: ``<file>: <reason> (<ERRNO>)`` for
    an ``OSError``, else its text on one line."""
    if isinstance(exc, OSError):
        return format_os_error(exc)
    return _one_line(str(exc)) or type(exc).__name__


def report_error(exc: BaseException) -> int:
    """Print the one ``error:`` line of ``exc`` to stderr; returns the exit status."""
    code, msg = describe_error(exc)
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return code


class ExitsGroup(TyperGroup):
    """The ``exits`` command group: an exception that ends a command becomes one ``error:``
    line and exit status 2 (user's fault) or 1 (bug), see :func:`describe_error`; with
    ``--debug`` / ``EXITS_DEBUG=1`` it propagates with its traceback. Works the same under
    ``typer.testing.CliRunner`` and the console script."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):  # typer's own exits and usage errors
            raise
        except Exception as exc:
            if debug_enabled() or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
                raise
            raise Exit(report_error(exc)) from None


class _NoTraceback(logging.Formatter):
    """Wraps a handler's formatter: the record without its traceback/stack (the exception's
    type and message are kept in the line). The record itself is left as it is, so other
    handlers of the same record (Prefect's API log handler: the UI) still get the traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        exc = record.exc_info[1] if record.exc_info else None
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        if exc is not None and type(exc).__name__ not in text:
            text += f" ({type(exc).__name__}: {_one_line(str(exc))})"
        return text

    def __getattr__(self, name: str) -> Any:  # what a handler may ask of its formatter
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _console_handlers() -> list[logging.Handler]:
    """Handlers that print to a terminal stream: ours (root) and Prefect's console/debug
    handlers (not its API handler, not files)."""
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    out: list[logging.Handler] = []
    for lg in loggers:
        for h in lg.handlers:
            if (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and h not in out
                    and not type(h).__module__.startswith("_pytest")):  # pytest's capture keeps everything
                out.append(h)
    return out


def quiet_tracebacks() -> None:
    """Unless ``--debug``: console log handlers print one line per record, without the
    traceback (with ``--debug`` they print it again). Call after Prefect is imported (it
    installs its handlers then); idempotent."""
    debug = debug_enabled()
    for h in _console_handlers():
        wrapped = isinstance(h.formatter, _NoTraceback)
        if debug and wrapped:
            h.setFormatter(h.formatter.inner)
        elif not debug and not wrapped:
            h.setFormatter(_NoTraceback(h.formatter))


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr, one line per record; httpx's one line per
    Prefect API call only with ``verbose``; tracebacks only with ``--debug``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # basicConfig does nothing once Prefect has configured the root logger (WARNING): the
    # project's own loggers get their level here, so their INFO lines (training progress,
    # ETA) reach the terminal and the flow run's log in the Prefect UI whatever came first.
    for name in ("exits", "flows", "detectors"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_tracebacks()


def check_input_file(path: Path, what: str = "annotation file") -> None:
    """An input json must be a regular file: a folder is ``<path>: Is a directory (EISDIR)``
    (exit 2), a missing one ``<what> not found: <path>``."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not path.is_file():
        fail(f"{what} not found: {path}")


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
