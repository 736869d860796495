"""Spot-fix click model: seconds per click, NoC/NoF vs GrabCut, and the decoder-part ablation.

Usage: python bench/bench_clicks.py [--workdir runs/bench_stage1/exits] [--gt data/demo/instances.json]
       [--iterations 300] [--objects 40] [--no-ablation] [--out bench/results/clicks.json]

Speed: the decoder alone (click maps built, features cached), one object, five clicks on
top of a previous mask; ``torch.set_num_threads(t)`` for t in (2, 1) (2 is the reference;
1 is recorded because on this shared 2-core machine a second intra-op thread often waits
for a core and small ops get several times slower); one warm-up, then median and minimum
over ``--repeats`` calls. At the demo crop (96) the trained model and a real object's
cached features; at 512 x 512 the same architecture on a 64 x 64 token grid (patch 8;
random weights and tokens: the cost does not depend on their values).

Quality: the click model trained with its default settings for ``--iterations`` on the
run's best-scoring pseudo masks (the top 60 %, GT never read for training); evaluated on
the ``--objects`` lowest-scoring objects (the spot-fix queue; none was trained on) with
the RITM robot user, 20 clicks, protocols "pseudo" (edit the pseudo mask) and "scratch";
GrabCut with the same robot and objects. Ablation: each decoder part switched off in turn,
retrained with the same budget and seed (progressive mode is inference-only: same model,
evaluated with it off). One more row trains on the GT masks of a separate json given
explicitly (``--gt-train-json``, default the demo's held-out val.json: other images than
the evaluated ones). Training runs on 1 thread (faster on this busy machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.interactive.config import ClickModelConfig  # noqa: E402
from exits.interactive.decoder import ClickDecoder  # noqa: E402
from exits.interactive.evaluate import run_eval_clicks  # noqa: E402
from exits.interactive.inference import decode_probs  # noqa: E402
from exits.interactive.model_io import load_click_model  # noqa: E402
from exits.interactive.predictor import ClickPredictor  # noqa: E402
from exits.interactive.train import train_click_model  # noqa: E402
from exits.io import write_json  # noqa: E402

PARTS = ("use_imsa", "use_spm", "use_prototypes", "use_zoom")


def time_calls(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def click_sequence(size: int) -> tuple[list, np.ndarray]:
    s = float(size)
    clicks = [(0.5 * s, 0.5 * s, True), (0.3 * s, 0.6 * s, False), (0.6 * s, 0.35 * s, True),
              (0.7 * s, 0.7 * s, False), (0.45 * s, 0.25 * s, True)]
    yy, xx = np.mgrid[:size, :size]
    prev = (yy - 0.5 * s) ** 2 + (xx - 0.5 * s) ** 2 <= (0.3 * s) ** 2
    return clicks, prev


def speed(workdir: Path, model_path: Path, repeats: int) -> list[dict]:
    decoder, _ = load_click_model(model_path)
    predictor = ClickPredictor.from_workdir(workdir, model_path=model_path)
    ann_id = next(iter(predictor.objects))
    feats = predictor.features(ann_id)
    rows = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for size in (feats.crop.shape[-1], 512):
            if size == feats.crop.shape[-1]:
                dec, tokens, grid, crop = decoder, feats.tokens[None], feats.grid, feats.crop[None]
            else:
                g = size // 8
                dec = ClickDecoder(decoder.config, decoder.embed_dim).eval()
                tokens, grid, crop = torch.randn(1, g * g, decoder.embed_dim), (g, g), torch.rand(1, 3, size, size)
            clicks, prev = click_sequence(size)
            for k in (1, 5):
                times = time_calls(lambda: decode_probs(dec, tokens, grid, crop, [clicks[:k]], [prev]), repeats)
                rows.append({"threads": threads, "crop": size, "clicks": k, "grid": list(grid),
                             "median_ms": round(1e3 * statistics.median(times), 2), "min_ms": round(1e3 * min(times), 2)})
                print(rows[-1], flush=True)
    torch.set_num_threads(1)
    return rows


def train_and_eval(workdir: Path, gt: Path, out_dir: Path, name: str, cfg: ClickModelConfig, objects: int,
                   progressive: bool | None = None, model_path: Path | None = None) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    summary = None
    if model_path is None:
        model_path, summary = train_click_model(workdir, cfg, out_path=out_dir / f"{name}.pt", progress=False)
    t1 = time.perf_counter()
    result = run_eval_clicks(workdir, gt, out_path=out_dir / f"{name}_eval.json", model_path=model_path,
                             num_objects=objects, progressive=progressive, with_grabcut=(name == "full"))
    row = {"name": name, "train_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1),
           "train": summary, "protocols": result["protocols"], "ann_ids": result["ann_ids"],
           "seconds_per_click": result["seconds_per_click"]}
    print(name, {p: {m: {k: round(v, 3) for k, v in x.items()} for m, x in v.items()}
                 for p, v in result["protocols"].items()}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_stage1" / "exits")
    ap.add_argument("--gt", type=Path, default=ROOT / "data" / "demo" / "instances.json")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--objects", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--gt-train-json", type=Path, default=ROOT / "data" / "demo" / "val.json",
                    help="also train on this COCO json's GT masks (given explicitly; '' to skip)")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "runs" / "bench_clicks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clicks.json")
    ap.add_argument("--speed-only", action="store_true",
                    help="only re-time clicks with MODELS_DIR/full.pt and update the speed rows of --out")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    if args.speed_only:
        import json

        result = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "clicks"}
        result["speed"] = speed(args.workdir, args.models_dir / "full.pt", args.repeats)
        result["speed_load_avg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        write_json(args.out, result, indent=2)
        print(f"wrote {args.out}")
        return
    cfg = ClickModelConfig(iterations=args.iterations)
    full = train_and_eval(args.workdir, args.gt, args.models_dir, "full", cfg, args.objects)
    rows = [full]
    if not args.no_ablation:
        rows.append(train_and_eval(args.workdir, args.gt, args.models_dir, "no_progressive", cfg, args.objects,
                                   progressive=False, model_path=args.models_dir / "full.pt"))
        for part in PARTS:
            rows.append(train_and_eval(args.workdir, args.gt, args.models_dir, f"no_{part[4:]}",
                                       cfg.replace(**{part: False}), args.objects))
    if str(args.gt_train_json) not in ("", "."):
        rows.append(train_and_eval(args.workdir, args.gt, args.models_dir, "train_on_explicit_gt_json",
                                   cfg.replace(train_source="coco", train_json=str(args.gt_train_json)), args.objects))
    speed_rows = speed(args.workdir, args.models_dir / "full.pt", args.repeats)
    result = {
        "benchmark": "clicks", "device": "cpu", "torch": torch.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "config": cfg.to_dict(), "workdir": str(args.workdir), "gt": str(args.gt), "objects": args.objects,
        "speed": speed_rows, "runs": rows,
    }
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
