"""Pseudo-label throughput (stage 1d) on CPU: objects per second at the demo and paper configs.

    python bench/bench_throughput.py [--objects-demo 64] [--objects-paper 4]

Times stage 1d the way the config runs it (``exits.pipeline.stage_pseudo_shard``): crops,
the generator forward at the config's batch size, the final CRF (on the crop inside the
forward, or at image resolution while pasting: ``pseudo.refine_at``), paste + RLE, on
demo-data objects, warm, with a random-init model of each config (weights do not change
the cost). Writes bench/results/throughput.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.config import load_config  # noqa: E402
from exits.data.reader import load_point_dataset  # noqa: E402
from exits.data.instances_table import build_instances_table  # noqa: E402
from exits.demo import generate_demo_dataset  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.stages.common import model_from_config  # noqa: E402
from exits.stages.object_crops import ObjectCropDataset  # noqa: E402
from exits.stages.image_crf_pool import ImageCRFRefiner, resolve_crf_workers  # noqa: E402
from exits.stages.pseudo_labels import paste_pseudo_masks, predict_crop_probs  # noqa: E402


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure(config: str, n_objects: int, data: Path, crf_workers: int | None = None, cpu_bf16: bool = False) -> dict:
    """Stage 1d as ``exits.pipeline.stage_pseudo_shard`` runs it for ``config`` (its batch size,
    its CRF: on crops inside the forward, or at image resolution while pasting), warm: the
    model, the thread pool and the CRF run once on a few objects before the timed pass.

    With CRF workers the overlapped pass is the one that counts; ``cpu_bf16`` runs its forward
    under bfloat16 autocast (``pseudo.cpu_bf16``) and compares its masks with the float32 ones."""
    cfg = load_config(config, ["device=cpu"])
    ds = load_point_dataset(data / "instances.json", data / "images")
    ds.objects = ds.objects[:n_objects]
    d = cfg.data
    table = build_instances_table(ds, margin=d.crop_margin, min_margin_px=d.crop_min_margin_px, crop_size=d.crop_size)
    crops, t_crop = _timed(ObjectCropDataset, table, data / "images", d.crop_size)
    model = model_from_config(cfg.backbone).eval()
    p, crf = cfg.pseudo, cfg.generator.crf
    at_image = p.crf_refine and p.refine_at == "image"
    crop_crf = p.crf_impl if p.crf_refine and not at_image else None
    crf_params = {"iters": crf.iters, **crf.params}
    images = {im.image_id: {"height": im.height, "width": im.width} for im in ds.images.values()}
    image_ids = table.column("image_id").to_pylist()
    cpu = torch.device("cpu")
    warm = torch.utils.data.Subset(crops, range(min(2, len(crops))))
    predict_crop_probs(model, warm, batch_size=p.batch_size, device=cpu, crf_impl=crop_crf, crf_params=crf_params,
                       progress=False)
    _, t_model = _timed(predict_crop_probs, model, crops, batch_size=p.batch_size, device=cpu, progress=False)
    probs, t_model_crf = _timed(predict_crop_probs, model, crops, batch_size=p.batch_size, device=cpu,
                                crf_impl=crop_crf, crf_params=crf_params, progress=False)
    t_paste = t_overlap = 0.0
    workers = resolve_crf_workers(p.crf_workers if crf_workers is None else crf_workers)
    if at_image:
        serial = ImageCRFRefiner(crops, p.image_crf, workers=0)
        serial(0, probs[0])  # warm-up
        _, t_paste = _timed(paste_pseudo_masks, probs, crops, images, image_ids, p.threshold, progress=False,
                            refine=serial)
        if workers:
            # As stage_pseudo_shard runs it: CRFs of each batch start in the workers while the
            # next batch's forward runs here. Warm: the pool exists before the timed pass.
            pooled = ImageCRFRefiner(crops, p.image_crf, workers=workers)
            pooled.submit(0, probs[:1])
            pooled(0, probs[0])
            dtype = torch.bfloat16 if cpu_bf16 else None
            predict_crop_probs(model, warm, batch_size=p.batch_size, device=cpu, progress=False, autocast_dtype=dtype)

            def overlapped():
                out = predict_crop_probs(model, crops, batch_size=p.batch_size, device=cpu, progress=False,
                                         on_batch=pooled.submit, autocast_dtype=dtype)
                return paste_pseudo_masks(out, crops, images, image_ids, p.threshold, progress=False, refine=pooled)

            rows_pool, t_overlap = _timed(overlapped)
            rows_serial = paste_pseudo_masks(probs, crops, images, image_ids, p.threshold, progress=False, refine=serial)
            same = sum(a["rle"] == b["rle"] for a, b in zip(rows_pool, rows_serial))
            ious = [mask_utils.iou([a["rle"]], [b["rle"]], [0])[0, 0] if a["area"] or b["area"] else 1.0
                    for a, b in zip(rows_pool, rows_serial)]
    else:
        _, t_paste = _timed(paste_pseudo_masks, probs, crops, images, image_ids, p.threshold, progress=False)
    total = t_crop + (t_overlap if t_overlap else t_model_crf + t_paste)
    row = {"config": config, "objects": n_objects, "crop_size": d.crop_size, "vit": cfg.backbone.vit_name,
           "batch_size": p.batch_size, "crf_workers": workers if at_image else 0, "cpu_bf16": cpu_bf16,
           "crf": f"{p.crf_impl} at {'image' if at_image else 'crop'}" if p.crf_refine else "none",
           "ms_per_object": {"crop": 1000 * t_crop / n_objects, "model": 1000 * t_model / n_objects,
                             "crf_in_forward": 1000 * (t_model_crf - t_model) / n_objects,
                             "paste_rle": 1000 * t_paste / n_objects,
                             "forward_and_paste_overlapped": 1000 * t_overlap / n_objects},
           "serial_objects_per_second": n_objects / (t_crop + t_model_crf + t_paste),
           "objects_per_second": n_objects / total}
    if t_overlap:
        row["masks_equal_to_serial"] = f"{same}/{n_objects}"
        row["mask_iou_to_serial"] = {"mean": float(np.mean(ious)), "min": float(np.min(ious))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--objects-demo", type=int, default=192)  # 3 batches: the overlap in steady state
    ap.add_argument("--objects-paper", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    ap.add_argument("--crf-workers", type=int, default=None,
                    help="image-level CRF processes (default: the config's pseudo.crf_workers)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not (args.data / "instances.json").exists():
        generate_demo_dataset(args.data)
    rows = [measure("demo", args.objects_demo, args.data, args.crf_workers),
            measure("demo", args.objects_demo, args.data, args.crf_workers, cpu_bf16=True),
            measure("coco", args.objects_paper, args.data, args.crf_workers)]
    write_json(args.out, {"device": "cpu", "threads": 2, "rows": rows}, indent=1)
    print("| config | crop | ViT | batch | CRF | CRF workers | crop ms | model ms | CRF in forward ms | "
          "paste (+ image CRF) + RLE ms | forward + paste overlapped ms | objects/s serial | objects/s | "
          "masks = serial |\n|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        m = r["ms_per_object"]
        print(f"| {r['config']}{' + cpu_bf16' if r['cpu_bf16'] else ''} | {r['crop_size']} | {r['vit']} | {r['batch_size']} | {r['crf']} | {r['crf_workers']} | "
              f"{m['crop']:.1f} | {m['model']:.1f} | {m['crf_in_forward']:.1f} | {m['paste_rle']:.1f} | "
              f"{m['forward_and_paste_overlapped']:.1f} | {r['serial_objects_per_second']:.2f} | "
              f"{r['objects_per_second']:.2f} | {r.get('masks_equal_to_serial', '-')} |")


if __name__ == "__main__":
    main()
