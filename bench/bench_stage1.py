"""Stage-1 quality and speed: box vs GrabCut vs dense CRF vs EXITS (3 seeds), on two splits.

    python bench/bench_stage1.py [--splits demo holdout] [--seeds 0 1 2] [--out bench/results/stage1.json]

Splits (generated if missing; their recipes are fixed, see SPLITS):
  demo     data/demo:    `exits demo-data` (seed 0, the demo photographs): the split the
                         configs were tuned on.
  holdout  data/holdout: `exits demo-data --variant holdout --seed 1`: other photographs
                         for objects, backgrounds and occluders; never tuned on.
Per split: (a) the extreme-point box, (b) GrabCut (box init, extreme points sure FG),
(c) a dense CRF (pydensecrf) over a box prior, extreme points sure FG
(``exits.baselines.dense_crf_box_mask``), (d) full EXITS with ``--config`` from random init
for every seed in ``--seeds`` (mean and sample sd), optionally (e) the box-supervised
generator (MIL + CRF, ``--with-mil-crf``). Also per EXITS run: the share of objects with no
retrieved point (they train on MIL alone) and stage timings.

Runs live in ``--runs/<split>/<variant>_s<seed>``; with ``--reuse`` finished runs
(run_summary.json) are read back, so several bench processes can fill in runs in parallel
(``--splits``/``--seeds`` subsets) and a last ``--reuse`` call writes the table.
``--refresh-pseudo`` keeps finished runs' trained models and recomputes stages 1b/1d and the
report (for a change in retrieval or pseudo-mask settings; the timings of the training run
are kept in run_summary_first.json).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exits.run_folder import RunFolder  # noqa: E402
from exits.baselines import DENSE_PEER_PARAMS, PEERS, peer_masks, peer_objects_of_table  # noqa: E402
from exits.config import load_config  # noqa: E402
from exits.data.instances_table import read_instances_table  # noqa: E402
from exits.demo import generate_demo_dataset  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.pipeline import run_pipeline  # noqa: E402
from exits.stages.point_retrieval import read_points, retrieval_stats  # noqa: E402
from exits.stages.prepare import prepare_instances  # noqa: E402
from exits.stages.report import evaluate_masks  # noqa: E402
from retrieval_quality import patch_stats  # noqa: E402

# Split name -> (data folder under data/, generator arguments). Fixed before any tuning.
SPLITS: dict[str, tuple[str, dict]] = {
    "demo": ("demo", {"seed": 0, "variant": "demo"}),
    "holdout": ("holdout", {"seed": 1, "variant": "holdout"}),
}


def baseline_masks(workdir: Path, images: Path, kind: str) -> tuple[dict[int, dict], float]:
    """Peer ``kind``'s mask of every object of the run's instances table
    (``exits.baselines.peer_masks``) and the wall time per object (image reads included)."""
    table = read_instances_table(RunFolder(workdir).instances)
    objects = peer_objects_of_table(table)
    t0 = time.perf_counter()
    masks, _ = peer_masks(objects, images, [kind])
    return masks[kind], (time.perf_counter() - t0) / max(1, len(objects))


def summarize(summary: dict) -> dict:
    return {"miou_all": round(100 * summary["all"]["miou"], 2), "miou_separated": round(100 * summary["separated"]["miou"], 2),
            "miou_non_separated": round(100 * summary["non_separated"]["miou"], 2),
            "objects": summary["all"]["count"], "separated_objects": summary["separated"]["count"]}


def mean_sd(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None,
            "n": len(values), "values": values}


def ensure_split(split: str) -> Path:
    folder, kwargs = SPLITS[split]
    data = ROOT / "data" / folder
    if not (data / "instances.json").exists():
        generate_demo_dataset(data, **kwargs)
    return data


def trained_run(name: str, extra: list[str], seed: int, data: Path, runs: Path, args: argparse.Namespace) -> dict:
    workdir = runs / f"{name}_s{seed}"
    done = RunFolder(workdir).run_summary
    first = workdir / "run_summary_first.json"  # timings of the run that trained the models
    if args.refresh_pseudo and done.exists():
        # Trained stages resume from their finished checkpoints (no training); retrieval,
        # pseudo masks and the report are recomputed with the current code and config.
        if not first.exists():
            first.write_text(done.read_text())
        cfg = load_config(args.config, [*args.set, *extra, f"seed={seed}"])
        res = run_pipeline(data / "images", data / "instances.json", workdir, cfg, progress=False)
        trained = json.loads(first.read_text())["seconds"]
        res["seconds"] = {**trained, "retrieval": res["seconds"].get("retrieval", 0.0),
                          "pseudo_labels": res["seconds"]["pseudo_labels"]}
        total = sum(res["seconds"].values())
    elif args.reuse and done.exists():
        res = json.loads(done.read_text())
        if first.exists():
            trained = json.loads(first.read_text())["seconds"]
            res["seconds"] = {**trained, "retrieval": res["seconds"].get("retrieval", 0.0),
                              "pseudo_labels": res["seconds"]["pseudo_labels"]}
        total = sum(res["seconds"].values())
    elif args.collect_only:
        return {}
    else:
        cfg = load_config(args.config, [*args.set, *extra, f"seed={seed}"])
        t0 = time.perf_counter()
        res = run_pipeline(data / "images", data / "instances.json", workdir, cfg, progress=False)
        total = time.perf_counter() - t0
    summary = json.loads((RunFolder(workdir).report_dir / "summary.json").read_text())
    out = {**summarize(summary), "seed": seed, "seconds_total": round(total, 1), "seconds": res["seconds"]}
    if RunFolder(workdir).points.exists():
        out["retrieval"] = {k: round(v, 4) for k, v in retrieval_stats(read_points(RunFolder(workdir).points)).items()}
        # evaluation side: the retrieved patches against GT (bench/retrieval_quality.py)
        q = patch_stats(workdir, data / "instances.json", load_config(args.config, args.set).data.crop_size)
        out["retrieval_quality"] = {f"{part}_{k}": q[part][k] for part in ("all", "separated")
                                    for k in ("fg_precision", "fg_recall", "bg_precision")}
    return out


def bench_split(split: str, args: argparse.Namespace) -> dict:
    data = ensure_split(split)
    images, ann = data / "images", data / "instances.json"
    runs = args.runs / split
    result: dict = {"data": str(data.relative_to(ROOT)), "recipe": SPLITS[split][1], "variants": {}}
    variants = {"exits": []}
    if args.with_mil_crf:
        variants["mil_crf"] = ["generator.use_retrieval=false"]
    variants.update(args.variant)
    for name, extra in variants.items():
        per_seed = [r for r in (trained_run(name, extra, s, data, runs, args) for s in args.seeds) if r]
        if not per_seed:
            continue
        agg = {k: mean_sd([r[k] for r in per_seed]) for k in ("miou_all", "miou_separated", "miou_non_separated", "seconds_total")}
        if all("retrieval" in r for r in per_seed):
            agg["share_no_retrieval"] = mean_sd([r["retrieval"]["share_no_retrieval"] for r in per_seed])
        if all("retrieval_quality" in r for r in per_seed):
            agg["retrieval_quality"] = {k: mean_sd([round(100 * r["retrieval_quality"][k], 2) for r in per_seed])
                                        for k in per_seed[0]["retrieval_quality"]}
        result["variants"][name] = {**agg, "objects": per_seed[0]["objects"], "separated_objects": per_seed[0]["separated_objects"],
                                    "runs": per_seed}

    workdir = runs / "baselines"
    d = load_config(args.config, args.set).data
    prepare_instances(ann, images, workdir, crop_margin=d.crop_margin, crop_min_margin_px=d.crop_min_margin_px,
                      crop_size=d.crop_size, derive_missing_points=d.derive_missing_points,
                      point_tolerance_px=d.point_tolerance_px, check_images=d.check_images, progress=False)
    for kind in PEERS:
        masks, per_obj = baseline_masks(workdir, images, kind)
        summary, _ = evaluate_masks(masks, ann)
        result["variants"][kind] = {**summarize(summary), "ms_per_object": round(1000 * per_obj, 2)}
    result["variants"]["densecrf"]["params"] = DENSE_PEER_PARAMS
    return result


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or name in (*PEERS, "exits", "mil_crf") or "=" not in overrides:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=key=value[,key=value], NAME not a peer")
    return name, overrides.split(",")


def print_table(results: dict) -> None:
    print("| split | method | mIoU all | mIoU separated | mIoU non-separated |\n|---|---|---:|---:|---:|")
    for split, res in results["splits"].items():
        for k in (*PEERS, "mil_crf", "exits", *[n for n in res["variants"] if n not in (*PEERS, "mil_crf", "exits")]):
            v = res["variants"].get(k)
            if v is None:
                continue
            if isinstance(v["miou_all"], dict):
                cells = [f"{v[m]['mean']:.1f} ± {v[m]['sd'] or 0:.1f}" for m in ("miou_all", "miou_separated", "miou_non_separated")]
                name = f"{k} ({v['miou_all']['n']} seeds)"
            else:
                cells = [f"{v[m]:.1f}" for m in ("miou_all", "miou_separated", "miou_non_separated")]
                name = k
            print(f"| {split} | {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_stage1")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stage1.json")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", action="append", default=[], help="config override for the trained variants")
    ap.add_argument("--variant", action="append", default=[], type=_variant, metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="one more trained variant: its name and config overrides (over --set), e.g. "
                         "walk10=retrieval.alpha=10")
    ap.add_argument("--with-mil-crf", action="store_true", help="also train the box-supervised generator")
    ap.add_argument("--reuse", action="store_true", help="take finished runs (run_summary.json) as they are")
    ap.add_argument("--collect-only", action="store_true", help="with --reuse: skip runs that are not finished")
    ap.add_argument("--refresh-pseudo", action="store_true",
                    help="finished runs: keep the trained models, recompute retrieval, pseudo masks and report")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    results = {"config": args.config, "overrides": args.set, "threads": torch.get_num_threads(), "seeds": args.seeds,
               "splits": {split: bench_split(split, args) for split in args.splits}}
    write_json(args.out, results, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
