"""Command line: ``exits --help`` lists every command.

Configs are validated here, at the edge; the commands below hand plain values or the
validated config sections to the library.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from exits.cli_support import fail, setup_logging
from exits.config import ConfigError, load_config
from exits.data import DatasetError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="EXITS: extreme points -> instance masks -> Mask R-CNN. Run `exits COMMAND --help` for details.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file, or a name in configs/ (demo, coco, lvis, voc)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config value, e.g. --set generator.optim.epochs=3 (repeatable)")


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="output folder: instances.json, val.json, images/"),
    n_train: int = typer.Option(100, help="number of train images"),
    n_val: int = typer.Option(30, help="number of held-out val images (with GT masks)"),
    seed: int = typer.Option(0, help="random seed (same seed, same files)"),
    variant: str = typer.Option("demo", help="demo | holdout (other photographs in every role, for untuned evaluation)"),
) -> None:
    """Generate the built-in demo dataset from scikit-image's photographs."""
    from exits.demo import generate_demo_dataset

    summary = generate_demo_dataset(out, n_train=n_train, n_val=n_val, seed=seed, progress=True, variant=variant)
    typer.echo(_format_summary(summary))


def _format_summary(summary: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in summary.items())


@app.command()
def validate(
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO/LVIS instances json"),
    images: Path = typer.Option(..., "--images", "-i", help="image folder"),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Check an annotation file: list every rejected record and why."""
    setup_logging(False)
    try:
        cfg = load_config(config, overrides or [])
        from exits.data import load_point_dataset

        ds = load_point_dataset(annotations, images, derive_missing_points=cfg.data.derive_missing_points,
                                point_tolerance_px=cfg.data.point_tolerance_px, check_images=cfg.data.check_images,
                                progress=True)
    except (ConfigError, DatasetError) as exc:
        fail(str(exc))
    for r in ds.rejections:
        typer.echo(str(r))
    typer.echo(f"{len(ds.objects)} objects in {len(ds.images)} images are usable; {len(ds.rejections)} records rejected")


@app.command()
def run(
    images: Path = typer.Option(..., "--images", "-i", help="image folder"),
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO/LVIS instances json with extreme_points (or masks to derive them from)"),
    workdir: Path = typer.Option(..., "--workdir", "-w", help="run folder: every stage writes its outputs here"),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    gt: Optional[Path] = typer.Option(None, "--gt", help="json with GT masks for the mIoU report (default: --annotations when it has masks)"),
    val: Optional[Path] = typer.Option(None, "--val", help="held-out json with GT masks (images in --images) to evaluate the stage-2 detector on (with train_detector: true)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the EXITS pipeline end to end: points -> pseudo masks (+ mIoU report when GT exists).

    Runs the Prefect flow `exits-pipeline` (one subflow per stage, cached tasks, sharded
    point retrieval / pseudo labels): re-running a finished run recomputes nothing, a killed
    run resumes. Without PREFECT_API_URL it uses a temporary local Prefect server. With
    `train_detector: true` in the config (or --set train_detector=true) stage 2 follows.
    """
    setup_logging(verbose)
    try:
        cfg = load_config(config, overrides or [])
        _check_inputs(images, annotations, gt)
        _check_inputs(images, annotations, val)
        from flows.pipeline import run_pipeline_flow

        result = run_pipeline_flow(images=images, annotations=annotations, workdir=workdir, cfg=cfg, gt=gt, val_gt=val)
    except (ConfigError, DatasetError) as exc:
        fail(str(exc))
    except RuntimeError as exc:
        from flows.prefect_env import prefect_startup_hint

        hint = prefect_startup_hint(exc)
        if hint is None:
            raise
        fail(hint)
    result.pop("task_states", None)  # per-task detail stays in WORKDIR/run_summary.json
    typer.echo(_format_summary(result))


def _check_inputs(images: Path, annotations: Path, gt: Optional[Path]) -> None:
    if not images.is_dir():
        fail(f"image folder not found: {images}")
    for path in (annotations, gt):
        if path is not None and not path.is_file():
            fail(f"annotation file not found: {path}")


@app.command()
def serve(
    cron: str = typer.Option(..., "--cron", help='cron schedule, e.g. "0 2 * * *" (every night at 02:00)'),
    images: Path = typer.Option(..., "--images", "-i", help="image folder"),
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO/LVIS instances json with extreme_points (or masks)"),
    workdir: Path = typer.Option(..., "--workdir", "-w", help="run folder of the scheduled runs"),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    gt: Optional[Path] = typer.Option(None, "--gt", help="json with GT masks for the mIoU report"),
    val: Optional[Path] = typer.Option(None, "--val", help="held-out json with GT masks to evaluate the stage-2 detector on (with train_detector: true)"),
    name: Optional[str] = typer.Option(None, "--name", help="deployment name (default: the config's name)"),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="time zone of the cron schedule, e.g. Europe/Berlin (default UTC)"),
) -> None:
    """Register the pipeline as a Prefect deployment on a cron schedule and serve it (blocks).

    Needs a Prefect server (`prefect server start`, then PREFECT_API_URL); watch the runs in
    its UI. Each scheduled run is `exits run` with these inputs and config; cached stages
    are not recomputed.
    """
    setup_logging(False)
    try:
        cfg = load_config(config, overrides or [])
        _check_inputs(images, annotations, gt)
        _check_inputs(images, annotations, val)
        from flows.deploy import serve_pipeline

        serve_pipeline(cron=cron, images=images, annotations=annotations, workdir=workdir, cfg=cfg, gt=gt, name=name,
                       timezone=timezone, val_gt=val)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))


@app.command()
def report(
    workdir: Path = typer.Option(..., "--workdir", "-w", help="run folder with pseudo_labels.json"),
    gt: Optional[Path] = typer.Option(None, "--gt", help="json with GT masks (default: the run's GT, else its input annotations)"),
    separated_ids: Optional[Path] = typer.Option(None, "--separated-ids", help="file listing the separated annotation ids (Separated COCO); default: derive from GT masks"),
    worst: int = typer.Option(12, "--worst", min=0, help="objects in the worst-IoU gallery"),
) -> None:
    """mIoU report of the pseudo masks: WORKDIR/report/ (metrics.parquet, summary.json, report.md, report.html)."""
    setup_logging(False)
    from exits.stages.report import write_report

    try:
        summary = write_report(workdir, gt=gt, separated_ids=separated_ids, n_worst=worst)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    from exits.eval import format_summary_markdown

    typer.echo(format_summary_markdown(summary))
    cal = summary["calibration"]
    rho = "–" if cal["spearman"] is None else f"{cal['spearman']:.3f}"
    typer.echo(f"Separated: {summary['separated_objects']['count']} objects ({summary['separated_source']}); "
               f"score vs IoU Spearman rho {rho}")
    typer.echo(f"Report: {workdir / 'report' / 'report.html'} (and report.md, metrics.parquet, summary.json)")


# Stage 2 (commands live beside their stage; registered here so `exits --help` lists all).
from exits.detector_cli import evaluate_detector_command, train_detector_command  # noqa: E402

app.command("train-detector")(train_detector_command)
app.command("evaluate-detector")(evaluate_detector_command)

# Human spot-fixes: the click model, the review-and-fix web page, merging the fixes for stage 2.
from exits.interactive.commands import eval_clicks_command, train_clicks_command  # noqa: E402

app.command("train-clicks")(train_clicks_command)
app.command("eval-clicks")(eval_clicks_command)
from exits.spotfix.commands import export_command, spotfix_command  # noqa: E402

app.command("spotfix")(spotfix_command)
app.command("export")(export_command)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover - `python -m exits.cli`
    main()
