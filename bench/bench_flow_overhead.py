"""Prefect overhead per task vs compute, sharded pseudo-label stage (1d) on the demo data.

    python bench/bench_flow_overhead.py [--shard-sizes 2 8 32 128] [--repeats 2]

For each shard size S the shards run as the Prefect tasks of ``flows/pseudo_labels.py``,
submitted with ``run_shards`` to a one-thread ThreadPoolTaskRunner (one shard after another;
fresh run folder, no cache hits). The compute of each shard (``stage_pseudo_shard``) is
timed inside its task, so overhead = wall time of all shard tasks - their compute, from the
same pass: task-run creation and state updates over the API, cache key (file digests),
shard-key check, output digests, result persistence. For reference the same shards also
run as plain calls in one worker thread (compute without Prefect).

Compute per shard is f + S c (f: per-shard fixed work such as loading the model, c: per
object), fitted over the shard sizes; with Prefect overhead o per task the overhead
fraction of a shard of S objects is o / (o + f + S c), under 5 % from S >= (19 o - f) / c.
Models are random-init with the demo config's sizes (weights do not change the cost). Uses
PREFECT_API_URL when set, else Prefect's temporary local server. Writes
bench/results/flow_overhead.json.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect import flow  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from exits.config import load_config  # noqa: E402
from exits.demo import generate_demo_dataset  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.models import save_mask_model  # noqa: E402
from exits.pipeline import stage_prepare, stage_pseudo_shard, stage_retrieval_shard  # noqa: E402
from exits.run_folder import RunFolder  # noqa: E402
from exits.stages.common import model_from_config  # noqa: E402
from exits.stages.point_retrieval import merge_points  # noqa: E402
from exits.stages.shards import shard_ranges  # noqa: E402
from flows.caching import folder_fingerprint, run_shards  # noqa: E402
import flows.pseudo_labels as stage_flow  # noqa: E402
from flows.pseudo_labels import SECTIONS, pseudo_labels_flow, pseudo_labels_shard_task  # noqa: E402
from flows.runtime import config_dict, config_from, results_dir, sections  # noqa: E402

RUN_FILES = ("instances", "points", "generator")  # RunFolder attributes a pseudo-label pass reads


def prepare_base(data: Path, base: Path, cfg) -> int:
    """instances.parquet, a random-init generator and retrieved points (random-init extractor)."""
    paths = RunFolder(base)
    stage_prepare(cfg, data / "instances.json", data / "images", base, progress=False)
    torch.manual_seed(0)
    save_mask_model(paths.similarity, model_from_config(cfg.backbone))
    save_mask_model(paths.generator, model_from_config(cfg.backbone))
    n = paths.num_instances()
    shards = [stage_retrieval_shard(cfg, data / "images", paths, a, b, paths.shard("points", i), torch.device("cpu"))
              for i, (a, b) in enumerate(shard_ranges(n, 64))]
    merge_points(shards, paths.points)
    return n


def fresh_run(base: Path, scratch: Path) -> Path:
    work = Path(tempfile.mkdtemp(dir=scratch))
    src, dst = RunFolder(base), RunFolder(work)
    for name in RUN_FILES:
        getattr(dst, name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(getattr(src, name), getattr(dst, name))
    return work


def plain_pass(cfg, images: Path, work: Path, shard_size: int, limit: int | None = None) -> float:
    """The shards as plain calls, one after another in ONE worker thread, as the thread task
    runner runs them (torch in the main thread behaves differently under load: not comparable)."""
    paths = RunFolder(work)
    ranges = shard_ranges(paths.num_instances(), shard_size)[:limit]
    with ThreadPoolExecutor(max_workers=1) as pool:
        t0 = time.perf_counter()
        for i, (a, b) in enumerate(ranges):
            pool.submit(stage_pseudo_shard, cfg, images, paths, a, b, paths.shard("pseudo", i),
                        torch.device("cpu")).result()
        return time.perf_counter() - t0


INNER_SECONDS: list[float] = []


def timed_stage_pseudo_shard(*args, **kwargs):
    """``stage_pseudo_shard`` with its duration recorded (patched into the stage flow's module)."""
    t0 = time.perf_counter()
    try:
        return stage_pseudo_shard(*args, **kwargs)
    finally:
        INNER_SECONDS.append(time.perf_counter() - t0)


@flow(name="bench-pseudo-label-shards", task_runner=ThreadPoolTaskRunner(max_workers=1))
def prefect_pass(images: str, workdir: str, config: dict) -> dict:
    """The shard part of ``pseudo_labels_flow``, timed from submission to the last result."""
    cfg = config_from(config)
    paths = RunFolder(Path(workdir))
    common = dict(instances=str(paths.instances), generator=str(paths.generator), points=str(paths.points),
                  images=images, images_fingerprint=folder_fingerprint(images), workdir=workdir,
                  config=sections(cfg, *SECTIONS))
    calls = [dict(common, shard=i, start=a, stop=b)
             for i, (a, b) in enumerate(shard_ranges(paths.num_instances(), cfg.flows.shard_size))]
    INNER_SECONDS.clear()
    t0 = time.perf_counter()
    _, states = run_shards(pseudo_labels_shard_task, results_dir(workdir), calls)
    wall = time.perf_counter() - t0
    assert len(INNER_SECONDS) == len(calls)
    return {"seconds": wall, "compute_s": sum(INNER_SECONDS), "states": states}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--shard-sizes", type=int, nargs="+", default=[2, 8, 32, 128])
    ap.add_argument("--repeats", type=int, default=2, help="passes per shard size and mode; the minimum is kept")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flow_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not (args.data / "instances.json").exists():
        generate_demo_dataset(args.data)
    images = args.data / "images"
    scratch = Path(tempfile.mkdtemp(prefix="exits-flow-bench-"))
    try:
        base_cfg = load_config("demo", ["device=cpu"])
        n = prepare_base(args.data, scratch / "base", base_cfg)
        plain_pass(base_cfg, images, fresh_run(scratch / "base", scratch), 8, limit=2)  # warm-up (not timed)
        stage_flow.stage_pseudo_shard = timed_stage_pseudo_shard
        rows = []
        for size in args.shard_sizes:
            cfg = load_config("demo", ["device=cpu", f"flows.shard_size={size}"])
            plain, passes = [], []
            for _ in range(args.repeats):
                plain.append(plain_pass(cfg, images, fresh_run(scratch / "base", scratch), size))
                out = prefect_pass(images=str(images), workdir=str(fresh_run(scratch / "base", scratch)),
                                   config=config_dict(cfg))
                assert set(out["states"]) == {"Completed"}, out["states"]
                passes.append(out)
            shards = math.ceil(n / size)
            best = min(passes, key=lambda o: o["seconds"])
            over = [(o["seconds"] - o["compute_s"]) / shards for o in passes]
            rows.append({"shard_size": size, "shards": shards, "plain_compute_s": round(min(plain), 3),
                         "prefect_s": round(best["seconds"], 3), "compute_in_tasks_s": round(best["compute_s"], 3),
                         "overhead_s_per_task": round(statistics.median(over), 4),
                         "overhead_fraction": round(statistics.median(over) * shards / best["seconds"], 4),
                         "compute_ms_per_object": round(1000 * best["compute_s"] / n, 2)})
            print(rows[-1], flush=True)
        # Whole stage flow once (shards + merge + flow-run set-up/tear-down) at the largest size.
        cfg = load_config("demo", ["device=cpu", f"flows.shard_size={args.shard_sizes[-1]}"])
        t0 = time.perf_counter()
        pseudo_labels_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(
            images=str(images), annotations=str(args.data / "instances.json"),
            workdir=str(fresh_run(scratch / "base", scratch)), config=config_dict(cfg))
        stage_flow_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    # Pooled over sizes, weighted by the number of tasks (the many-task passes measure it best).
    overhead = sum(r["overhead_s_per_task"] * r["shards"] for r in rows) / sum(r["shards"] for r in rows)
    # compute = shards * f + objects * c  (least squares over the shard sizes)
    fit, *_ = np.linalg.lstsq(np.array([[r["shards"], n] for r in rows], float),
                              np.array([r["compute_in_tasks_s"] for r in rows]), rcond=None)
    per_shard, per_object = max(float(fit[0]), 0.0), float(fit[1])
    needed = max(1, math.ceil((19 * max(overhead, 0.0) - per_shard) / per_object))
    under = [r["shard_size"] for r in rows if r["overhead_fraction"] < 0.05]
    result = {"stage": "pseudo labels (1d), demo config, random-init generator", "device": "cpu", "threads": 2,
              "objects": n, "api": PREFECT_API_URL.value() or "temporary local server", "repeats": args.repeats,
              "task_runner": "ThreadPoolTaskRunner(max_workers=1)", "rows": rows,
              "overhead_s_per_task": round(overhead, 4), "compute_fit": {"s_per_shard": round(per_shard, 4),
                                                                      "s_per_object": round(per_object, 5)},
              "shard_size_for_overhead_under_5pct": needed,
              "smallest_measured_shard_size_under_5pct": min(under) if under else None,
              "stage_flow_s_at_largest_shard_size": round(stage_flow_s, 2),
              "prefect_shards_s_at_largest_shard_size": rows[-1]["prefect_s"]}
    write_json(args.out, result, indent=1)
    print("\n| shard size | shards | plain compute s | Prefect s | compute in tasks s | overhead s/task | overhead % |"
          "\n|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shard_size']} | {r['shards']} | {r['plain_compute_s']:.2f} | {r['prefect_s']:.2f} | "
              f"{r['compute_in_tasks_s']:.2f} | {r['overhead_s_per_task']:.3f} | {100 * r['overhead_fraction']:.1f} |")
    print(f"\n{n} objects; compute {1000 * per_shard:.0f} ms per shard + {1000 * per_object:.1f} ms per object; "
          f"Prefect overhead {overhead:.3f} s per task: "
          f"overhead < 5 % from shard size {needed} (smallest measured: {result['smallest_measured_shard_size_under_5pct']}). "
          f"Whole stage flow at shard size {args.shard_sizes[-1]}: {stage_flow_s:.1f} s "
          f"(shards alone {rows[-1]['prefect_s']:.1f} s).")


if __name__ == "__main__":
    main()
