"""Pseudo-label throughput (stage 1d) on CPU: objects per second at the demo and paper configs.

    python bench/bench_throughput.py [--objects-demo 64] [--objects-paper 4]

Times the generator forward, the final CRF refinement and pasting/RLE-encoding into the
image, on demo-data objects, with a random-init model of each config (weights do not
change the cost). Writes bench/results/throughput.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.config import load_config  # noqa: E402
from exits.data.reader import load_point_dataset  # noqa: E402
from exits.data.instances_table import build_instances_table  # noqa: E402
from exits.demo import generate_demo_dataset  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.stages.common import model_from_config  # noqa: E402
from exits.stages.object_crops import ObjectCropDataset  # noqa: E402
from exits.stages.pseudo_labels import paste_pseudo_masks, predict_crop_probs  # noqa: E402


def measure(config: str, n_objects: int, data: Path) -> dict:
    cfg = load_config(config, ["device=cpu"])
    ds = load_point_dataset(data / "instances.json", data / "images")
    ds.objects = ds.objects[:n_objects]
    d = cfg.data
    table = build_instances_table(ds, margin=d.crop_margin, min_margin_px=d.crop_min_margin_px, crop_size=d.crop_size)
    t0 = time.perf_counter()
    crops = ObjectCropDataset(table, data / "images", d.crop_size)
    t_crop = time.perf_counter() - t0
    model = model_from_config(cfg.backbone).eval()
    p, crf = cfg.pseudo, cfg.generator.crf
    t0 = time.perf_counter()
    predict_crop_probs(model, crops, batch_size=min(p.batch_size, 16), device=torch.device("cpu"), progress=False)
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = predict_crop_probs(model, crops, batch_size=min(p.batch_size, 16), device=torch.device("cpu"),
                               crf_impl=p.crf_impl, crf_params={"iters": crf.iters, **crf.params}, progress=False)
    t_model_crf = time.perf_counter() - t0
    images = {im.image_id: {"height": im.height, "width": im.width} for im in ds.images.values()}
    t0 = time.perf_counter()
    paste_pseudo_masks(probs, crops, images, table.column("image_id").to_pylist(), p.threshold, progress=False)
    t_paste = time.perf_counter() - t0
    total = t_crop + t_model_crf + t_paste
    return {"config": config, "objects": n_objects, "crop_size": d.crop_size, "vit": cfg.backbone.vit_name,
            "crf": p.crf_impl, "ms_per_object": {"crop": 1000 * t_crop / n_objects, "model": 1000 * t_model / n_objects,
            "crf": 1000 * (t_model_crf - t_model) / n_objects, "paste_rle": 1000 * t_paste / n_objects},
            "objects_per_second": n_objects / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--objects-demo", type=int, default=64)
    ap.add_argument("--objects-paper", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not (args.data / "instances.json").exists():
        generate_demo_dataset(args.data)
    rows = [measure("demo", args.objects_demo, args.data), measure("coco", args.objects_paper, args.data)]
    write_json(args.out, {"device": "cpu", "threads": 2, "rows": rows}, indent=1)
    print("| config | crop | ViT | CRF | crop ms | model ms | CRF ms | paste+RLE ms | objects/s |\n|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["ms_per_object"]
        print(f"| {r['config']} | {r['crop_size']} | {r['vit']} | {r['crf']} | {m['crop']:.1f} | {m['model']:.1f} | "
              f"{m['crf']:.1f} | {m['paste_rle']:.1f} | {r['objects_per_second']:.2f} |")


if __name__ == "__main__":
    main()
