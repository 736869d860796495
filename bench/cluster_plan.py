"""GPU-hours and CPU-hours of a paper-config run (configs/coco.yaml, configs/lvis.yaml) on COCO
and LVIS: the README's cluster plan, from counted FLOPs and measured CPU rates.

    .venv/bin/python bench/cluster_plan.py      # -> bench/results/scale_full_plan.json

What is measured and what is assumed:

- FLOPs per object of the paper model (ViT-B/16 + mask decoder at 512 px): **counted** here
  with ``torch.utils.flop_counter`` on one forward pass (2 FLOPs per multiply-add).
- A training step costs 3 forward passes (forward + backward, the usual 1 + 2); the
  generator adds the EMA teacher's forward (+1); retrieval and pseudo labels are one forward.
  The CRFs (mean-field at 128 px, Sinkhorn at N = 1024, random walk) add < 1 % and are left out.
- 1b and 1d cut each shard's crops in the shard's own thread before its batches go to the
  GPU, so a Dask worker holds its GPU for crop time + compute time (``gpu_hours_held``).
- GPU speed: **assumed** ``GPU_TFLOPS`` sustained per GPU (bf16 AMP, an A100-class card at
  ~1/3 of its 312 TFLOP/s peak; a well-fed H100 does ~2x, a V100 ~1/3). Not measured: the
  machine that made these numbers has no GPU.
- CPU: the crop of every object in every pass cut by a DataLoader worker, 12 ms of one core
  per object at 512 px (**measured**, README "Memory", ``bench/bench_streaming.py``); pasting
  + RLE of each pseudo mask 1.0 ms (**measured**, ``bench/results/throughput.json``); the
  whole-dataset steps (read + validate, merge, report, export) at the seconds per object
  **measured** at full COCO / LVIS size by ``bench/bench_scale.py`` (640 x 480 metadata; the
  files named in ``WHOLE_DATASET_STEPS``). ``bench_scale.py --full`` (scale_full.json) is the
  end-to-end check that these steps run at that size inside ``exits run``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_TFLOPS = 100.0  # assumed sustained bf16 throughput of one A100-class GPU on ViT-B/16 at 1024 tokens
CROP_CPU_MS = 12.0  # one core, per object and pass, 512 px (bench_streaming.py; README "Memory")
PASTE_RLE_CPU_MS = 1.0  # one core, per pseudo mask (bench/results/throughput.json, coco row)
DATASETS = {"coco": {"objects": 860_001, "images": 118_287}, "lvis": {"objects": 1_270_141, "images": 100_170}}
OUT = ROOT / "bench" / "results" / "scale_full_plan.json"


def forward_gflops(config: str) -> float:
    """GFLOPs of one object's forward pass through the config's model (counted, batch 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from exits.config import load_config
    from exits.stages.common import model_from_config

    cfg = load_config(config, ["backbone.allow_random_init=true"])
    model = model_from_config(cfg.backbone).eval()
    x = torch.rand(1, 3, cfg.data.crop_size, cfg.data.crop_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


# whole-dataset steps measured at full size by bench_scale.py (one core; wall = CPU there):
# file, dataset, stage name in that file
WHOLE_DATASET_STEPS = {
    "read + validate + instances.parquet": ("scale_coco_full_merge.json", "scale_lvis.json", "prepare"),
    "merge -> pseudo_labels.json": ("scale_coco_full_merge.json", "scale_lvis.json", "merge"),
    "report": ("scale_report_streaming.json", "scale_report_streaming.json", "report"),
    "exits export": ("scale_coco_full_rest.json", "scale_lvis_full_rest.json", "export"),
}


def measured_cpu_s_per_object(dataset: str) -> dict[str, float]:
    """Seconds per object of the whole-dataset steps at full size (``cpu_seconds`` where
    recorded, else wall seconds of the one-core step), from bench_scale.py's result files for
    ``dataset`` (640 x 480 metadata, COCO's / LVIS's object counts)."""
    out = {}
    for step, (coco_file, lvis_file, stage) in WHOLE_DATASET_STEPS.items():
        rows = json.loads((ROOT / "bench" / "results" / (coco_file if dataset == "coco" else lvis_file)).read_text())["rows"]
        row = next(r for r in rows if r["dataset"] == dataset and r["scale"] == 1.0 and stage in r["stages"])
        measured = row["stages"][stage]
        out[step] = (measured.get("cpu_seconds") or measured["seconds"]) / row["objects"]
    return out


def plan(flops_fwd: float, cpu_rates: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per dataset and stage: GPU-hours = passes x objects x GFLOPs per pass / (GPU_TFLOPS x 3600 x 1000);
    CPU-hours = passes x objects x CROP_CPU_MS / 3.6e6 (+ the measured whole-dataset steps)."""
    from exits.config import load_config

    out: dict[str, Any] = {}
    for name, size in DATASETS.items():
        cfg = load_config(name, ["backbone.allow_random_init=true"])
        n = size["objects"]
        e_sim, e_gen = cfg.similarity.optim.epochs, cfg.generator.optim.epochs
        # (passes over the objects, forward passes per object-pass)
        gpu_work = {"1a similarity": (e_sim, 3), "1b retrieval": (1, 1), "1c generator": (e_gen, 4), "1d pseudo labels": (1, 1)}
        rows = {}
        for stage, (passes, forwards) in gpu_work.items():
            gpu_h = passes * n * forwards * flops_fwd / (GPU_TFLOPS * 1000 * 3600)
            cpu_h = passes * n * CROP_CPU_MS / 3.6e6 + (n * PASTE_RLE_CPU_MS / 3.6e6 if stage == "1d pseudo labels" else 0.0)
            rows[stage] = {"passes": passes, "gpu_hours": round(gpu_h, 2), "cpu_hours": round(cpu_h, 1)}
            if stage in ("1b retrieval", "1d pseudo labels"):
                # a shard cuts its crops in its own thread (DataLoader without workers), then runs the
                # batch on the GPU: the worker's GPU is held for crop time + compute time
                rows[stage]["gpu_hours_held"] = round(gpu_h + cpu_h, 1)
        for stage, per_object in cpu_rates[name].items():
            rows[stage] = {"gpu_hours": 0.0, "cpu_hours": round(n * per_object / 3600, 2)}
        out[name] = {"objects": n, "stages": rows,
                     "gpu_hours": round(sum(r["gpu_hours"] for r in rows.values()), 1),
                     "gpu_hours_held": round(sum(r.get("gpu_hours_held", r["gpu_hours"]) for r in rows.values()), 1),
                     "cpu_hours": round(sum(r["cpu_hours"] for r in rows.values()), 1)}
    return out


def main() -> None:
    from exits.io import write_json

    flops = forward_gflops("coco")
    rates = {d: measured_cpu_s_per_object(d) for d in DATASETS}
    result = {"forward_gflops_per_object": round(flops, 1), "gpu_tflops_assumed": GPU_TFLOPS,
              "crop_cpu_ms": CROP_CPU_MS, "paste_rle_cpu_ms": PASTE_RLE_CPU_MS,
              "cpu_s_per_object_measured": rates, "plan": plan(flops, rates)}
    write_json(OUT, result, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
