"""CRF speed and quality: ms per object for the dense (pydensecrf) and meanfield CRFs.

Usage: python bench/bench_crf.py [--sizes 96 512] [--batch 8] [--threads 2 1] [--out bench/results/crf.json]

Timing: CPU, ``torch.set_num_threads(t)`` for each ``t`` in ``--threads`` (2 is the
reference setting; 1 is also recorded because on a busy 2-core machine a second intra-op
thread often waits for a core and makes small ops several times slower; pydensecrf is
single-threaded either way); meanfield runs the whole batch in one
call, dense loops over it (as ``crf_refine`` does); one warm-up call, then the median and
minimum over ``--repeats`` timed calls, divided by the batch size. Quality: IoU with the
true mask before / after refinement of the synthetic scene of tests/test_crf.py (64 px)
and of the same scene drawn at each benchmark size (corruption scaled with the size).
Results are written atomically as JSON and printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from exits.crf import DEFAULT_CRF_PARAMS, crf_refine
from exits.crf.meanfield import DEFAULT_DILATION, DEFAULT_WINDOW
from exits.crf.synthetic import make_disk_scene, mask_iou
from exits.io import write_json

IMPLS = ("dense", "meanfield")
TEST_SCENE_SIZE = 64


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up: allocator, thread pool, first-call overheads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def iou_gain(size: int, impl: str) -> dict[str, float]:
    scene = make_disk_scene(size, seed=0)
    refined = crf_refine(scene.image[None], scene.prob[None], impl=impl)
    before = mask_iou(scene.prob[0] > 0.5, scene.mask)
    after = mask_iou(refined[0, 0] > 0.5, scene.mask)
    return {"iou_before": round(before, 4), "iou_after": round(after, 4), "iou_gain": round(after - before, 4)}


# Ways to run the CRF on a 512 px crop (paper-scale configs), quality on the disk scene at
# 512 px and time per object: issue 13 found the meanfield CRF weak there.
VARIANTS_512: dict[str, tuple[str, dict]] = {
    "dense, defaults (sxy_bilateral 20)": ("dense", {}),
    "dense, sxy_bilateral 80 (scaled to 512)": ("dense", {"sxy_bilateral": 80.0}),
    "meanfield, defaults": ("meanfield", {}),
    "meanfield, coco.yaml before (sxy_bil 80, sxy_g 8, dilation 8)": ("meanfield", {"sxy_bilateral": 80.0, "sxy_gauss": 8.0, "dilation": 8}),
    "meanfield, work_size 128": ("meanfield", {"work_size": 128}),
    "meanfield, work_size 128, 20 iters": ("meanfield", {"work_size": 128, "iters": 20}),
    "meanfield, work_size 256, 20 iters": ("meanfield", {"work_size": 256, "iters": 20}),
}


def variants_512(repeats: int) -> list[dict]:
    """IoU after refinement and ms per object (batch 1, current thread setting) per variant."""
    scene = make_disk_scene(512, seed=0)
    before = mask_iou(scene.prob[0] > 0.5, scene.mask)
    rows = []
    for name, (impl, params) in VARIANTS_512.items():
        q = crf_refine(scene.image[None], scene.prob[None], impl=impl, **params)
        times = time_calls(lambda: crf_refine(scene.image[None], scene.prob[None], impl=impl, **params), repeats)
        rows.append({"variant": name, "impl": impl, "params": params, "iou_before": round(before, 4),
                     "iou_after": round(mask_iou(q[0, 0] > 0.5, scene.mask), 4),
                     "ms_per_object_median": round(statistics.median(times) * 1e3, 1)})
        print(f"  {name}: IoU {before:.3f} -> {rows[-1]['iou_after']:.3f}, {rows[-1]['ms_per_object_median']:.0f} ms", flush=True)
    return rows


def bench(sizes: list[int], batch: int, repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        scene = make_disk_scene(size, seed=0)
        image = scene.image[None].repeat(batch, 1, 1, 1)
        prob = scene.prob[None].repeat(batch, 1, 1, 1)
        for impl in IMPLS:
            reps = repeats if size <= 128 else max(1, repeats // 2)
            times = time_calls(lambda: crf_refine(image, prob, impl=impl), reps)
            rows.append(
                {
                    "impl": impl,
                    "threads": threads,
                    "size": size,
                    "batch": batch,
                    "repeats": reps,
                    "ms_per_object_median": round(statistics.median(times) / batch * 1e3, 2),
                    "ms_per_object_min": round(min(times) / batch * 1e3, 2),
                    **iou_gain(size, impl),
                }
            )
            print(f"  {threads} thr {impl:9s} {size:4d}px: {rows[-1]['ms_per_object_median']:.1f} ms/object", flush=True)
    return rows


def markdown(rows: list[dict], test_scene: dict[str, dict]) -> str:
    lines = [
        "| impl | threads | size | batch | ms/object (median) | ms/object (min) | IoU before -> after (scene at this size) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['threads']} | {r['size']} | {r['batch']} | {r['ms_per_object_median']:.1f} | "
            f"{r['ms_per_object_min']:.1f} | {r['iou_before']:.3f} -> {r['iou_after']:.3f} |"
        )
    lines.append("")
    lines.append(f"Synthetic test scene ({TEST_SCENE_SIZE} px, tests/test_crf.py):")
    for impl, q in test_scene.items():
        lines.append(f"- {impl}: IoU {q['iou_before']:.3f} -> {q['iou_after']:.3f} (+{q['iou_gain']:.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--variants-only", action="store_true", help="only the 512 px variants table (merged into --out)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "crf.json")
    args = parser.parse_args()
    if args.variants_only:
        import json

        torch.set_num_threads(min(args.threads))
        result = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "crf"}
        result["variants_512"] = {"threads": min(args.threads), "load_avg_1min": round(os.getloadavg()[0], 2),
                                  "rows": variants_512(max(1, args.repeats // 2))}
        write_json(args.out, result, indent=2)
        return
    test_scene = {impl: iou_gain(TEST_SCENE_SIZE, impl) for impl in IMPLS}
    load_before = os.getloadavg()[0]
    rows = [row for t in args.threads for row in bench(args.sizes, args.batch, args.repeats, t)]
    torch.set_num_threads(min(args.threads))
    variants = variants_512(max(1, args.repeats // 2))
    result = {
        "benchmark": "crf",
        "device": "cpu",
        "threads": args.threads,
        "batch": args.batch,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other jobs on the machine inflate timings; the 1-minute load average says how busy it was.
        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "crf_params": dict(DEFAULT_CRF_PARAMS),
        "meanfield_params": {"window": DEFAULT_WINDOW, "dilation": DEFAULT_DILATION},
        "results": rows,
        "test_scene_iou": {"size": TEST_SCENE_SIZE, **test_scene},
        "variants_512": {"threads": min(args.threads), "rows": variants},
    }
    write_json(args.out, result, indent=2)
    print(markdown(rows, test_scene))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
