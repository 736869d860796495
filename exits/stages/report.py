"""Report stage: score a run's pseudo masks against GT masks and write ``WORKDIR/report/``.

A thin entry point for the pipeline; the work is in :mod:`exits.report` (files, figures,
gallery, Prefect artifacts) and :mod:`exits.eval` (the mIoU math). GT masks are read there,
on the evaluation side, and never flow back into training. The report streams (the GT json
one annotation at a time, the pseudo masks a row group at a time: memory flat in the number
of objects, :mod:`exits.report.streaming`); :func:`exits.report.build_report_in_memory` is
the former in-memory report, kept as its tested reference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from exits.report import build_report
from exits.report.evaluation import evaluate_masks, pseudo_label_rles
from exits.report.parts import DEFAULT_PEER_SAMPLE

__all__ = ["evaluate_masks", "pseudo_label_rles", "write_report"]


def write_report(workdir: str | Path, gt: str | Path | None = None, separated_ids: str | Path | None = None,
                 min_part_pixels: int = 16, min_part_fraction: float = 0.05, *, n_worst: int = 12,
                 publish: bool = True, peer_sample: int = DEFAULT_PEER_SAMPLE) -> dict[str, Any]:
    """Evaluate ``WORKDIR/pseudo_labels.json`` and write ``WORKDIR/report/`` (metrics.parquet,
    summary.json, figures/, gallery/, report.md, report.html); returns the summary.

    ``gt`` defaults to the run's GT json, else its input annotations (run.json);
    ``peer_sample``: objects of the parts table (box / GrabCut / dense CRF / generator /
    final mask on one sample, :mod:`exits.report.parts`), 0 = none. See
    :func:`exits.report.build_report`.
    """
    return build_report(workdir, gt=gt, separated_ids=separated_ids, min_part_pixels=min_part_pixels,
                        min_part_fraction=min_part_fraction, n_worst=n_worst, publish=publish,
                        peer_sample=peer_sample)
