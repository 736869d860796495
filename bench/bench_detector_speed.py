"""Stage-2 training speed on CPU: seconds per iteration of the Detectron2 and torchvision backends.

    PYTHONPATH=/path/to/detectron2-source python bench/bench_detector_speed.py [--iterations 20] [--warmup 3]

Same settings for both: Mask R-CNN R50-FPN from random init on data/demo (GT train json),
batch 2, min_size 192, max_size 256, the demo config's RoI batch per image, SGD, hflip +
scale jitter, torch threads 2, AMP off. A third row times the torchvision backend with the
demo config's own `detector:` settings (MobileNetV3-FPN, the stage-2 AP benchmark's model). Each backend trains ``warmup + iterations`` steps
through its public ``train``; the per-iteration wall times of its ``train_log.json`` (data
loading included) after the warm-up steps are summarised. The Detectron2 row records why it
was skipped when Detectron2 cannot be imported. Writes bench/results/detector_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors import DetectorConfig, get_backend  # noqa: E402
from exits.io import write_json  # noqa: E402

DEMO = ROOT / "data" / "demo"
OUT = ROOT / "bench" / "results" / "detector_speed.json"


def demo_roi_batch() -> int:
    """The demo config's RoI batch per image (128 when the config does not set it)."""
    with open(ROOT / "configs" / "demo.yaml", "r", encoding="utf-8") as fh:
        detector = (yaml.safe_load(fh) or {}).get("detector") or {}
    return int(detector.get("roi_batch_size_per_image", 128))


def measure(backend_name: str, cfg: DetectorConfig, warmup: int) -> dict[str, Any]:
    try:
        backend = get_backend(backend_name)
    except ImportError as exc:
        return {"backend": backend_name, "skipped": str(exc)}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        backend.train(DEMO / "instances.json", DEMO / "images", cfg, tmp)
        wall = time.perf_counter() - t0
        with open(Path(tmp) / "train_log.json", "r", encoding="utf-8") as fh:
            history = json.load(fh)["history"]
    steps = [r["seconds"] for r in history if r["iteration"] >= warmup]
    return {
        "backend": backend_name,
        "arch": cfg.arch if backend_name == "torchvision" else "detectron2 built-in mask_rcnn_R_50_FPN",
        "min_size": cfg.min_size, "max_size": cfg.max_size, "batch_size": cfg.batch_size,
        "roi_batch_size_per_image": cfg.roi_batch_size_per_image,
        "iterations_timed": len(steps),
        "seconds_per_iter_mean": statistics.fmean(steps),
        "seconds_per_iter_median": statistics.median(steps),
        "seconds_warmup_iters": [r["seconds"] for r in history if r["iteration"] < warmup],
        "wall_seconds_total": wall,
        "final_loss": history[-1]["loss"],
        # Other processes on the machine slow both rows alike; compare rows of one run.
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations after the warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first iterations")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DetectorConfig(
        arch="maskrcnn_resnet50_fpn", min_size=192, max_size=256, batch_size=2,
        iterations=args.warmup + args.iterations, warmup_iters=args.warmup,
        roi_batch_size_per_image=demo_roi_batch(), device="cpu", amp=False, seed=0,
    )
    rows = [measure(name, cfg.replace(backend=name), args.warmup) for name in ("detectron2", "torchvision")]
    from exits.config import load_config

    demo = load_config("demo").detector.replace(device="cpu", amp=False, iterations=args.warmup + args.iterations,
                                                warmup_iters=args.warmup, lr_steps=())
    rows.append({**measure("torchvision", demo, args.warmup), "setting": "configs/demo.yaml detector section"})
    for r in rows:
        if "skipped" in r:
            print(f"{r['backend']:12s} skipped: {r['skipped'][:120]}")
        else:
            print(f"{r['backend']:12s} {r['seconds_per_iter_mean']:.3f} s/iter (median {r['seconds_per_iter_median']:.3f})")
    write_json(OUT, {
        "settings": {"data": "data/demo/instances.json", "batch_size": 2, "min_size": 192, "max_size": 256,
                     "roi_batch_size_per_image": cfg.roi_batch_size_per_image, "model": "Mask R-CNN R50-FPN, random init",
                     "optimizer": cfg.optimizer, "hflip": cfg.hflip, "scale_jitter": list(cfg.scale_jitter or []),
                     "warmup_iterations": args.warmup, "timed_iterations": args.iterations,
                     "torch_threads": args.threads, "device": "cpu"},
        "machine": {"cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
