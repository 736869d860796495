"""Stage-2 quality on the demo data: Mask R-CNN trained on GT vs EXITS pseudo vs box masks.

    python bench/bench_detector_ap.py [--pseudo runs/bench_stage1/exits/pseudo_labels.json]
        [--iterations 600] [--arch maskrcnn_mobilenet_v3_fpn] [--out bench/results/detector_ap.json]

The same detector (same config, seed and iterations) is trained three times on the 100
demo training images, each time with other masks for the same objects:

  (a) ``gt``     the GT masks (the upper bound; a benchmark reference only — the pipeline
                 itself never trains on GT masks in extreme-point mode),
  (b) ``exits``  the EXITS pseudo masks of a stage-1 run (bench/bench_stage1.py makes one),
  (c) ``box``    the extreme-point box filled as a mask.

Every variant trains with the extreme-point box as the object's box (``box_source:
annotation``), so only the masks differ. Each model is evaluated on the held-out 30
validation images (data/demo/val.json) with pycocotools: mask AP, box AP and mask AP on the
separated objects. The EXITS paper reports (b) as a fraction of (a); so does this script.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors import DetectorConfig, get_backend  # noqa: E402
from detectors.evaluation import evaluate  # noqa: E402
from exits.run_folder import RunFolder  # noqa: E402
from exits.baselines import box_mask_full  # noqa: E402
from exits.demo import generate_demo_dataset  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.stages.pseudo_labels import encode_rle  # noqa: E402

VARIANTS = ("gt", "exits", "box")


def training_json(variant: str, gt: dict, pseudo: dict | None) -> dict:
    """The demo training json with the masks of ``variant`` (same objects, same boxes)."""
    data = copy.deepcopy(gt)
    if variant == "gt":
        return data
    if variant == "exits":
        by_id = {a["id"]: a for a in pseudo["annotations"]}
        missing = [a["id"] for a in data["annotations"] if a["id"] not in by_id]
        if missing:
            raise ValueError(f"pseudo labels lack {len(missing)} training objects, e.g. {missing[:5]}")
        for ann in data["annotations"]:
            ann["segmentation"] = by_id[ann["id"]]["segmentation"]
        return data
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        ann["segmentation"] = encode_rle(box_mask_full(np.asarray(ann["extreme_points"]), h, w))
    return data


def extreme_point_boxes(data: dict) -> dict:
    """Set every annotation's bbox to the box of its extreme points (what the labeller gave)."""
    for ann in data["annotations"]:
        p = np.asarray(ann["extreme_points"], dtype=np.float64)
        x0, y0 = p[:, 0].min(), p[:, 1].min()
        ann["bbox"] = [float(x0), float(y0), float(p[:, 0].max() + 1 - x0), float(p[:, 1].max() + 1 - y0)]
    return data


def run_variant(variant: str, args: argparse.Namespace, cfg: DetectorConfig) -> dict:
    """Train on ``variant``'s masks, predict on the val images, evaluate; returns the numbers."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {variant} %(name)s %(message)s")  # spawned workers
    torch.set_num_threads(args.threads)
    gt = json.loads((args.data / "instances.json").read_text())
    pseudo = json.loads(args.pseudo.read_text()) if variant == "exits" else None
    val_json = args.data / "val.json"
    backend = get_backend(cfg.backend)
    out_dir = args.workdir / f"{variant}-seed{cfg.seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    train_json = out_dir / "train.json"
    write_json(train_json, extreme_point_boxes(training_json(variant, gt, pseudo)))
    t0 = time.perf_counter()
    ckpt = backend.train(train_json, args.data / "images", cfg, out_dir)
    train_s = time.perf_counter() - t0
    preds = backend.predict(ckpt, args.data / "images", val_json, cfg)
    metrics = evaluate(preds, val_json)
    write_json(out_dir / "metrics.json", metrics)
    row = {
        "mask_ap": round(100 * metrics["coco"]["segm"]["AP"], 2),
        "mask_ap50": round(100 * metrics["coco"]["segm"]["AP50"], 2),
        "mask_ap75": round(100 * metrics["coco"]["segm"]["AP75"], 2),
        "box_ap": round(100 * metrics["coco"]["bbox"]["AP"], 2),
        "separated_mask_ap": round(100 * metrics["separated"]["segm"]["AP"], 2),
        "train_seconds": round(train_s, 1),
        "seconds_per_iter": round(train_s / cfg.iterations, 3),
    }
    logging.info("%s: %s", variant, row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--pseudo", type=Path, default=RunFolder(ROOT / "runs" / "bench_stage1" / "exits").pseudo_json)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_detector_ap")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "detector_ap.json")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                    help="run config whose `detector:` section is used (flags below override)")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: the config's)")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained in parallel processes")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.data / "instances.json").exists():
        generate_demo_dataset(args.data)
    if "exits" in args.variants and not args.pseudo.exists():
        raise SystemExit(f"{args.pseudo} missing: run bench/bench_stage1.py first (it writes the EXITS pseudo labels)")

    from exits.config import load_config

    cfg = load_config(str(args.config)).detector
    overrides = {k: v for k, v in (("iterations", args.iterations), ("arch", args.arch), ("seed", args.seed))
                 if v is not None}
    cfg = cfg.replace(device="cpu", **overrides)
    val = json.loads((args.data / "val.json").read_text())
    results: dict = {"benchmark": "detector_ap", "device": "cpu", "threads_per_process": args.threads,
                     "parallel_processes": args.jobs, "config": cfg.to_dict(),
                     "train_objects": len(json.loads((args.data / "instances.json").read_text())["annotations"]),
                     "val_images": len(val["images"]), "val_objects": len(val["annotations"]), "variants": {}}
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(run_variant, args.variants, [args] * len(args.variants), [cfg] * len(args.variants)))
    else:
        rows = [run_variant(v, args, cfg) for v in args.variants]
    v = results["variants"] = dict(zip(args.variants, rows))
    if "gt" in v and v["gt"]["mask_ap"] > 0:
        for name in ("exits", "box"):
            if name in v:
                v[name]["fraction_of_gt"] = round(v[name]["mask_ap"] / v["gt"]["mask_ap"], 3)
    write_json(args.out, results, indent=2)
    print(json.dumps(results["variants"], indent=2))


if __name__ == "__main__":
    main()
