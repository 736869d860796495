"""Retrieval ablation on a finished run's frozen similarity extractor (evaluation side: GT).

    python bench/ablate_retrieval.py RUN_DIR [--out bench/results/retrieval_ablation.json]

Re-runs stage 1b with each setting of GRID (over the run's config) and reports the
retrieved points' patch-level precision / recall against GT (``retrieval_quality``) and
the share of objects with nothing retrieved. Seconds per setting: S is recomputed each time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exits.run_folder import RunFolder  # noqa: E402
from exits.config import load_config  # noqa: E402
from exits.data.instances_table import read_instances_table  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.models import load_mask_model  # noqa: E402
from exits.pipeline import retrieval_params  # noqa: E402
from exits.stages.object_crops import ObjectCropDataset  # noqa: E402
from exits.stages.point_retrieval import retrieval_stats, retrieve_dataset_points  # noqa: E402
from retrieval_quality import patch_stats  # noqa: E402

# name -> overrides of the retrieval section (on top of the run's config).
GRID: dict[str, list[str]] = {
    "shipped (ratio, tau +-0.2, last layer)": [],
    "ratio + min_mass 0.5": ["retrieval.min_mass=0.5"],
    "ratio + min_mass 1.0": ["retrieval.min_mass=1.0"],
    "ratio, tau +-0.3": ["retrieval.tau_fg=0.3", "retrieval.tau_bg=-0.3"],
    "raw (probability), tau +-0.2": ["retrieval.normalize=false", "retrieval.raw_scale=probability"],
    "raw n(pi_f-pi_b), tau +-0.5": ["retrieval.normalize=false", "retrieval.tau_fg=0.5", "retrieval.tau_bg=-0.5"],
    "raw n(pi_f-pi_b), tau +-1": ["retrieval.normalize=false", "retrieval.tau_fg=1.0", "retrieval.tau_bg=-1.0"],
    "raw n(pi_f-pi_b), tau +-2": ["retrieval.normalize=false", "retrieval.tau_fg=2.0", "retrieval.tau_bg=-2.0"],
    "layers last 2": ["retrieval.layers=[-2,-1]"],
    "layers last 3": ["retrieval.layers=[-3,-2,-1]"],
    "layers all 6": ["retrieval.layers=[0,1,2,3,4,5]"],
    "neighbour BG seeds always": ["retrieval.neighbour_bg=always"],
    "neighbour BG seeds none": ["retrieval.neighbour_bg=none"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "retrieval_ablation.json")
    ap.add_argument("--only", nargs="*", help="names of GRID to run (default all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_info = json.loads(RunFolder(args.run).run_meta.read_text())
    base = load_config(str(RunFolder(args.run).config))
    images, gt = Path(run_info["images"]), Path(run_info["annotations"])
    dataset = ObjectCropDataset(read_instances_table(RunFolder(args.run).instances), images, base.data.crop_size)
    model = load_mask_model(RunFolder(args.run).similarity)
    results = {}
    for name, overrides in GRID.items():
        if args.only and name not in args.only:
            continue
        cfg = load_config(str(RunFolder(args.run).config), overrides)
        table = retrieve_dataset_points(model, dataset, retrieval_params(cfg), torch.device("cpu"), progress=False)
        stats = patch_stats(args.run, gt, base.data.crop_size, points=table)
        results[name] = {"overrides": overrides, **stats, "counts": {k: round(v, 4) for k, v in retrieval_stats(table).items()}}
        a, s = stats["all"], stats["separated"]
        print(f"| {name} | {a['fg_per_object']} | {a['fg_precision']:.3f} | {a['fg_recall']:.3f} | {a['bg_per_object']} | "
              f"{a['bg_precision']:.3f} | {s['fg_precision']:.3f} | {s['fg_recall']:.3f} | {a['objects_with_nothing_retrieved']} |",
              flush=True)
    write_json(args.out, {"run": str(args.run), "settings": results}, indent=1)


if __name__ == "__main__":
    main()
