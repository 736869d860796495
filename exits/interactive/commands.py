"""Typer commands: ``exits train-clicks`` and ``exits eval-clicks`` (registered in exits/cli.py).

Settings are the run config's ``click_model:`` section (``WORKDIR/config.yaml`` unless
``--config`` names another file or a name in configs/), with ``--set key=value`` (or
``--set click_model.key=value``) on top, validated once by the typed config
(:class:`exits.interactive.config.ClickModelConfig`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from exits.interactive.config import ClickModelConfig

__all__ = ["train_clicks_command", "eval_clicks_command", "load_click_config"]


def load_click_config(workdir: Path, config: str | Path | None, overrides: list[str] | None) -> ClickModelConfig:
    """The validated ``click_model`` settings for a run folder (+ overrides)."""
    from exits.config import ConfigError, load_config

    source = config if config is not None else Path(workdir) / "config.yaml"
    if config is None and not Path(source).is_file():
        source = None  # a run folder made by hand: defaults
    prefixed = [o if o.startswith("click_model.") else f"click_model.{o}" for o in overrides or []]
    try:
        return load_config(str(source) if source is not None else None, prefixed).click_model
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


def train_clicks_command(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="finished stage-1 run folder")],
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config or a name in configs/ (default: WORKDIR/config.yaml); its click_model: section")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value override of ClickModelConfig")] = None,
    train_json: Annotated[Optional[Path], typer.Option(help="COCO json with masks to train on instead of the run's best pseudo masks")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="training iterations")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ...")] = None,
    out: Annotated[Optional[Path], typer.Option(help="model file (default WORKDIR/click_model/model.pt)")] = None,
) -> None:
    """Train the spot-fix click decoder on the run's highest-scoring pseudo masks."""
    from exits.interactive.train import train_click_model  # torch & co. only when the command runs

    cfg = load_click_config(workdir, config, set_)
    changes: dict[str, Any] = {}
    if train_json is not None:
        changes.update(train_source="coco", train_json=str(train_json))
    if iterations is not None:
        changes["iterations"] = iterations
    if device is not None:
        changes["device"] = device
    cfg = cfg.replace(**changes) if changes else cfg
    path, summary = train_click_model(workdir, cfg, out_path=out)
    typer.echo(f"wrote {path}: {json.dumps(summary)}")


def eval_clicks_command(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="run folder with click_model/model.pt")],
    gt: Annotated[Path, typer.Option("--gt", help="COCO json with GT masks (evaluation only)")],
    out: Annotated[Optional[Path], typer.Option(help="result json (default WORKDIR/click_model/eval_clicks.json)")] = None,
    model: Annotated[Optional[Path], typer.Option(help="click model file (default WORKDIR/click_model/model.pt)")] = None,
    num_objects: Annotated[int, typer.Option(help="objects, lowest pseudo score first (0 = all)")] = 40,
    max_clicks: Annotated[int, typer.Option(help="click budget per object")] = 20,
    protocol: Annotated[Optional[list[str]], typer.Option(help="scratch and/or pseudo (default both)")] = None,
    grabcut: Annotated[bool, typer.Option("--grabcut/--no-grabcut", help="also run GrabCut with the same clicks")] = True,
    progressive: Annotated[Optional[bool], typer.Option("--progressive/--no-progressive", help="override the model's progressive mode")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda ...")] = "cpu",
) -> None:
    """NoC@85/90, NoF@90 and mIoU@k of the click model (and GrabCut) with the robot user."""
    from exits.interactive.evaluate import PROTOCOLS, run_eval_clicks  # torch & co. only when the command runs

    result = run_eval_clicks(workdir, gt, out_path=out, model_path=model, num_objects=num_objects or None,
                             max_clicks=max_clicks, protocols=tuple(protocol or PROTOCOLS), progressive=progressive,
                             with_grabcut=grabcut, device=device)
    for name, methods in result["protocols"].items():
        for method, m in methods.items():
            typer.echo(f"{name:8s} {method:12s} NoC@85 {m['NoC@85']:.2f}  NoC@90 {m['NoC@90']:.2f}  "
                       f"NoF@90 {m['NoF@90']}  mIoU@1 {m['mIoU@1']:.3f}  mIoU@5 {m['mIoU@5']:.3f}")
