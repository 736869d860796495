"""Streaming training data (issue 26, item 1): what the training stages hold and how fast
their data path is, with crops cut per item (``StreamingCropDataset``) against the in-memory
crop cache (``ObjectCropDataset(cache=True)``, what 1a and 1c trained on before) and a uint8
crop cache on disk, memory-mapped (the alternative the issue names; prototyped here).

    .venv/bin/python bench/bench_streaming.py --parts loader stages scale [--out bench/results/streaming.json]

Parts:
  loader  the demo data (``exits demo-data``, 238 objects, 96 px): build time and seconds per
          epoch of the engine's DataLoader (global batch 32, ``DistributedSampler``) over each
          dataset, with ``num_workers`` 0 (the demo config) and 2.
  stages  stages 1a and 1c as the flows run them (``flows.runtime.crop_dataset`` + the stage
          function; 1b in between), demo config with ``--epochs-1a`` / ``--epochs-1c``,
          once with the code before this change (``--old-tree``, e.g. ``git archive HEAD``
          of the parent commit) and once with this tree, alternating ``--repeats`` times;
          each run in its own process. Records wall and CPU seconds per stage (1b runs the same
          code in both: a gauge of the machine's load) and a digest of the trained weights
          (equal digests = bitwise equal weights).
  scale   peak RSS (``VmHWM`` after the reads; ``os.wait4`` for the whole process, which also
          holds the label-read comparison) of a 1c training process's data side at
          512 px (COCO geometry, N = 32 patches per side, ~260 retrieved patches per object):
          the streaming dataset + memory-mapped labels over 10k and 100k objects, 20
          batches of 8 read and their labels built; and the cached dataset + dense labels
          over 500 and 1,000 objects (what it did before), for the slope.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "streaming.json"


def _tree_path(tree: str | None) -> None:
    sys.path.insert(0, str(Path(tree).resolve()) if tree else str(ROOT))


# --- loader ----------------------------------------------------------------------------
def ensure_demo(data: Path) -> Path:
    if not (data / "instances.json").exists():
        from exits.demo import generate_demo_dataset

        generate_demo_dataset(data, seed=0, variant="demo")
    return data


def prepared_run(data: Path, run: Path) -> Path:
    from exits.config import load_config
    from exits.pipeline import stage_prepare

    if not (run / "instances.parquet").exists():
        stage_prepare(load_config("demo", []), data / "instances.json", data / "images", run, progress=False)
    return run / "instances.parquet"


class MemmapCropDataset:
    """The disk alternative: every crop written once as uint8 to one ``.npy`` (image by image,
    one ``roi_align`` call per image, like the in-memory cache), then read memory-mapped."""

    def __init__(self, instances: Path, images: Path, crop_size: int, path: Path):
        import numpy as np
        import torch

        from exits.data.crops import crop_images
        from exits.data.images import image_file
        from exits.stages.object_crops import StreamingCropDataset, load_image_tensor, to_uint8

        self.meta = StreamingCropDataset(instances, images, crop_size)  # windows + points only
        self.size = crop_size
        if not path.exists():
            tmp = path.with_suffix(".tmp.npy")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(self.meta), 3, crop_size, crop_size))
            order = np.argsort(self.meta.windows[:, 0], kind="stable")
            rows_of = np.split(order, np.flatnonzero(np.diff(self.meta.windows[order, 0])) + 1)
            for rows in rows_of:
                img = load_image_tensor(image_file(images, self.meta.file_name(int(rows[0]))))
                out[rows] = to_uint8(crop_images(img, [self.meta.window(int(i)) for i in rows])).numpy()
            out.flush()
            del out
            os.replace(tmp, path)
        self.crops = np.load(path, mmap_mode="r")
        self._torch = torch

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        from exits.stages.object_crops import box_mask

        torch = self._torch
        points, box = self.meta._object_geometry(int(i))
        return {"index": int(i), "image": torch.from_numpy(np.array(self.crops[i])).float().div_(255.0),
                "points": torch.from_numpy(points), "box": torch.from_numpy(box), "box_mask": box_mask(box, self.size)}


def _epoch_seconds(dataset, workers: int, epochs: int, seed: int = 0) -> list[float]:
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=workers)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        out.append(round(time.perf_counter() - t0, 3))
    return out


def part_loader(args: argparse.Namespace) -> dict[str, Any]:
    from exits.data.instances_table import read_instances_table
    from exits.stages.object_crops import ObjectCropDataset, StreamingCropDataset

    data = ensure_demo(args.data)
    instances = prepared_run(data, args.work / "loader_run")
    images = data / "images"
    out: dict[str, Any] = {}
    for repeat in range(args.repeats):
        t0 = time.perf_counter()
        cached = ObjectCropDataset(read_instances_table(instances), images, 96)
        build_cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        stream = StreamingCropDataset(instances, images, 96)
        build_stream = time.perf_counter() - t0
        npy = args.work / f"crops_{repeat}.npy"
        npy.unlink(missing_ok=True)
        t0 = time.perf_counter()
        mapped = MemmapCropDataset(instances, images, 96, npy)
        build_mapped = time.perf_counter() - t0
        for name, ds, build in (("in_memory_cache", cached, build_cached), ("streaming", stream, build_stream),
                                ("memmap_disk_cache", mapped, build_mapped)):
            rec = out.setdefault(name, {"build_s": [], "epochs_s_workers0": [], "epochs_s_workers2": []})
            rec["build_s"].append(round(build, 3))
            rec["epochs_s_workers0"].append(_epoch_seconds(ds, 0, args.loader_epochs))
            rec["epochs_s_workers2"].append(_epoch_seconds(ds, 2, args.loader_epochs))
        out["memmap_disk_cache"]["disk_bytes"] = npy.stat().st_size
        npy.unlink()
    for rec in out.values():
        # epoch 1 of the streaming dataset in the main process decodes every image once (cold LRU)
        rec["median_epoch_s_workers0_after_first"] = statistics.median(
            s for run in rec["epochs_s_workers0"] for s in run[1:])
        rec["median_epoch_s_workers2"] = statistics.median(s for run in rec["epochs_s_workers2"] for s in run)
        rec["median_build_s"] = statistics.median(rec["build_s"])
    out["objects"] = len(stream)
    return out


# --- stages: old vs new tree -----------------------------------------------------------
def weights_digest(path: Path) -> str:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    sd = state.get("state_dict") or state.get("model") or state
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(sd):
        value = sd[key]
        if hasattr(value, "numpy"):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def worker_stages(args: argparse.Namespace) -> None:
    """One run of 1a -> 1b -> 1c in this process with whichever ``exits`` is first on sys.path."""
    import torch

    import exits
    from exits.config import load_config
    from exits.engine import resolve_device
    from exits.pipeline import stage_retrieval_shard, stage_similarity, stage_generator
    from exits.run_folder import RunFolder
    from exits.stages.point_retrieval import merge_points
    from exits.stages.shards import shard_ranges
    from flows.runtime import crop_dataset

    torch.set_num_threads(2)
    cfg = load_config("demo", [f"similarity.optim.epochs={args.epochs_1a}", f"generator.optim.epochs={args.epochs_1c}"])
    run = RunFolder(args.run)
    images = args.data / "images"
    prepared_run(args.data, args.run)
    device = str(resolve_device("cpu"))
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name: str, fn) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        seconds[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        return out

    def stage_1a() -> None:
        ds = timed("1a_dataset", lambda: crop_dataset(str(run.instances), str(images), cfg.data.crop_size))
        stage_similarity(cfg, ds, run, device, progress=False)

    def stage_1b() -> None:
        shards = [stage_retrieval_shard(cfg, images, run, a, b, run.shard("points", i), torch.device("cpu"))
                  for i, (a, b) in enumerate(shard_ranges(run.num_instances(), cfg.flows.shard_size))]
        merge_points(shards, run.points)

    def stage_1c() -> None:
        ds = timed("1c_dataset", lambda: crop_dataset(str(run.instances), str(images), cfg.data.crop_size))
        stage_generator(cfg, ds, run, device, progress=False)

    timed("1a", stage_1a)
    timed("1b", stage_1b)
    timed("1c", stage_1c)
    out = {"tree": str(Path(exits.__file__).resolve().parents[1]), "seconds": {k: round(v, 2) for k, v in seconds.items()},
           "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
           "similarity_weights": weights_digest(run.similarity), "generator_weights": weights_digest(run.generator)}
    Path(args.result).write_text(json.dumps(out))


def part_stages(args: argparse.Namespace) -> dict[str, Any]:
    data = ensure_demo(args.data)
    runs: list[dict[str, Any]] = []
    trees = [("old", args.old_tree), ("new", str(ROOT))]
    for repeat in range(args.repeats):
        for label, tree in (trees if repeat % 2 == 0 else trees[::-1]):
            run = args.work / f"stages_{label}_{repeat}"
            result = args.work / f"stages_{label}_{repeat}.json"
            if not result.exists():
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "stages", "--tree", tree,
                       "--data", str(data), "--run", str(run), "--result", str(result),
                       "--epochs-1a", str(args.epochs_1a), "--epochs-1c", str(args.epochs_1c)]
                env = dict(os.environ, PYTHONPATH=tree)
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, cwd=tree)
                print(f"{label} run {repeat}: {time.perf_counter() - t0:.0f} s", flush=True)
            runs.append({"code": label, "repeat": repeat, **json.loads(result.read_text())})
    summary: dict[str, Any] = {}
    for label in ("old", "new"):
        mine = [r for r in runs if r["code"] == label]
        summary[label] = {key: statistics.median(r["seconds"][key] for r in mine) for key in mine[0]["seconds"]}
        summary[label + "_cpu"] = {key: statistics.median(r["cpu_seconds"][key] for r in mine)
                                   for key in mine[0]["cpu_seconds"]}
    summary["same_weights"] = len({(r["similarity_weights"], r["generator_weights"]) for r in runs}) == 1
    summary["new_over_old"] = {key: round(summary["new"][key] / summary["old"][key], 3)
                               for key in ("1a", "1b", "1c") if summary["old"][key]}
    summary["new_over_old_cpu"] = {key: round(summary["new_cpu"][key] / summary["old_cpu"][key], 3)
                                   for key in ("1a", "1b", "1c") if summary["old_cpu"][key]}
    return {"epochs_1a": args.epochs_1a, "epochs_1c": args.epochs_1c, "runs": runs, "summary": summary}


# --- scale: peak RSS ---------------------------------------------------------------------
IMAGE_W, IMAGE_H = 640, 480


def synthetic_run(root: Path, k: int, crop_size: int = 512, grid: int = 32, seed: int = 0) -> Path:
    """instances.parquet (k objects, ~7.3 per image, COCO-like boxes), points.parquet (~170 FG +
    ~90 BG retrieved patches per object), images = hard links to one 640x480 JPEG."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from exits.data.crops import crop_window
    from exits.data.instances_table import SCHEMA, write_instances_table
    from exits.io.parquet_rows import ROW_GROUP_ROWS
    from exits.stages.point_retrieval import POINTS_SCHEMA

    run = root / f"k{k}"
    if (run / "points.parquet").exists():
        return run
    rng = np.random.default_rng(seed)
    images = run / "images"
    images.mkdir(parents=True, exist_ok=True)
    master = root / "master.jpg"
    if not master.exists():
        arr = (rng.random((IMAGE_H, IMAGE_W, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).resize((IMAGE_W // 4, IMAGE_H // 4)).resize((IMAGE_W, IMAGE_H)).save(master, quality=90)
    n_images = max(1, round(k / 7.3))
    for j in range(n_images):
        dest = images / f"{j:012d}.jpg"
        if not dest.exists():
            os.link(master, dest)
    image_of = np.sort(rng.integers(0, n_images, k))
    w = rng.integers(8, 320, k)
    h = rng.integers(8, 240, k)
    x = rng.integers(0, IMAGE_W - w + 1)
    y = rng.integers(0, IMAGE_H - h + 1)
    f = rng.uniform(0.3, 0.7, (k, 4))
    pts = np.stack([np.stack([np.round(x + f[:, 0] * (w - 1)), y], 1), np.stack([x, np.round(y + f[:, 1] * (h - 1))], 1),
                    np.stack([np.round(x + f[:, 2] * (w - 1)), y + h - 1], 1), np.stack([x + w - 1, np.round(y + f[:, 3] * (h - 1))], 1)],
                   1).astype(np.float64)
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for i in range(k):
        win = crop_window(pts[i], IMAGE_W, IMAGE_H, margin=0.15, min_margin_px=4, size=crop_size)
        cols["ann_id"].append(i + 1)
        cols["image_id"].append(int(image_of[i]) + 1)
        cols["category_id"].append(1)
        cols["file_name"].append(f"{int(image_of[i]):012d}.jpg")
        cols["width"].append(IMAGE_W)
        cols["height"].append(IMAGE_H)
        cols["bbox"].append([float(x[i]), float(y[i]), float(w[i]), float(h[i])])
        cols["extreme_points"].append(pts[i].reshape(-1).tolist())
        cols["crop_box"].append(win.as_list())
        cols["split"].append("train")
        cols["points_source"].append("given")
    write_instances_table(pa.table(cols, schema=SCHEMA), run / "instances.parquet")
    n = grid * grid
    with pq.ParquetWriter(run / "points.parquet", POINTS_SCHEMA) as writer:
        for start in range(0, k, ROW_GROUP_ROWS):
            rows = min(ROW_GROUP_ROWS, k - start)
            lists = {"pseudo_fg": [], "pseudo_bg": [], "seed_fg": [], "seed_bg_extra": []}
            for _ in range(rows):
                perm = rng.permutation(n)
                a, b = int(rng.integers(120, 220)), int(rng.integers(60, 120))
                lists["pseudo_fg"].append(perm[:a].astype(np.int32))
                lists["pseudo_bg"].append(perm[a:a + b].astype(np.int32))
                lists["seed_fg"].append(perm[a + b:a + b + 4].astype(np.int32))
                lists["seed_bg_extra"].append(np.zeros(0, np.int32))
            writer.write_table(pa.table({
                "ann_id": pa.array(np.arange(start + 1, start + rows + 1)), "grid": pa.array(np.full(rows, grid, np.int32)),
                "seed_fg": lists["seed_fg"], "num_seed_bg": pa.array(np.zeros(rows, np.int32)),
                "pseudo_fg": lists["pseudo_fg"], "pseudo_bg": lists["pseudo_bg"],
                "num_box": pa.array(np.zeros(rows, np.int32)), "seed_bg_extra": lists["seed_bg_extra"],
                "valid": pa.array(np.ones(rows, bool))}, schema=POINTS_SCHEMA), row_group_size=ROW_GROUP_ROWS)
    return run


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its peak so far (``VmHWM``), MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_scale(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from exits.stages.generator import (GeneratorLoss, GeneratorTask, PointLabelSource, SparseLabels,
                                        point_label_masks)
    from exits.stages.object_crops import ObjectCropDataset, StreamingCropDataset

    torch.set_num_threads(1)
    run = Path(args.run)
    crop, grid = 512, 32
    baseline = _rss_mb()
    baseline_anon = _rss_mb("RssAnon")
    t0 = time.perf_counter()
    if args.mode == "streaming":
        ds = StreamingCropDataset(run / "instances.parquet", run / "images", crop)
        labels = PointLabelSource(ds.geometry, len(ds), SparseLabels.open(run / "points.parquet", run / "cache"),
                                  crop_size=crop, grid=grid, delta_px=8.0)
    else:
        import pyarrow.parquet as pq

        from exits.data.instances_table import read_instances_table

        ds = ObjectCropDataset(read_instances_table(run / "instances.parquet"), run / "images", crop)
        dense = point_label_masks(pq.read_table(run / "points.parquet"), ds.points_crop, ds.boxes, crop, grid, 8.0)
        labels = PointLabelSource(ds.geometry, len(ds), None, crop_size=crop, grid=grid, delta_px=8.0)
        labels.dense = dense  # held, as the old task held it
    build = time.perf_counter() - t0
    task = GeneratorTask(labels, grid, GeneratorLoss(1.0, 0.0, 1.0, 0.3, 0, "meanfield", {}))
    task.on_epoch_start(0, np.random.default_rng([0, 0]))
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    t0 = time.perf_counter()
    seen = 0
    for step, batch in enumerate(DataLoader(ds, batch_size=8, sampler=sampler)):
        task.targets(batch["index"], torch.device("cpu"))
        seen += len(batch["index"])
        if step + 1 == 20:
            break
    per_object = (time.perf_counter() - t0) / seen
    out = {"rss_after_imports_mb": round(baseline, 1), "rss_anon_after_imports_mb": round(baseline_anon, 1),
           "build_s": round(build, 2),
           "ms_per_object_read": round(1e3 * per_object, 2), "objects": len(ds),
           # the peak of the training side, before the label-read comparison below (which reads
           # whole row groups of points.parquet) can raise it
           "peak_rss_training_mb": round(_rss_mb("VmHWM"), 1),
           # now, split: anonymous memory (what the process holds) and file-backed pages
           # (shared libraries, and the pages of the memory-mapped label file that were read:
           # page cache the kernel can drop)
           "rss_anon_now_mb": round(_rss_mb("RssAnon"), 1), "rss_file_now_mb": round(_rss_mb("RssFile"), 1)}
    if args.mode == "streaming":
        out.update(label_read_ms_per_batch32(run, labels.sparse, len(ds)))
    Path(args.result).write_text(json.dumps(out))


def label_read_ms_per_batch32(run: Path, sparse, k: int, batches: int = 5) -> dict[str, float]:
    """Milliseconds to get the label lists of 32 random objects: from the memory-mapped Arrow
    copy (what 1c does) against straight from points.parquet (each row's row group read)."""
    import numpy as np
    import pyarrow.parquet as pq

    from exits.io.parquet_rows import ROW_GROUP_ROWS

    rng = np.random.default_rng(1)
    draws = [rng.integers(0, k, 32) for _ in range(batches)]
    cols = ["pseudo_fg", "pseudo_bg", "seed_bg_extra"]
    t0 = time.perf_counter()
    for index in draws:
        for c in cols:
            sparse.dense(c, index, 1024)
    mapped = (time.perf_counter() - t0) / batches
    pf = pq.ParquetFile(run / "points.parquet")
    t0 = time.perf_counter()
    for index in draws:
        groups = {}
        for i in index:
            g = int(i) // ROW_GROUP_ROWS
            if g not in groups:
                groups[g] = pf.read_row_group(g, columns=cols)
            groups[g].slice(int(i) - g * ROW_GROUP_ROWS, 1).to_pylist()
    parquet = (time.perf_counter() - t0) / batches
    return {"labels_ms_per_batch32_mapped": round(1e3 * mapped, 2), "labels_ms_per_batch32_parquet": round(1e3 * parquet, 1)}


def part_scale(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, sizes in (("streaming", args.scale_stream), ("cached", args.scale_cached)):
        for k in sizes:
            run = synthetic_run(args.work / "scale", k)
            result = args.work / f"scale_{mode}_{k}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "scale", "--mode", mode,
                   "--run", str(run), "--result", str(result)]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT))
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise RuntimeError(f"{mode} {k}: exit status {status}")
            rec = json.loads(result.read_text())
            rec.update(peak_rss_mb=round(usage.ru_maxrss / 1024, 1), wall_s=round(time.perf_counter() - t0, 1))
            rec["peak_over_imports_mb"] = round(rec["peak_rss_training_mb"] - rec["rss_after_imports_mb"], 1)
            rec["anon_over_imports_mb"] = round(rec["rss_anon_now_mb"] - rec["rss_anon_after_imports_mb"], 1)
            out[f"{mode}_{k}"] = rec
            print(mode, k, rec, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["loader", "stages", "scale"], choices=["loader", "stages", "scale"])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--work", type=Path, default=Path("/tmp/exits_streaming"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loader-epochs", type=int, default=3)
    ap.add_argument("--old-tree", default=None, help="a checkout of the code before this change (stages part)")
    ap.add_argument("--epochs-1a", type=int, default=2)
    ap.add_argument("--epochs-1c", type=int, default=3)
    ap.add_argument("--scale-stream", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--scale-cached", type=int, nargs="*", default=[500, 1000])
    # internal: one measured process
    ap.add_argument("--worker", choices=["stages", "scale"])
    ap.add_argument("--tree", default=None)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--result", type=Path)
    ap.add_argument("--mode", choices=["streaming", "cached"])
    args = ap.parse_args()
    _tree_path(args.tree)
    if args.worker == "stages":
        return worker_stages(args)
    if args.worker == "scale":
        return worker_scale(args)
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.update(benchmark="streaming training data (issue 26 item 1)", machine=platform.platform(),
                   cpus=os.cpu_count(), load_at_start=os.getloadavg()[0])
    if "loader" in args.parts:
        results["loader"] = part_loader(args)
    if "stages" in args.parts:
        if not args.old_tree:
            raise SystemExit("--old-tree is needed for the stages part")
        results["stages"] = part_stages(args)
    if "scale" in args.parts:
        results["scale"] = part_scale(args)
    results["load_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "stages"}, indent=1))
    if "stages" in results:
        print(json.dumps(results["stages"]["summary"], indent=1))


if __name__ == "__main__":
    main()
