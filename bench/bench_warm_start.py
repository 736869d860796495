"""Self-supervised warm start of the similarity extractor: does it retrieve better points?

    python bench/bench_warm_start.py [--splits demo holdout] [--seeds 0 1 2] [--settings none simmim ...]

Per split, seed and setting of SETTINGS: stage 1a (similarity extractor, random init, with
the setting's overrides over ``--config``) then stage 1b on every object, and the retrieved
points' patch-level precision / recall against GT (``retrieval_quality.patch_stats``,
evaluation side only). The final mIoU of the kept setting comes from full runs:
``bench/bench_stage1.py --variant``. Results: bench/results/warm_start.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_stage1 import SPLITS, ensure_split  # noqa: E402
from exits.config import load_config  # noqa: E402
from exits.data.instances_table import read_instances_table  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.models import load_mask_model  # noqa: E402
from exits.pipeline import retrieval_params, stage_prepare, stage_similarity  # noqa: E402
from exits.run_folder import RunFolder  # noqa: E402
from exits.stages.object_crops import ObjectCropDataset  # noqa: E402
from exits.stages.point_retrieval import retrieval_stats, retrieve_dataset_points  # noqa: E402
from retrieval_quality import patch_stats  # noqa: E402

# name -> overrides of the similarity section (over --config).
SETTINGS: dict[str, list[str]] = {
    "none": [],
    "simmim": ["similarity.warm_start.method=simmim"],
    "simmim_e60": ["similarity.warm_start.method=simmim", "similarity.warm_start.optim.epochs=60"],
    "simmim_r40": ["similarity.warm_start.method=simmim", "similarity.warm_start.mask_ratio=0.4"],
    "simmim_b1": ["similarity.warm_start.method=simmim", "similarity.warm_start.mask_block=1"],
    "simmim_mil16": ["similarity.warm_start.method=simmim", "similarity.optim.epochs=16"],
    "none_mil16": ["similarity.optim.epochs=16"],
}
METRICS = ("fg_precision", "fg_recall", "bg_precision", "sep_fg_precision", "sep_fg_recall")


def one_run(split: str, name: str, seed: int, args: argparse.Namespace) -> dict:
    data = ensure_split(split)
    workdir = args.runs / split / f"{name}_s{seed}"
    paths = RunFolder(workdir)
    cfg = load_config(args.config, [*SETTINGS[name], f"seed={seed}"])
    if not paths.instances.exists():
        stage_prepare(cfg, data / "instances.json", data / "images", workdir, progress=False)
    dataset = ObjectCropDataset(read_instances_table(paths.instances), data / "images", cfg.data.crop_size)
    t0 = time.perf_counter()
    stage_similarity(cfg, dataset, paths, "cpu", progress=False)
    seconds = time.perf_counter() - t0
    table = retrieve_dataset_points(load_mask_model(paths.similarity), dataset, retrieval_params(cfg),
                                    torch.device("cpu"), progress=False)
    stats = patch_stats(workdir, data / "instances.json", cfg.data.crop_size, points=table)
    a, s = stats["all"], stats["separated"]
    row = {"fg_precision": a["fg_precision"], "fg_recall": a["fg_recall"], "bg_precision": a["bg_precision"],
           "sep_fg_precision": s["fg_precision"], "sep_fg_recall": s["fg_recall"],
           "share_no_retrieval": round(retrieval_stats(table)["share_no_retrieval"], 4),
           "seconds_similarity": round(seconds, 1), "seed": seed}
    print(f"{split} {name} s{seed}: " + " ".join(f"{k} {row[k]}" for k in (*METRICS, "seconds_similarity")), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["none", "simmim"], choices=list(SETTINGS))
    ap.add_argument("--config", default="demo")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_warm_start")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "warm_start.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    results: dict = {"config": args.config, "seeds": args.seeds, "threads": torch.get_num_threads(), "splits": {}}
    for split in args.splits:
        res = results["splits"].setdefault(split, {})
        for name in args.settings:
            runs = [one_run(split, name, s, args) for s in args.seeds]
            res[name] = {"overrides": SETTINGS[name], "runs": runs, **{
                k: {"mean": round(statistics.fmean(r[k] for r in runs), 3),
                    "sd": round(statistics.stdev([r[k] for r in runs]), 3) if len(runs) > 1 else None}
                for k in (*METRICS, "seconds_similarity")}}
    write_json(args.out, results, indent=1)
    print("| split | warm start | FG precision | FG recall | BG precision | separated FG precision | separated FG recall | stage 1a s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for split, res in results["splits"].items():
        for name, v in res.items():
            cells = [f"{v[k]['mean']:.3f} ± {v[k]['sd'] or 0:.3f}" for k in METRICS]
            print(f"| {split} | {name} | " + " | ".join(cells) + f" | {v['seconds_similarity']['mean']:.0f} |")


if __name__ == "__main__":
    main()
