"""Stage-2 quality on the demo data: Mask R-CNN trained on GT vs pseudo vs reviewed vs box masks.

    python bench/bench_detector_ap.py [--run runs/demo] [--seeds 0 1 2] [--iterations 200]
        [--backends torchvision detectron2] [--jobs 2 --threads 1] [--device cpu]
        [--review-fraction 0.1] [--set detector.KEY=VALUE ...] [--out bench/results/detector_ap_3seed.json]

The same detector (same config and iterations; seeds ``--seeds``) is trained on the 100 demo
training images with four sets of masks for the same objects:

  (a) ``gt``        the GT masks (the upper bound; a benchmark reference only: the pipeline
                    itself never trains on GT masks in extreme-point mode),
  (b) ``exits``     the EXITS pseudo masks of the stage-1 run ``--run`` (``make demo`` makes
                    runs/demo),
  (c) ``reviewed``  (b) after a simulated spot-fix review: the robot user of ``exits
                    eval-clicks`` edits the K lowest-scoring objects (the spot-fix queue's
                    first K; K = ``--review-fraction`` of the objects, 10 %) with the editor
                    ``exits spotfix`` would use (``auto``: GrabCut without a click model), up to
                    ``--review-max-clicks`` clicks or until IoU >= ``--review-stop-iou``
                    (exits.interactive.simulated_review; the mIoU of the K before/after is
                    recorded),
  (d) ``box``       the extreme-point box filled as a mask.

Every variant trains with the extreme-point box as the object's box (``box_source:
annotation``), so only the masks differ. Each model is evaluated on the 30 held-out
validation images (data/demo/val.json) with pycocotools: mask AP, AP50, AP75, box AP and mask
AP on the separated objects. Per backend and variant: mean and sample sd over the seeds, and
the % of the GT-trained mask AP (per seed, (x / gt) * 100 with the same seed, then mean and
sd; only seeds whose GT model reaches ``--min-gt-ap`` points, 1.0: below that the ratio is
noise over a near-zero denominator). ``--iterations`` other than the config's scales its
warm-up and lr steps by the same factor. Backends that are not installed are skipped with
the reason printed and recorded. Finished runs are reused: each lives in
WORKDIR/<backend>/<variant>-seed<S>-<hash of its config and training json> with its
row.json, so runs can be spread over several invocations (``--variants``/``--seeds``
subsets) and ``--only-finished`` writes the table of what is done without training.
bench/gpu_stage2.sh runs this on a GPU with a GPU-length schedule.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import statistics
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
from exits.baselines import box_mask_full  # noqa: E402
from exits.demo import generate_demo_dataset  # noqa: E402
from exits.eval.ground_truth import load_gt_masks  # noqa: E402
from exits.eval.rle import decode_rle  # noqa: E402
from exits.interactive.metrics import mask_iou  # noqa: E402
from exits.io import file_digest, write_json  # noqa: E402
from exits.run_folder import RunFolder  # noqa: E402
from exits.stages.pseudo_labels import encode_rle  # noqa: E402

VARIANTS = ("gt", "exits", "reviewed", "box")
BACKENDS = ("torchvision", "detectron2")
DEFAULT_RUNS = (ROOT / "runs" / "demo", ROOT / "runs" / "bench_stage1" / "demo" / "exits_s0")
METRICS = ("mask_ap", "mask_ap50", "mask_ap75", "box_ap", "separated_mask_ap")
LABELS = {"gt": "(a) GT masks (reference only)", "exits": "(b) EXITS pseudo masks",
          "reviewed": "(c) pseudo masks after simulated review", "box": "(d) extreme-point box masks"}
log = logging.getLogger("bench_detector_ap")


def training_json(variant: str, gt: dict, pseudo: dict | None, reviewed: dict[int, np.ndarray] | None = None) -> dict:
    """The demo training json with the masks of ``variant`` (same objects, same boxes).

    ``reviewed``: the edited (H, W) bool masks by ann id, replacing the pseudo masks of
    ``exits`` for variant ``reviewed``."""
    data = json.loads(json.dumps(gt))
    if variant == "gt":
        return data
    if variant in ("exits", "reviewed"):
        by_id = {a["id"]: a for a in pseudo["annotations"]}
        missing = [a["id"] for a in data["annotations"] if a["id"] not in by_id]
        if missing:
            raise ValueError(f"pseudo labels lack {len(missing)} training objects, e.g. {missing[:5]}")
        for ann in data["annotations"]:
            edited = (reviewed or {}).get(ann["id"]) if variant == "reviewed" else None
            ann["segmentation"] = encode_rle(edited) if edited is not None else by_id[ann["id"]]["segmentation"]
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


def masks_miou(train_json: Path, gt_json: Path) -> float:
    """Mean IoU (%) of the training json's masks against the GT masks of the same objects."""
    data = json.loads(train_json.read_text())
    gt = load_gt_masks(gt_json)
    ious = [mask_iou(decode_rle(a["segmentation"]), decode_rle(gt[a["id"]].rle)) for a in data["annotations"]]
    return round(100 * float(np.mean(ious)), 2)


def scaled_schedule(cfg: DetectorConfig, iterations: int) -> DetectorConfig:
    """``cfg`` with ``iterations``; warm-up and lr steps scaled by iterations / cfg.iterations."""
    f = iterations / cfg.iterations
    steps = tuple(sorted({max(1, round(s * f)) for s in cfg.lr_steps if round(s * f) < iterations}))
    return cfg.replace(iterations=iterations, warmup_iters=round(cfg.warmup_iters * f), lr_steps=steps)


def run_one(task: tuple[str, str, int], args: argparse.Namespace, cfg: DetectorConfig, train_json: Path) -> dict | None:
    """Train ``backend`` on ``variant``'s masks with ``seed``, predict on val, evaluate
    (None: not trained yet and ``--only-finished``)."""
    backend_name, variant, seed = task
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {variant}/s{seed} %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = cfg.replace(backend=backend_name, seed=seed)
    key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode() + file_digest(train_json).encode()).hexdigest()[:10]
    out_dir = args.workdir / backend_name / f"{variant}-seed{seed}-{key}"
    if (out_dir / "row.json").is_file() and not args.fresh:
        row = json.loads((out_dir / "row.json").read_text())
        log.info("%s/%s seed %d: reused %s", backend_name, variant, seed, out_dir)
        return row
    if args.only_finished:
        log.info("%s/%s seed %d: not trained yet (left out: --only-finished)", backend_name, variant, seed)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = get_backend(backend_name)
    val_json = args.data / "val.json"
    t0 = time.perf_counter()
    ckpt = backend.train(train_json, args.data / "images", cfg, out_dir)
    train_s = time.perf_counter() - t0
    preds = backend.predict(ckpt, args.data / "images", val_json, cfg)
    metrics = evaluate(preds, val_json)
    write_json(out_dir / "metrics.json", metrics)
    coco, sep = metrics["coco"], metrics["separated"]
    row = {"mask_ap": round(100 * coco["segm"]["AP"], 2), "mask_ap50": round(100 * coco["segm"]["AP50"], 2),
           "mask_ap75": round(100 * coco["segm"]["AP75"], 2), "box_ap": round(100 * coco["bbox"]["AP"], 2),
           "separated_mask_ap": round(100 * sep["segm"]["AP"], 2),
           "train_seconds": round(train_s, 1), "seconds_per_iter": round(train_s / cfg.iterations, 3),
           "out_dir": _rel(out_dir)}
    write_json(out_dir / "row.json", row, indent=2)
    log.info("%s/%s seed %d: %s", backend_name, variant, seed, row)
    return row


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def mean_sd(values: list[float]) -> dict:
    """{"mean", "sd" (sample sd, n - 1; None for one value), "per_seed"}."""
    return {"mean": round(statistics.fmean(values), 2),
            "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None, "per_seed": values}


def summarize(runs: dict[str, dict[int, dict]], min_gt_ap: float = 1.0) -> dict:
    """Per variant (over the seeds it has runs for, listed in ``seeds``): mean ± sd of each
    metric and of pct_of_gt = 100 * mask_ap / gt mask_ap of the same seed (seeds without a
    GT run, or whose GT model's mask AP is below ``min_gt_ap`` points, where the ratio is noise
    over a near-zero denominator, are left out of the ratio: ``ratio_seeds``)."""
    out: dict = {}
    gt = runs.get("gt", {})
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        if not seeds:
            continue
        s = {"seeds": seeds, **{m: mean_sd([by_seed[x][m] for x in seeds]) for m in METRICS}}
        ratio_seeds = [x for x in seeds if x in gt and gt[x]["mask_ap"] >= max(min_gt_ap, 1e-9)]
        s["ratio_seeds"] = ratio_seeds
        if ratio_seeds:
            s["pct_of_gt"] = mean_sd([round(100 * by_seed[x]["mask_ap"] / gt[x]["mask_ap"], 1) for x in ratio_seeds])
        out[variant] = s
    return out


def markdown(summary: dict, miou: dict) -> str:
    fmt = lambda d: f"{d['mean']:.2f}" + (f" ± {d['sd']:.2f}" if d["sd"] is not None else "")  # noqa: E731
    lines = ["| training masks | seeds | training-mask mIoU | mask AP | AP50 | AP75 | box AP | separated mask AP "
             "| % of GT mask AP |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, s in summary.items():
        pct = s.get("pct_of_gt")
        pct_s = "100" if v == "gt" else (f"{pct['mean']:.0f} ± {pct['sd']:.0f}" if pct and pct["sd"] is not None
                                         else (f"{pct['mean']:.0f}" if pct else "n/a"))
        lines.append(f"| {LABELS[v]} | {','.join(map(str, s['seeds']))} | {miou.get(v, float('nan')):.1f} | " + " | ".join(fmt(s[m]) for m in METRICS)
                     + f" | {pct_s} |")
    return "\n".join(lines)


def installed_backends(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(usable backends, {skipped backend: reason})."""
    usable, skipped = [], {}
    for name in names:
        try:
            get_backend(name)
            usable.append(name)
        except (ImportError, KeyError) as exc:
            skipped[name] = str(exc).splitlines()[0]
            print(f"skipping backend {name}: {skipped[name]}", flush=True)
    return usable, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--run", type=Path, default=None,
                    help="stage-1 run folder on --data (default: runs/demo from `make demo`, else bench_stage1's "
                         "demo seed-0 run runs/bench_stage1/demo/exits_s0)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_detector_ap")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "detector_ap_3seed.json")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                    help="backends to train; those not installed are skipped with the reason")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                    help="run config whose `detector:` section is used (flags below override)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="override a config value, e.g. --set detector.arch=maskrcnn_resnet50_fpn (repeatable)")
    ap.add_argument("--iterations", type=int, default=None, help="(warm-up and lr steps scale with it)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    ap.add_argument("--review-fraction", type=float, default=0.1, help="K = round(fraction * training objects)")
    ap.add_argument("--review-max-clicks", type=int, default=10)
    ap.add_argument("--review-stop-iou", type=float, default=0.9)
    ap.add_argument("--editor", default="auto", choices=("auto", "grabcut", "clicks"))
    ap.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that have a row.json")
    ap.add_argument("--min-gt-ap", type=float, default=1.0,
                    help="%% of GT only for seeds whose GT model reaches this mask AP (points)")
    ap.add_argument("--only-finished", action="store_true",
                    help="train nothing: summarize the runs already finished (each variant over the seeds it has)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.data / "instances.json").exists():
        generate_demo_dataset(args.data)
    if args.run is None:
        found = [r for r in DEFAULT_RUNS if RunFolder(r).pseudo_json.is_file()]
        args.run = found[0] if found else DEFAULT_RUNS[0]
    pseudo_json = RunFolder(args.run).pseudo_json
    if {"exits", "reviewed"} & set(args.variants) and not pseudo_json.is_file():
        raise SystemExit(f"{pseudo_json} missing: run stage 1 on {args.data} first (`make demo`, or "
                         f"`exits run -i {args.data}/images -a {args.data}/instances.json -w {args.run} -c demo`)")
    backends, skipped = installed_backends(args.backends)
    if not backends:
        raise SystemExit(f"none of the backends {args.backends} is installed")

    from exits.config import load_config

    cfg = load_config(str(args.config), args.overrides).detector
    if args.iterations is not None:
        cfg = scaled_schedule(cfg, args.iterations)
    cfg = cfg.replace(device=args.device)
    instances = args.data / "instances.json"
    gt = json.loads(instances.read_text())
    val = json.loads((args.data / "val.json").read_text())
    pseudo = json.loads(pseudo_json.read_text()) if pseudo_json.is_file() else None
    results: dict = {"benchmark": "detector_ap", "device": args.device, "torch": torch.__version__,
                     "threads_per_process": args.threads, "parallel_processes": args.jobs, "seeds": args.seeds,
                     "config": cfg.to_dict(), "run": _rel(args.run), "train_objects": len(gt["annotations"]),
                     "val_images": len(val["images"]), "val_objects": len(val["annotations"]),
                     "min_gt_ap_for_ratio": args.min_gt_ap, "skipped_backends": skipped, "backends": {}}
    reviewed = None
    if "reviewed" in args.variants:
        from exits.interactive.simulated_review import review_worst

        k = round(args.review_fraction * len(gt["annotations"]))
        t0 = time.perf_counter()
        review = review_worst(args.run, instances, k, editor=args.editor, images=args.data / "images",
                              max_clicks=args.review_max_clicks, stop_iou=args.review_stop_iou, log=print)
        reviewed = review.masks
        results["review"] = {"fraction": args.review_fraction, **review.settings, **review.summary(),
                             "seconds": round(time.perf_counter() - t0, 1),
                             "objects": [vars(o) for o in review.objects]}
        print("review:", {k_: v for k_, v in results["review"].items() if k_ != "objects"}, flush=True)
    train_dir = args.workdir / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    train_jsons, miou = {}, {}
    for variant in args.variants:
        train_jsons[variant] = train_dir / f"{variant}.json"
        write_json(train_jsons[variant], extreme_point_boxes(training_json(variant, gt, pseudo, reviewed)))
        miou[variant] = masks_miou(train_jsons[variant], instances)
    results["training_masks_miou"] = miou

    tasks = [(b, v, s) for s in args.seeds for b in backends for v in args.variants]
    jsons = [train_jsons[v] for _, v, _ in tasks]
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(run_one, tasks, [args] * len(tasks), [cfg] * len(tasks), jsons))
    else:
        rows = [run_one(t, args, cfg, j) for t, j in zip(tasks, jsons)]
    for backend in backends:
        runs = {v: {s: row for (b, v_, s), row in zip(tasks, rows) if b == backend and v_ == v and row is not None}
                for v in args.variants}
        model = cfg.arch if backend == "torchvision" else (cfg.detectron2_config or "Mask R-CNN R50-FPN (built in)")
        summary = summarize(runs, args.min_gt_ap)
        results["backends"][backend] = {"model": model, "summary": summary,
                                        "runs": {v: {str(s): r for s, r in by.items()} for v, by in runs.items()}}
        print(f"\n{backend} ({model}, {cfg.iterations} iterations, seeds {args.seeds}):\n{markdown(summary, miou)}")
    write_json(args.out, results, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
