"""Pseudo-mask quality reports: per-object metrics, mIoU summary, calibration, figures,
worst-object gallery, Markdown/HTML and Prefect artifacts (evaluation side only).

The mIoU math is :mod:`exits.eval`; this package turns it into a run's ``report/`` folder.
"""
from exits.report.artifacts import in_prefect_run, publish_report_artifacts
from exits.report.build import DEFAULT_N_WORST, build_report, build_report_in_memory
from exits.report.evaluation import Evaluation, evaluate_masks, evaluate_predictions, pseudo_label_rles
from exits.report.gallery import GalleryItem, run_gallery
from exits.report.metrics import (
    METRICS_SCHEMA,
    calibration_of,
    object_metrics_table,
    score_calibration,
    spearman_rank_correlation,
    worst_objects,
)

__all__ = [
    "DEFAULT_N_WORST",
    "Evaluation",
    "GalleryItem",
    "METRICS_SCHEMA",
    "build_report",
    "build_report_in_memory",
    "calibration_of",
    "evaluate_masks",
    "evaluate_predictions",
    "in_prefect_run",
    "object_metrics_table",
    "publish_report_artifacts",
    "pseudo_label_rles",
    "run_gallery",
    "score_calibration",
    "spearman_rank_correlation",
    "worst_objects",
]
