"""``exits train-detector`` and ``exits evaluate-detector``: stage 2 on a run folder.

Both read the run's own ``config.yaml`` (its ``detector:`` section) unless ``--config``
names another; ``--set detector.KEY=VALUE`` and ``--backend`` override single values.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from exits.cli.support import check_input_file, error_text, fail, run_config, setup_logging
from exits.config import ConfigError

WorkdirOpt = typer.Option(..., "--workdir", "-w", help="run folder with pseudo_labels.json (stage 1 done)")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config or a name in configs/ (default: WORKDIR/config.yaml)")
SetOpt = typer.Option(None, "--set", "-s", help="override a value, e.g. --set detector.iterations=2000 (repeatable)")
BackendOpt = typer.Option(None, "--backend", "-b", help="torchvision | detectron2 (default: the config's detector.backend)")
ImagesOpt = typer.Option(None, "--images", "-i", help="image folder (default: the run's, from run.json)")


def detector_config(workdir: Path, config: Optional[str], overrides: list[str], backend: Optional[str]):
    """The validated ``detector`` settings for a run folder (the edge: validated once here)."""
    if backend is not None:
        overrides = [*overrides, f"detector.backend={backend}"]
    return run_config(workdir, config, overrides).detector


def train_detector_command(
    workdir: Path = WorkdirOpt,
    backend: Optional[str] = BackendOpt,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    images: Optional[Path] = ImagesOpt,
) -> None:
    """Train the stage-2 instance segmenter on the run's pseudo labels.

    Trains on WORKDIR/pseudo_labels_fixed.json (human fixes merged by `exits export`) when it
    exists, else on WORKDIR/pseudo_labels.json; never on GT masks. Writes WORKDIR/detector/
    (checkpoints, train_log.json, train_source.json); an interrupted run resumes.
    """
    from exits.stages.detector import train_detector_stage

    setup_logging(False)
    try:
        cfg = detector_config(workdir, config, overrides or [], backend)
        record = train_detector_stage(workdir, cfg, images)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        fail(error_text(exc))
    typer.echo(f"trained {record['backend']} on {record['train_json']} in {record['seconds']:.0f} s")
    typer.echo(f"checkpoint: {record['checkpoint']}")


def evaluate_detector_command(
    workdir: Path = WorkdirOpt,
    gt: Path = typer.Option(..., "--gt", help="held-out COCO/LVIS json with GT masks (e.g. data/demo/val.json)"),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="image folder of --gt (default: the run's)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="default: the run's trained detector"),
    backend: Optional[str] = BackendOpt,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Predict on every image of --gt and report COCO bbox/segm AP (LVIS AP for LVIS json)
    and mask AP on the separated objects. Writes WORKDIR/detector/metrics-<gt stem>.json."""
    from exits.stages.detector import evaluate_detector_stage, metrics_summary, run_images_dir

    setup_logging(False)
    check_input_file(gt, "GT json")
    try:
        cfg = detector_config(workdir, config, overrides or [], backend)
        metrics = evaluate_detector_stage(workdir, gt, images or run_images_dir(workdir), cfg, checkpoint)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        fail(error_text(exc))
    typer.echo(json.dumps(metrics_summary(metrics), indent=1))
    typer.echo(f"metrics: {workdir / 'detector' / f'metrics-{gt.stem}.json'}")
