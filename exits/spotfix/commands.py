"""``exits spotfix`` and ``exits export``: typer-ready command functions (registered in
exits/cli/commands.py)."""
from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from exits.cli.support import fail, setup_logging

ENV_TOKEN = "EXITS_SPOTFIX_TOKEN"
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address: 127.0.0.0/8, ::1 (brackets allowed)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_hosts(host: str) -> list[str]:
    """Host header names a server bound to loopback ``host`` answers to: localhost, the
    usual loopback addresses and the bound one (127.0.0.2, ::1, ...). Anything else -- a
    DNS-rebinding page's own name -- is refused."""
    names = ["localhost", "127.0.0.1", "::1"]
    return names if host.strip("[]").lower() in names else names + [host.strip("[]")]


def resolve_token(host: str, token: Optional[str]) -> Optional[str]:
    """The token to require: ``token`` or $EXITS_SPOTFIX_TOKEN; mandatory off loopback.

    Raises:
        ValueError: a non-loopback host without a token, or a token under 16 characters.
    """
    token = token or os.environ.get(ENV_TOKEN) or None
    if token is None and not is_loopback(host):
        raise ValueError(f"binding {host} needs a token: pass --token or set {ENV_TOKEN} "
                         f"(e.g. {secrets.token_urlsafe(24)})")
    if token is not None and len(token) < 16:
        raise ValueError("the token must be at least 16 characters")
    return token


def spotfix_command(
    workdir: Path = typer.Option(..., "--workdir", "-w", help="run folder with pseudo_labels.json"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback requires a token"),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="port to listen on"),
    token: Optional[str] = typer.Option(None, "--token", help=f"access token every request must carry "
                                        f"(default ${ENV_TOKEN}); required when --host is not loopback"),
    user: Optional[str] = typer.Option(None, "--user", help="name recorded with each decision (default: login name)"),
    editor: str = typer.Option("auto", "--editor", help="what answers clicks: auto (the editor this run's `exits eval-clicks` "
                               "result favours, else GrabCut; the choice and why are printed), clicks (trained click "
                               "model) or grabcut"),
    device: str = typer.Option("cpu", "--device", help="device of the click model (cpu, cuda, cuda:1)"),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="image folder (default: the one in run.json)"),
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads of the click model (2: ~9 ms per click at "
                                "96 px, ~39 ms at 512 px; use 1 when other jobs keep the cores busy)"),
    whole_queue: bool = typer.Option(False, "--whole-queue", help="list every object, not only the triage budget of "
                                     "the folder's `exits loop` (WORKDIR/loop/review.json)"),
) -> None:
    """Review-and-fix web page: the worst pseudo masks first; fix them with clicks, accept or reject."""
    import torch

    torch.set_num_threads(threads)
    setup_logging(False)
    from exits.spotfix.app import create_app
    from exits.spotfix.catalog import CatalogError, RunCatalog
    from exits.spotfix.editors import EditorUnavailable, load_editor, resolve_editor
    from exits.spotfix.review import LoopReview

    try:
        required = resolve_token(host, token)
        catalog = RunCatalog.load(workdir, images)
        editor, why = resolve_editor(editor, workdir)
        typer.echo(f"spot-fix editor: {editor} ({why})")
        mask_editor = load_editor(editor, workdir, catalog, device=device)
    except (ValueError, EditorUnavailable, CatalogError) as exc:
        fail(str(exc))
    loopback = is_loopback(host)
    review = LoopReview(workdir, limit_queue=not whole_queue)
    app = create_app(workdir, mask_editor, token=required, user=user, catalog=catalog, editor_name=editor,
                     allowed_hosts=loopback_hosts(host) if loopback else None, review=review)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + ("?token=<your token>" if required else "")
    typer.echo(f"spot-fix: {len(catalog.objects)} objects of {workdir}; open {url}  (Ctrl+C to stop)")
    loop = review.info()
    if loop["limited"]:
        typer.echo(f"queue limited to the `exits loop` triage budget: {loop['budget']} masks (--whole-queue lists all)")
    if loop["waiting"]:
        typer.echo(f"loop run {loop['flow_run_id']} waits for this review: press 'review done' in the page when finished")
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")


def export_command(
    workdir: Path = typer.Option(..., "--workdir", "-w", help="run folder with pseudo_labels.json and fixes/"),
) -> None:
    """Merge the spot-fix decisions over the pseudo labels -> WORKDIR/pseudo_labels_fixed.json (stage 2 uses it)."""
    setup_logging(False)
    from exits.spotfix.export import run_export
    from exits.io import format_os_error as os_error_message

    try:
        result = run_export(workdir)
    except FileNotFoundError as exc:
        fail(str(exc) if exc.filename is None else os_error_message(exc))
    except OSError as exc:  # disk full, read-only run folder, unreadable fixes: one line, exit 2
        fail(os_error_message(exc))
    except ValueError as exc:
        fail(str(exc))
    for key, value in asdict(result.counts).items():
        typer.echo(f"{key}: {value}")
    if result.counts.skipped_lines:
        typer.echo(f"note: {result.counts.skipped_lines} corrupt line(s) of the fixes file were skipped "
                   "(the warnings above name them); the file was left as it is")
    typer.echo(f"written: {result.path}")
