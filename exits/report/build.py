"""Build a run's report: WORKDIR/report/ with metrics, summary, figures, gallery, md, html.

Evaluation side: GT masks are read (through :mod:`exits.eval`) only to score pseudo masks;
nothing here feeds training. Every file is written atomically.

    report/metrics.parquet   one row per evaluated object (METRICS_SCHEMA)
    report/summary.json      mIoU all / separated / non-separated / per size / per category,
                             separated count and share and where the subset came from,
                             score-vs-IoU calibration, inputs, worst ann ids, and "parts":
                             box / GrabCut / dense CRF / generator / final mask on one
                             sample of objects (:mod:`exits.report.parts`)
    report/figures/*.png     IoU histograms, per-category mIoU, score vs IoU
    report/gallery/*.png     the worst objects (image + points | pseudo | GT)
    report/report.md         readable report (links the PNGs above)
    report/report.html       the same, self-contained (PNGs embedded as data URIs)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exits.eval import load_gt_masks, summarize_miou_columns
from exits.io import atomic_open, atomic_path, write_bytes, write_json
from exits.report.artifacts import publish_report_artifacts
from exits.report.evaluation import evaluate_predictions, pseudo_label_rles
from exits.report.figures import report_figures
from exits.report.gallery import gallery_items
from exits.report.metrics import calibration_of, object_metrics_table, report_summary, worst_objects
from exits.report.parts import DEFAULT_PEER_SAMPLE, parts_comparison
from exits.report.render import render_html, render_markdown
from exits.report.run_files import read_object_geometry, read_points_source, read_retrieval_stats
from exits.report.metrics_parquet import metrics_rows, read_metrics_columns
from exits.report.pseudo_masks import pseudo_masks_of_run
from exits.report.streaming import evaluate_streaming
from exits.run_folder import RunFolder

log = logging.getLogger(__name__)

DEFAULT_N_WORST = 12


def _replace_dir_pngs(folder: Path, pngs: dict[str, bytes]) -> dict[str, str]:
    """Write ``{stem: png}`` into ``folder`` and drop PNGs left there by an earlier report."""
    for old in folder.glob("*.png") if folder.is_dir() else ():
        if old.stem not in pngs:
            old.unlink()
    for stem, png in pngs.items():
        write_bytes(folder / f"{stem}.png", png)
    return {stem: f"{folder.name}/{stem}.png" for stem in pngs}


def build_report(workdir: str | Path, gt: str | Path | None = None, separated_ids: str | Path | None = None,
                 min_part_pixels: int = 16, min_part_fraction: float = 0.05, *, n_worst: int = DEFAULT_N_WORST,
                 publish: bool = True, peer_sample: int = DEFAULT_PEER_SAMPLE) -> dict[str, Any]:
    """Evaluate ``WORKDIR/pseudo_labels.json`` against GT masks and write ``WORKDIR/report/``.

    Streamed (:mod:`exits.report.streaming`): the GT json one annotation at a time, the pseudo
    masks a row group at a time, metrics.parquet written as the objects are scored; the
    summary, calibration, figures and the gallery's choice come from that table's columns.
    Memory is flat in the number of objects apart from a few numpy columns (~100 bytes per
    object at the peak). The result equals :func:`build_report_in_memory`'s, file for file.

    Args:
        workdir: run folder (pseudo_labels.json; run.json, instances.parquet when present).
        gt: GT json; default the run's ``gt``, else its input annotations (run.json).
        separated_ids: file listing the separated ann ids (Separated COCO); default: derive
            them from the GT masks with the part thresholds.
        min_part_pixels, min_part_fraction: part thresholds of the derived rule.
        n_worst: objects in the gallery (lowest IoU).
        publish: also create Prefect artifacts when inside a Prefect run.
        peer_sample: objects (at most) of the parts table, :func:`exits.report.parts.parts_comparison`;
            0 = none.
    Returns:
        The summary written to summary.json.
    Raises:
        FileNotFoundError: no pseudo_labels.json, or no GT json known.
        ValueError: no pseudo-labelled object has a GT mask.
    """
    workdir = Path(workdir)
    run = RunFolder(workdir)
    pseudo_json = run.pseudo_json
    if not pseudo_json.is_file():
        raise FileNotFoundError(f"{pseudo_json} not found: run `exits run` first")
    gt_path = run.gt_json(gt)
    out = run.report_dir
    # metrics.parquet first (atomic_path makes the folder, naming what is in its way), then
    # every file read back from it; it replaces the old one after the others are written
    with atomic_path(out / "metrics.parquet") as metrics_tmp:
        scratch = out / f".pseudo-from-json.{os.getpid()}.parquet.tmp"
        try:
            pseudo = pseudo_masks_of_run(pseudo_json, scratch)
            ev = evaluate_streaming(pseudo, gt_path, metrics_tmp, workdir=workdir, separated_ids_path=separated_ids,
                                    min_part_pixels=min_part_pixels, min_part_fraction=min_part_fraction,
                                    n_worst=n_worst)
            table = read_metrics_columns(metrics_tmp)
            miou = summarize_miou_columns(
                table["iou"].to_numpy(), table["iscrowd"].to_numpy(zero_copy_only=False),
                table["separated"].to_numpy(zero_copy_only=False), table["area"].to_numpy(),
                table["category_id"].to_numpy(), ev.category_names)
            miou["separated_source"] = ev.separated_source
            miou["separated_rule"] = ev.separated_rule
            worst_ids = worst_objects(table, n_worst)
            inputs = {"workdir": str(workdir), "pseudo_labels": str(pseudo_json), "gt": str(gt_path),
                      "separated_ids": str(separated_ids) if separated_ids else None}
            summary = report_summary(miou, table, calibration_of(table), n_predicted=ev.n_predicted, inputs=inputs,
                                     worst_ann_ids=worst_ids)
            if run.points.is_file():
                # Objects the generator trained on MIL alone (no seed set / nothing retrieved), issue 13.
                summary["retrieval"] = {k: round(v, 4) for k, v in read_retrieval_stats(run.points).items()}
            parts = parts_comparison(workdir, gt_path, table, peer_sample)
            if parts is not None:
                summary["parts"] = parts
            figures = report_figures(table, summary)
            del table
            worst_rows = metrics_rows(metrics_tmp, worst_ids)
            gt_rles = ev.worst_gt
            if set(worst_ids) - set(gt_rles):  # not expected: the heap saw every scored object
                gt_rles = {i: g.rle for i, g in load_gt_masks(gt_path, set(worst_ids)).items()}
            items = gallery_items(worst_rows, pseudo.rles_of(worst_ids), {i: gt_rles[i] for i in worst_ids},
                                  read_object_geometry(workdir, set(worst_ids)), run.read_meta().images)
            _write_report_files(workdir, out, summary, figures, worst_rows, items, publish=publish)
        finally:
            scratch.unlink(missing_ok=True)
    log.info("report written to %s (mIoU all %.3f over %d objects)", out, summary["all"]["miou"] or 0.0,
             summary["all"]["count"])
    return summary


def build_report_in_memory(workdir: str | Path, gt: str | Path | None = None, separated_ids: str | Path | None = None,
                           min_part_pixels: int = 16, min_part_fraction: float = 0.05, *,
                           n_worst: int = DEFAULT_N_WORST, publish: bool = True,
                           peer_sample: int = DEFAULT_PEER_SAMPLE) -> dict[str, Any]:
    """The report as it was before streaming (the reference :func:`build_report` is tested
    equal to): the GT json loaded whole, a :class:`exits.eval.GtInstance` and a metrics row
    dict per object. Same arguments, files and result; memory grows with the json (4.6 GB
    at COCO size). Kept for tests and small runs."""
    workdir = Path(workdir)
    run = RunFolder(workdir)
    pseudo = run.pseudo_json
    if not pseudo.is_file():
        raise FileNotFoundError(f"{pseudo} not found: run `exits run` first")
    gt_path = run.gt_json(gt)
    rles, scores = pseudo_label_rles(pseudo)
    ev = evaluate_predictions(rles, gt_path, separated_ids_path=separated_ids, min_part_pixels=min_part_pixels,
                              min_part_fraction=min_part_fraction)
    table = object_metrics_table(ev.rows, ev.category_names, scores, read_points_source(workdir))
    worst_ids = worst_objects(table, n_worst)
    inputs = {"workdir": str(workdir), "pseudo_labels": str(pseudo), "gt": str(gt_path),
              "separated_ids": str(separated_ids) if separated_ids else None}
    summary = report_summary(ev.summary, table, calibration_of(table), n_predicted=len(rles), inputs=inputs,
                             worst_ann_ids=worst_ids)
    if run.points.is_file():
        # Objects the generator trained on MIL alone (no seed set / nothing retrieved), issue 13.
        from exits.stages.point_retrieval import read_points, retrieval_stats

        summary["retrieval"] = {k: round(v, 4) for k, v in retrieval_stats(read_points(run.points)).items()}
    parts = parts_comparison(workdir, gt_path, table, peer_sample)
    if parts is not None:
        summary["parts"] = parts

    out = run.report_dir
    picked = table.filter(pc.is_in(table["ann_id"], value_set=pa.array(worst_ids, type=pa.int64())))
    by_id = {r["ann_id"]: r for r in picked.to_pylist()}
    worst_rows = [by_id[i] for i in worst_ids]
    items = gallery_items(worst_rows, rles, {i: ev.gt[i].rle for i in worst_ids},
                          read_object_geometry(workdir, set(worst_ids)), run.read_meta().images)
    figures = report_figures(table, summary)

    with atomic_path(out / "metrics.parquet") as tmp:
        pq.write_table(table, tmp)
    _write_report_files(workdir, out, summary, figures, worst_rows, items, publish=publish)
    log.info("report written to %s (mIoU all %.3f over %d objects)", out, summary["all"]["miou"] or 0.0,
             summary["all"]["count"])
    return summary


def _write_report_files(workdir: Path, out: Path, summary: dict[str, Any], figures: dict[str, bytes],
                        worst_rows: list[dict[str, Any]], items: list, *, publish: bool) -> None:
    """summary.json, figures/, gallery/, report.md, report.html (+ Prefect artifacts)."""
    gallery_png = {item.ann_id: item.png for item in items}
    write_json(out / "summary.json", summary, indent=1)
    figure_paths = _replace_dir_pngs(out / "figures", figures)
    stems = _replace_dir_pngs(out / "gallery", {f"ann_{i}": png for i, png in gallery_png.items()})
    gallery_paths = {i: stems[f"ann_{i}"] for i in gallery_png}
    title = f"Pseudo-mask quality: {workdir.resolve().name}"
    markdown = render_markdown(summary, title=title, worst_rows=worst_rows, figure_paths=figure_paths,
                               gallery_paths=gallery_paths)
    with atomic_open(out / "report.md") as fh:
        fh.write(markdown)
    with atomic_open(out / "report.html") as fh:
        fh.write(render_html(summary, title=title, figures=figures, worst_rows=worst_rows, gallery_png=gallery_png))
    if publish:
        publish_report_artifacts(summary, markdown=render_markdown(summary, title=title, worst_rows=worst_rows),
                                 worst_rows=worst_rows)
