"""Diagnostic: how right are the retrieved points? (evaluation side: reads GT masks)

    python bench/retrieval_quality.py RUN_DIR [--gt FILE]

For each object, the GT mask is cropped with the same window as the model input and
pooled onto the patch grid (patch = FG when >= 50% covered). Reports precision of pseudo
FG / pseudo BG patches and their recall of the box's FG / BG patches, over all objects and
over separated ones.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exits.run_folder import RunFolder  # noqa: E402
from exits.data.crops import crop_mask  # noqa: E402
from exits.data.instances_table import read_instances_table, table_windows  # noqa: E402
from exits.eval import count_parts, load_gt_masks  # noqa: E402
from exits.eval.rle import decode_rle  # noqa: E402
from exits.stages.point_retrieval import read_points  # noqa: E402


def patch_stats(run: Path, gt_path: Path, crop_size: int, points=None) -> dict:
    """Patch-level precision/recall of the run's points.parquet (or of ``points``, a table
    of the same schema in instances order)."""
    table = read_instances_table(RunFolder(run).instances)
    points = read_points(RunFolder(run).points) if points is None else points
    windows = table_windows(table, crop_size)
    gt = load_gt_masks(gt_path)
    parts = count_parts(gt)
    acc = {k: {"fg_tp": 0, "fg_n": 0, "bg_tp": 0, "bg_n": 0, "box_fg": 0, "box_bg": 0, "objects": 0, "empty": 0}
           for k in ("all", "separated")}
    ann_ids = table.column("ann_id").to_pylist()
    grid = points.column("grid")[0].as_py()
    for i, ann_id in enumerate(ann_ids):
        m = torch.from_numpy(decode_rle(gt[ann_id].rle).astype(np.float32))
        cell = F.adaptive_avg_pool2d(crop_mask(m, windows[i])[None, None], grid)[0, 0].flatten() >= 0.5
        fg = points.column("pseudo_fg")[i].as_py()
        bg = points.column("pseudo_bg")[i].as_py()
        for key in ("all", "separated") if parts[ann_id] >= 2 else ("all",):
            a = acc[key]
            a["objects"] += 1
            a["empty"] += int(not fg and not bg)
            a["fg_tp"] += int(cell[fg].sum())
            a["fg_n"] += len(fg)
            a["bg_tp"] += int((~cell[bg]).sum())
            a["bg_n"] += len(bg)
            a["box_fg"] += int(cell.sum())
            a["box_bg"] += int((~cell).sum())
    out = {}
    for key, a in acc.items():
        out[key] = {
            "objects": a["objects"], "objects_with_nothing_retrieved": a["empty"],
            "fg_precision": round(a["fg_tp"] / max(1, a["fg_n"]), 3), "fg_per_object": round(a["fg_n"] / max(1, a["objects"]), 1),
            "fg_recall": round(a["fg_tp"] / max(1, a["box_fg"]), 3),
            "bg_precision": round(a["bg_tp"] / max(1, a["bg_n"]), 3), "bg_per_object": round(a["bg_n"] / max(1, a["objects"]), 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--gt", type=Path)
    ap.add_argument("--crop-size", type=int, default=96)
    args = ap.parse_args()
    gt = args.gt or RunFolder(args.run).read_meta().annotations
    print(json.dumps(patch_stats(args.run, gt, args.crop_size), indent=1))


if __name__ == "__main__":
    main()
