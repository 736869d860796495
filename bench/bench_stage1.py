"""Stage-1 quality and speed on the demo data: box vs GrabCut vs MIL+CRF vs full EXITS.

    python bench/bench_stage1.py [--data data/demo] [--out bench/results/stage1.json]

Generates the demo data if missing, runs (c) the box-supervised generator (MIL + CRF, no
point retrieval) and (d) full EXITS with configs/demo.yaml from random init, evaluates
(a) the extreme-point box and (b) GrabCut (box init, extreme points as sure FG) on the
same objects, and writes mIoU over all / separated objects plus stage timings.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.baselines import box_mask_full, grabcut_mask  # noqa: E402
from exits.config import load_config  # noqa: E402
from exits.data.instances_table import read_instances_table, table_windows  # noqa: E402
from exits.demo import generate_demo_dataset  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.pipeline import run_pipeline  # noqa: E402
from exits.stages.prepare import prepare_instances  # noqa: E402
from exits.stages.pseudo_labels import encode_rle  # noqa: E402
from exits.stages.report import evaluate_masks  # noqa: E402


def baseline_masks(workdir: Path, images: Path, kind: str) -> tuple[dict[int, dict], float]:
    table = read_instances_table(workdir / "instances.parquet")
    cols = table.to_pydict()
    windows = table_windows(table, 96)
    out, cache = {}, {}
    t0 = time.perf_counter()
    for i, ann_id in enumerate(cols["ann_id"]):
        pts = np.asarray(cols["extreme_points"][i]).reshape(4, 2)
        h, w = cols["height"][i], cols["width"][i]
        if kind == "box":
            m = box_mask_full(pts, h, w)
        else:
            name = cols["file_name"][i]
            if name not in cache:
                cache = {name: np.array(Image.open(images / name).convert("RGB"))}
            m = grabcut_mask(cache[name], pts, windows[i])
        out[ann_id] = encode_rle(m)
    return out, (time.perf_counter() - t0) / max(1, len(out))


def summarize(summary: dict) -> dict:
    return {"miou_all": round(100 * summary["all"]["miou"], 2), "miou_separated": round(100 * summary["separated"]["miou"], 2),
            "miou_non_separated": round(100 * summary["non_separated"]["miou"], 2),
            "objects": summary["all"]["count"], "separated_objects": summary["separated"]["count"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_stage1")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stage1.json")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", action="append", default=[], help="config override for both trained variants")
    ap.add_argument("--skip", action="append", default=[], help="variants to skip: mil_crf, exits")
    ap.add_argument("--reuse", action="store_true", help="take finished variant runs (run_summary.json) as they are")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    if not (args.data / "instances.json").exists():
        generate_demo_dataset(args.data)
    images, ann = args.data / "images", args.data / "instances.json"
    results: dict = {"config": args.config, "overrides": args.set, "threads": torch.get_num_threads(), "variants": {}}

    variants = {"exits": [], "mil_crf": ["generator.use_retrieval=false"]}
    for name, extra in variants.items():
        if name in args.skip:
            continue
        done = args.runs / name / "run_summary.json"
        if args.reuse and done.exists():
            res = json.loads(done.read_text())
            total = sum(res["seconds"].values())
        else:
            cfg = load_config(args.config, [*args.set, *extra])
            t0 = time.perf_counter()
            res = run_pipeline(images, ann, args.runs / name, cfg, progress=False)
            total = time.perf_counter() - t0
        summary = json.loads((args.runs / name / "report" / "summary.json").read_text())
        results["variants"][name] = {**summarize(summary), "seconds_total": round(total, 1), "seconds": res["seconds"]}

    workdir = args.runs / "baselines"
    d = load_config(args.config, args.set).data
    prepare_instances(ann, images, workdir, crop_margin=d.crop_margin, crop_min_margin_px=d.crop_min_margin_px,
                      crop_size=d.crop_size, derive_missing_points=d.derive_missing_points,
                      point_tolerance_px=d.point_tolerance_px, check_images=d.check_images, progress=False)
    for kind in ("box", "grabcut"):
        masks, per_obj = baseline_masks(workdir, images, kind)
        summary, _ = evaluate_masks(masks, ann)
        results["variants"][kind] = {**summarize(summary), "ms_per_object": round(1000 * per_obj, 2)}
    write_json(args.out, results, indent=1)
    order = ["box", "grabcut", "mil_crf", "exits"]
    print("| method | mIoU all | mIoU separated | mIoU non-separated |\n|---|---:|---:|---:|")
    for k in order:
        if k in results["variants"]:
            v = results["variants"][k]
            print(f"| {k} | {v['miou_all']:.1f} | {v['miou_separated']:.1f} | {v['miou_non_separated']:.1f} |")


if __name__ == "__main__":
    main()
