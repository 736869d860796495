"""Stage 0: validate the annotation file and write the instances table of the run."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from exits.data.instances_table import build_instances_table, write_instances_table
from exits.data.reader import load_point_dataset
from exits.data.validation import ValidationSummary
from exits.io import write_json
from exits.run_folder import RunFolder

log = logging.getLogger(__name__)


def prepare_instances(annotations: Path, images: Path, workdir: Path, *, crop_margin: float, crop_min_margin_px: int,
                      crop_size: int, derive_missing_points: bool, point_tolerance_px: float, check_images: bool,
                      progress: bool = True) -> dict:
    """Validate ``annotations`` and write ``instances.parquet`` + ``rejections.json``.

    Returns a small summary dict (counts by rejection reason).
    """
    ds = load_point_dataset(annotations, images, derive_missing_points=derive_missing_points,
                            point_tolerance_px=point_tolerance_px, check_images=check_images, progress=progress)
    table = build_instances_table(ds, margin=crop_margin, min_margin_px=crop_min_margin_px, crop_size=crop_size)
    run = RunFolder(workdir)
    write_instances_table(table, run.instances)
    summary = ValidationSummary.of(ds.n_annotations, len(ds.objects), ds.rejections)
    write_json(run.rejections, {
        "summary": asdict(summary),
        "rejections": [asdict(r) for r in ds.rejections],
    }, indent=1)
    log.info("instances: %s", summary)
    return {"objects": len(ds.objects), "images": len({o.image_id for o in ds.objects}),
            "rejected": summary.total - summary.kept}
