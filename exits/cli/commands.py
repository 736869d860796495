"""Command line: ``exits --help`` lists every command.

Configs are validated here, at the edge; the commands below hand plain values or the
validated config sections to the library.

Errors end a command with one ``error:`` line: exit status 2 for what the user can fix (a bad
value or input, a file that cannot be read or written: ``<file>: <reason> (<ERRNO>)``), 1 for
a bug; ``exits --debug COMMAND ...`` (or ``EXITS_DEBUG=1``) shows the traceback instead
(:mod:`exits.cli.support`).
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from exits.cli.support import (DEBUG_ENV, ExitsGroup, check_input_file, debug_enabled, error_text, fail,
                               quiet_tracebacks, report_error, set_debug, setup_logging)
from exits.config import ConfigError, load_config

app = typer.Typer(
    cls=ExitsGroup,
    add_completion=False,
    no_args_is_help=True,
    help="EXITS: extreme points -> instance masks -> Mask R-CNN. Run `exits COMMAND --help` for details.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file, or a name in configs/ (demo, coco, lvis, voc)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config value, e.g. --set generator.optim.epochs=3 (repeatable)")


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help=f"show the traceback of an error (also {DEBUG_ENV}=1); "
                               "without it an error is one line"),
) -> None:
    """EXITS: extreme points -> instance masks -> Mask R-CNN. Run `exits COMMAND --help` for details."""
    set_debug(debug)


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
    except ConfigError as exc:
        fail(error_text(exc))
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
        _check_trainable(cfg)
        _check_inputs(images, annotations, gt)
        _check_inputs(images, annotations, val)
        _check_workdir(workdir)
        from flows.pipeline import run_pipeline_flow

        quiet_tracebacks()  # Prefect installed its console handlers on import
        result = run_pipeline_flow(images=images, annotations=annotations, workdir=workdir, cfg=cfg, gt=gt, val_gt=val)
    except ConfigError as exc:
        fail(error_text(exc))
    # any other error (an OSError in a stage, Prefect's temporary server not starting): one
    # line by ExitsGroup
    result.pop("task_states", None)  # per-task detail stays in WORKDIR/run_summary.json
    typer.echo(_format_summary(result))


def _check_trainable(cfg) -> None:
    """Stop before Prefect starts when the config would train a large ViT from random init
    without saying so (paper configs with no ``backbone.pretrained_path``)."""
    refusal = cfg.backbone.random_init_refusal()
    if refusal:
        fail(refusal)


def _check_inputs(images: Path, annotations: Path, gt: Optional[Path]) -> None:
    if not images.is_dir():
        fail(f"image folder not found: {images}")
    for path in (annotations, gt):
        if path is not None:
            check_input_file(path)


def _check_workdir(workdir: Path) -> None:
    """The run folder can be created and written: checked before Prefect's temporary server
    starts (seconds), so a read-only or mistyped ``--workdir`` fails at once, naming it.

    Raises the OSError (``<workdir>: Permission denied (EACCES)``, ``Not a directory``, ...).
    """
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a regular file
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(workdir)) from None
    try:
        with tempfile.TemporaryFile(dir=workdir):  # root ignores mode bits; a read-only mount does not
            pass
    except OSError as exc:
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(workdir)) from None


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
    loop: bool = typer.Option(False, "--loop", help="schedule `exits loop` (exits-loop/NAME: review step, export, stage 2) instead of the pipeline; --val is the detector's held-out GT"),
    no_review: bool = typer.Option(False, "--no-review", help="with --loop: no human step"),
) -> None:
    """Register the pipeline (or with --loop the whole loop) as a Prefect deployment on a cron
    schedule and serve it (blocks).

    Needs a Prefect server (`prefect server start`, then PREFECT_API_URL); watch the runs in
    its UI. Each scheduled run is `exits run` (or `exits loop`) with these inputs and config;
    cached stages are not recomputed. A scheduled loop run that reaches the review suspends
    ("Suspended" in the UI, waiting for input) and this process continues it once resumed.
    """
    setup_logging(False)
    try:
        cfg = load_config(config, overrides or [])
        _check_trainable(cfg)
        _check_inputs(images, annotations, gt)
        _check_inputs(images, annotations, val)
        from flows.deploy import serve_pipeline

        quiet_tracebacks()
        if loop:
            from flows.deploy import serve_loop

            serve_loop(cron=cron, images=images, annotations=annotations, workdir=workdir, cfg=cfg, gt=val, report_gt=gt,
                       name=name, timezone=timezone, review=not no_review)
            return
        serve_pipeline(cron=cron, images=images, annotations=annotations, workdir=workdir, cfg=cfg, gt=gt, name=name,
                       timezone=timezone, val_gt=val)
    except (ConfigError, ValueError) as exc:
        fail(error_text(exc))


@app.command()
def report(
    workdir: Path = typer.Option(..., "--workdir", "-w", help="run folder with pseudo_labels.json"),
    gt: Optional[Path] = typer.Option(None, "--gt", help="json with GT masks (default: the run's GT, else its input annotations)"),
    separated_ids: Optional[Path] = typer.Option(None, "--separated-ids", help="file listing the separated annotation ids (Separated COCO); default: derive from GT masks"),
    worst: int = typer.Option(12, "--worst", min=0, help="objects in the worst-IoU gallery"),
    peer_sample: Optional[int] = typer.Option(None, "--peer-sample", min=0, help="objects (at most, evenly strided over the sorted ann ids) of the parts table: box / GrabCut / dense CRF / generator / final mask side by side, like for like; 0 = no parts table (default: the run config's eval.peer_sample, 300)"),
) -> None:
    """mIoU report of the pseudo masks: WORKDIR/report/ (metrics.parquet, summary.json, report.md, report.html)."""
    setup_logging(False)
    from exits.run_folder import RunFolder
    from exits.stages.report import write_report

    try:
        if gt is not None:
            check_input_file(gt, "GT json")
        if peer_sample is None:
            peer_sample = RunFolder(workdir).load_config().eval.peer_sample
        summary = write_report(workdir, gt=gt, separated_ids=separated_ids, n_worst=worst, peer_sample=peer_sample)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        fail(error_text(exc))
    from exits.eval import format_summary_markdown

    typer.echo(format_summary_markdown(summary))
    cal = summary["calibration"]
    rho = "–" if cal["spearman"] is None else f"{cal['spearman']:.3f}"
    typer.echo(f"Separated: {summary['separated_objects']['count']} objects ({summary['separated_source']}); "
               f"score vs IoU Spearman rho {rho}")
    parts = summary.get("parts")
    if parts:
        cells = ", ".join(f"{r['part']} {100 * r['all']['miou']:.1f}" for r in parts["rows"] if r["all"]["miou"] is not None)
        typer.echo(f"Parts on {parts['sample']['objects']} objects (mIoU all %): {cells}"
                   + "".join(f"; no {o['part']} row: {o['reason']}" for o in parts["omitted"]))
    typer.echo(f"Report: {workdir / 'report' / 'report.html'} (and report.md, metrics.parquet, summary.json)")


# Stage 2 (commands live beside their stage; registered here so `exits --help` lists all).
from exits.cli.detector import evaluate_detector_command, train_detector_command  # noqa: E402

app.command("train-detector")(train_detector_command)
app.command("evaluate-detector")(evaluate_detector_command)

# Human spot-fixes: the click model, the review-and-fix web page, merging the fixes for stage 2.
from exits.interactive.commands import eval_clicks_command, train_clicks_command  # noqa: E402

app.command("train-clicks")(train_clicks_command)
app.command("eval-clicks")(eval_clicks_command)
from exits.spotfix.commands import export_command, spotfix_command  # noqa: E402

app.command("spotfix")(spotfix_command)
app.command("export")(export_command)

# The whole loop (stage 1 -> review -> export -> stage 2) as one Prefect flow with a person in it.
from exits.cli.loop import loop_command  # noqa: E402

app.command("loop")(loop_command)


def main() -> None:  # pragma: no cover - console entry
    try:
        sys.exit(app())
    except Exception as exc:  # what escaped ExitsGroup (it re-raises with --debug: typer shows the traceback)
        if debug_enabled():
            raise
        sys.exit(report_error(exc))


if __name__ == "__main__":  # pragma: no cover - `python -m exits.cli.commands`
    main()
