"""Scale benchmark: wall time and peak RSS per stage on COCO- and LVIS-sized annotation files.

    .venv/bin/python bench/bench_scale.py --datasets coco lvis --scales 0.01 0.1 1
        [--work /tmp/exits_scale] [--shard-size 256] [--out bench/results/scale.json]

For each dataset and scale it generates a synthetic annotation file with the metadata of the
real one (COCO train2017: 118,287 images, 860,001 objects, 80 categories; LVIS v1 train:
100,170 images, 1,270,141 objects, 1,203 categories), each object with extreme points and an
8-vertex polygon mask; every image is a hard link to one tiny 640x480 PNG (the point is the
metadata path, not decoding). Then every stage that touches all objects runs in its own
subprocess (``os.wait4`` gives that process's own peak RSS, so one stage's memory never
hides another's), with 2 torch/BLAS threads:

    baseline         the imports of a flow worker alone (torch, prefect, exits); each stage
                     imports only what it needs, and records its RSS after the imports
    prepare          read + validate the json (images opened and checked) + instances.parquet
    plan             shard planning: row count from the footer, shard ranges, image-folder
                     fingerprint (what a flow does before mapping the shards)
    retrieval_shard  one point-retrieval shard (demo config, random-init extractor) with its reads
    pseudo_shard     one pseudo-label shard (demo config, random-init generator) with its reads
    merge_points     the point shards -> points.parquet
    merge            the pseudo shards -> pseudo_labels.json / .parquet
    report           the mIoU report over all rows (GT = the polygons of the json), streamed:
                     GT json one annotation at a time, pseudo masks by row group,
                     metrics.parquet written incrementally (exits.report.build.build_report);
                     without the parts table (peer_sample=0: a fixed-size sample of GrabCut /
                     dense-CRF peers, the same cost at any scale, exits/report/parts.py)
    report_in_memory the report as it was before streaming (GT json loaded whole, a dict per
                     object: exits.report.build.build_report_in_memory); not in the default
                     stages, ask for it with --stages
    export           ``exits export``: 1,000 fixes merged over the pseudo labels
    queue            the spot-fix server: catalog load, /api/queue first pages of 8 filters (cold,
                     warm median), 100 thumbnails, RSS (measure_queue_api); its own peak RSS:
                     own_peak_rss_mb (VmHWM; wait4's figure is floored at the parent's peak)

The shards of the sharded stages other than the measured one are synthesised in an untimed
setup step: points shards with random patch lists, pseudo shards with the object's polygon
shrunk by 10 % as its "pseudo mask" (one part). Results: ``bench/results/scale.json``;
docs/benchmarks.md summarises them. ``run_scale(..., scale=0.001)`` is the test-suite version.
``--full``: the whole ``exits run`` through the CLI on a dataset with images instead
(bench/scale_full_run.py, bench/results/scale_full.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES: dict[str, dict[str, int]] = {
    "coco": {"images": 118_287, "objects": 860_001, "categories": 80},
    "lvis": {"images": 100_170, "objects": 1_270_141, "categories": 1_203},
}
IMAGE_W, IMAGE_H = 640, 480
STAGES = ("baseline", "prepare", "plan", "retrieval_shard", "pseudo_shard", "merge_points", "merge", "report", "export", "queue")
EXTRA_STAGES = ("report_in_memory",)  # measured only when named (--stages)
N_FIXES = 1000
RESULTS = ROOT / "bench" / "results" / "scale.json"


# --- synthetic dataset -----------------------------------------------------------------
def _geometry(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (n, 4) [x, y, w, h] (integer pixels, 8 .. 319 x 8 .. 239), extreme points (n, 4, 2)
    top/left/bottom/right on the box edges, and an 8-vertex convex polygon (n, 8, 2) through
    them: :func:`bench.scale_full_run.object_geometry` on a 640 x 480 image."""
    from bench.scale_full_run import object_geometry

    return object_geometry(rng, n, IMAGE_W, IMAGE_H, min_size=8)


def generate_dataset(out: Path, kind: str, scale: float, seed: int = 0) -> dict[str, Any]:
    """Write ``out/annotations.json`` and ``out/images/`` (hard links to one PNG) for
    ``kind`` ("coco" | "lvis") at ``scale`` of its real size; returns the counts."""
    from PIL import Image

    size = SIZES[kind]
    n_img = max(1, round(size["images"] * scale))
    n_obj = max(1, round(size["objects"] * scale))
    n_cat = size["categories"]
    rng = np.random.default_rng(seed)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:012d}.png" for i in range(n_img)]
    links_per_file = 50_000  # below the file systems' hard-link limits (ext4: 65,000)
    for k in range(0, n_img, links_per_file):
        master = out / f"blank-{k // links_per_file}.png"
        Image.new("RGB", (IMAGE_W, IMAGE_H), (90, 120, 150)).save(master)
        for name in names[k:k + links_per_file]:
            dest = images_dir / name
            if not dest.exists():
                os.link(master, dest)
    image_of = np.sort(rng.integers(0, n_img, n_obj)) if kind == "lvis" else rng.integers(0, n_img, n_obj)
    cats = rng.integers(1, n_cat + 1, n_obj)
    boxes, pts, poly = _geometry(rng, n_obj)
    tmp = out / "annotations.json.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"info": {"description": "synthetic %s-sized (scale %g)"}, "licenses": [], "images": [' % (kind, scale))
        for i, name in enumerate(names):
            if kind == "lvis":
                rec = {"id": i + 1, "width": IMAGE_W, "height": IMAGE_H, "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                       "not_exhaustive_category_ids": [], "neg_category_ids": []}
            else:
                rec = {"id": i + 1, "file_name": name, "width": IMAGE_W, "height": IMAGE_H}
            fh.write(("," if i else "") + json.dumps(rec))
        fh.write('], "categories": [')
        for c in range(1, n_cat + 1):
            rec = {"id": c, "name": f"cat{c}", "supercategory": "thing"}
            if kind == "lvis":
                rec["frequency"] = "fcr"[c % 3]
            fh.write(("," if c > 1 else "") + json.dumps(rec))
        fh.write('], "annotations": [')
        for i in range(n_obj):
            rec = {"id": i + 1, "image_id": int(image_of[i]) + 1, "category_id": int(cats[i]),
                   "bbox": [float(v) for v in boxes[i]], "area": float(boxes[i, 2] * boxes[i, 3]) * 0.75,
                   "segmentation": [[round(float(v), 2) for v in poly[i].reshape(-1)]],
                   "extreme_points": pts[i].tolist()}
            if kind == "coco":
                rec["iscrowd"] = 0
            fh.write(("," if i else "") + json.dumps(rec))
        fh.write("]}")
    os.replace(tmp, out / "annotations.json")
    return {"images": n_img, "objects": n_obj, "categories": n_cat,
            "json_bytes": (out / "annotations.json").stat().st_size}


# --- setup of the run folder (untimed) ---------------------------------------------------
def _config(shard_size: int):
    from exits.config import load_config

    return load_config("demo", ["device=cpu", f"flows.shard_size={shard_size}"])


def setup_run(data: Path, run: Path, shard_size: int, seed: int = 0) -> None:
    """Random-init models, synthetic point and pseudo shards for every shard, 1,000 fixes."""
    import pyarrow as pa
    import pycocotools.mask as mask_utils
    import torch

    from exits.config import dump_config
    from exits.models import save_mask_model
    from exits.run_folder import RunFolder
    from exits.stages.common import model_from_config
    from exits.stages.point_retrieval import POINTS_SCHEMA
    from exits.stages.pseudo_labels import PSEUDO_SCHEMA
    from exits.stages.shards import shard_ranges, write_shard
    from exits.spotfix.store import FixesStore, FixRecord

    cfg = _config(shard_size)
    rf = RunFolder(run)
    rf.write_run_files(dump_config(cfg), data / "images", data / "annotations.json", None)
    torch.manual_seed(seed)
    save_mask_model(rf.similarity, model_from_config(cfg.backbone))
    save_mask_model(rf.generator, model_from_config(cfg.backbone))
    with open(data / "annotations.json", encoding="utf-8") as fh:
        anns = json.load(fh)["annotations"]
    rng = np.random.default_rng(seed)
    n = len(anns)
    grid = cfg.backbone.grid
    has_parts = "num_parts" in PSEUDO_SCHEMA.names
    for index, (a, b) in enumerate(shard_ranges(n, shard_size)):
        k = b - a

        def lists(count: int) -> pa.Array:
            lengths = rng.integers(0, count + 1, k)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, grid * grid, offsets[-1]).astype(np.int32)))

        points = pa.table({
            "ann_id": pa.array([anns[i]["id"] for i in range(a, b)], pa.int64()), "grid": pa.array(np.full(k, grid, np.int32)),
            "seed_fg": lists(4), "num_seed_bg": pa.array(rng.integers(0, 60, k).astype(np.int32)),
            "pseudo_fg": lists(48), "pseudo_bg": lists(24), "num_box": pa.array(rng.integers(20, 144, k).astype(np.int32)),
            "seed_bg_extra": lists(6), "valid": pa.array(np.ones(k, bool)),
        }, schema=POINTS_SCHEMA)
        write_shard(points, rf.shard("points", index), key="synthetic")
        cols: dict[str, list] = {name: [] for name in PSEUDO_SCHEMA.names}
        for i in range(a, b):
            ann = anns[i]
            p = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            c = p.mean(0)
            shrunk = (c + 0.9 * (p - c)).reshape(-1).tolist()
            rle = mask_utils.merge(mask_utils.frPyObjects([shrunk], IMAGE_H, IMAGE_W))
            score = float(rng.uniform(0.3, 1.0))
            for key, value in (("ann_id", ann["id"]), ("image_id", ann["image_id"]), ("category_id", ann["category_id"]),
                               ("height", IMAGE_H), ("width", IMAGE_W), ("rle_counts", rle["counts"].decode("ascii")),
                               ("area", int(mask_utils.area(rle))), ("score", score), ("certainty", score),
                               ("point_agreement", score), ("num_parts", 1), ("generator_score", score),
                               ("box_fit", score), ("point_reach", score), ("refine_agreement", float("nan")),
                               ("generator_rle_counts", rle["counts"].decode("ascii"))):
                if key in cols:
                    cols[key].append(value)
        write_shard(pa.table(cols, schema=PSEUDO_SCHEMA), rf.shard("pseudo", index), key="synthetic")
    store = FixesStore(run)
    for j, i in enumerate(rng.choice(n, min(N_FIXES, n), replace=False)):
        ann = anns[int(i)]
        x, y, w, h = ann["bbox"]
        box = mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], IMAGE_H, IMAGE_W)
        rle = mask_utils.merge(box)
        decision = "reject" if j % 10 == 0 else "accept"
        store.append(FixRecord(ann_id=int(ann["id"]), decision=decision, user="bench", clicks=[[x + 1, y + 1, True]],
                               rle=None if decision == "reject" else {"size": rle["size"], "counts": rle["counts"].decode()}))


# --- the stages (each run in its own process by the parent) ----------------------------
def run_stage(stage: str, data: Path, run: Path, shard_size: int) -> dict[str, Any]:
    """Run one stage in this process; returns {"seconds": wall time of the stage itself, ...}."""
    from exits.run_folder import RunFolder
    from exits.stages.shards import shard_ranges

    cfg = _config(shard_size)
    rf = RunFolder(run)
    ann = data / "annotations.json"
    images = data / "images"
    extra: dict[str, Any] = {}
    if stage == "setup":
        t0 = time.perf_counter()
        setup_run(data, run, shard_size)
        return {"seconds": time.perf_counter() - t0}
    if stage in ("retrieval_shard", "pseudo_shard"):
        ranges = shard_ranges(rf.num_instances(), shard_size)
        index = len(ranges) // 2  # a middle shard: its rows are not at the start of the table
        a, b = ranges[index]
        extra = {"shard": index, "rows": b - a}
        import torch

        torch.set_num_threads(2)
    # the stage's imports first (torch, prefect): its own time and memory growth is what counts
    if stage in ("prepare", "retrieval_shard", "pseudo_shard", "baseline"):
        from exits.pipeline import stage_prepare, stage_pseudo_shard, stage_retrieval_shard
    if stage in ("plan", "baseline"):
        from flows.caching import folder_fingerprint
    if stage == "queue":
        import exits.spotfix.app  # noqa: F401  (the server's imports: fastapi, cv2)
        from fastapi.testclient import TestClient  # noqa: F401
    if stage == "export":
        from exits.spotfix.export import run_export
    if stage == "merge_points":
        from exits.stages.point_retrieval import merge_points
    if stage == "merge":
        from exits.stages.pseudo_labels import merge_pseudo_labels
    if stage == "report":
        from exits.stages.report import write_report
    if stage == "report_in_memory":
        from exits.report.build import build_report_in_memory

    rss_before = _rss_mb()
    t0 = time.perf_counter()
    if stage == "baseline":
        pass
    elif stage == "prepare":
        extra = stage_prepare(cfg, ann, images, run, progress=False)
    elif stage == "plan":
        ranges = shard_ranges(rf.num_instances(), shard_size)
        folder_fingerprint(images)
        extra = {"shards": len(ranges)}
    elif stage == "retrieval_shard":
        stage_retrieval_shard(cfg, images, rf, a, b, rf.shard("points", index), torch.device("cpu"), key="bench")
    elif stage == "pseudo_shard":
        # the measured shard reads points.parquet (made by merge_points) like a real run
        stage_pseudo_shard(cfg, images, rf, a, b, rf.shard("pseudo", index), torch.device("cpu"), key="bench")
    elif stage == "merge_points":
        n = len(shard_ranges(rf.num_instances(), shard_size))
        merge_points([rf.shard("points", i) for i in range(n)], rf.points)
    elif stage == "merge":
        n = len(shard_ranges(rf.num_instances(), shard_size))
        merge_pseudo_labels([rf.shard("pseudo", i) for i in range(n)], ann, run)
    elif stage in ("report", "report_in_memory"):
        report = write_report if stage == "report" else build_report_in_memory
        cpu0 = time.process_time()
        summary = report(run, gt=ann, publish=False, peer_sample=0)
        # CPU seconds (all threads): what the wall time would be on a quiet core, under load
        extra = {"miou": summary["all"]["miou"], "evaluated": summary["all"]["count"],
                 "retrieval": "retrieval" in summary, "cpu_seconds": round(time.process_time() - cpu0, 2)}
    elif stage == "export":
        counts = run_export(run).counts
        extra = {"accepted": counts.accepted, "rejected": counts.rejected, "objects_out": counts.objects_out,
                 "own_peak_rss_mb": own_peak_rss_mb()}
    elif stage == "queue":
        extra = measure_queue_api(run)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return {"seconds": time.perf_counter() - t0, "rss_after_imports_mb": rss_before, **extra}


# --- the spot-fix queue as a server answers it -------------------------------------------
# /api/queue requests of the measured queue stage: (label, query); first page = limit 500 (the page's default)
QUEUE_REQUESTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("todo", {}),
    ("all", {"status": "all"}),
    ("category", {"category_id": 1}),
    ("separated", {"separated": "true"}),
    ("score_range", {"min_score": 0.5, "max_score": 0.6}),
    ("decided", {"status": "decided"}),
    ("category_score_todo", {"category_id": 2, "min_score": 0.4, "separated": "false"}),
    ("deep_page", {"status": "all"}),  # offset: half the objects (set when measured)
)
QUEUE_REPEATS = 7
QUEUE_THUMBS = 100  # thumbnails of the first page fetched after the queue requests


class _NoEditor:
    """The app needs an editor; the queue benchmark never calls it."""

    def prepare(self, ann_id: int) -> None:
        pass

    def predict(self, ann_id, clicks, prev_mask):
        raise NotImplementedError


def measure_queue_api(run: Path) -> dict[str, Any]:
    """The spot-fix server on ``run``: catalog load, then ``/api/queue`` first pages (limit 500)
    through the app (FastAPI TestClient, in this process): the first request of each filter
    (cold) and the median of ``QUEUE_REPEATS`` more (warm), plus this process's RSS after
    the catalog load and after the requests and its own peak (:func:`own_peak_rss_mb`)."""
    from statistics import median

    from fastapi.testclient import TestClient

    from exits.spotfix.app import create_app
    from exits.spotfix.catalog import RunCatalog

    t0 = time.perf_counter()
    catalog = RunCatalog.load(run)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    n = len(catalog.objects)
    out: dict[str, Any] = {"objects": n, "catalog_load_seconds": round(load_s, 3), "rss_after_load_mb": rss_loaded,
                           "requests": {}}
    with TestClient(create_app(run, _NoEditor(), user="bench", catalog=catalog)) as client:
        for label, query in QUEUE_REQUESTS:
            params = dict(query)
            if label == "deep_page":
                params["offset"] = n // 2  # a page in the middle of the whole queue
            times, body = [], None
            for _ in range(1 + QUEUE_REPEATS):
                t = time.perf_counter()
                r = client.get("/api/queue", params=params)
                times.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"/api/queue {params}: {r.status_code} {r.text[:200]}")
                body = r.json()
            out["requests"][label] = {"params": params, "cold_ms": round(1000 * times[0], 1),
                                      "warm_median_ms": round(1000 * median(times[1:]), 1),
                                      "total": body["total"], "items": len(body["items"]),
                                      "first": [i["ann_id"] for i in body["items"][:3]]}
        # what the page asks next: the first page's thumbnails (object, pseudo mask, image crop)
        items = client.get("/api/queue", params={"status": "all", "limit": QUEUE_THUMBS}).json()["items"]
        times = []
        for item in items:
            t = time.perf_counter()
            if client.get(item["thumb_url"]).status_code != 200:
                raise RuntimeError(f"{item['thumb_url']} failed")
            times.append(time.perf_counter() - t)
        out["thumbs"] = {"count": len(times), "median_ms": round(1000 * median(times), 1),
                         "total_s": round(sum(times), 2)}
    out["first"] = out["requests"]["all"]["first"]
    out["first_page_seconds"] = round(load_s + out["requests"]["todo"]["cold_ms"] / 1000, 3)
    out["rss_after_requests_mb"] = _rss_mb()
    out["own_peak_rss_mb"] = own_peak_rss_mb()
    return out


def own_peak_rss_mb() -> float:
    """This process's own peak RSS (MiB): VmHWM of its address space. ``os.wait4``'s
    ``ru_maxrss`` of a child is at least the *parent's* peak when it was spawned (Linux keeps
    the high-water mark across fork/vfork + exec), so a small stage run after the parent
    generated a full-size dataset reads the parent's peak there, not its own."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _rss_mb() -> float:
    """This process's resident set size now (MiB), from /proc."""
    with open("/proc/self/statm") as fh:
        return round(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _stage_subprocess(stage: str, data: Path, run: Path, shard_size: int) -> dict[str, Any]:
    """Run ``stage`` in a child process; its own peak RSS from ``os.wait4``'s rusage."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", stage, "--data", str(data), "--run", str(run),
                             "--shard-size", str(shard_size)], stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}) on {data}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
    result["seconds"] = round(result["seconds"], 2)
    return result


def run_scale(kind: str, scale: float, work: Path, shard_size: int = 256, stages: tuple[str, ...] = STAGES,
              log=print, in_process: bool = False) -> dict[str, Any]:
    """Generate the dataset, set up the run folder, and measure every stage in its own process
    (``in_process``: call the stages here instead, no RSS: the test-suite version)."""
    def measure(stage: str) -> dict[str, Any]:
        if in_process:
            return run_stage(stage, data, run, shard_size)
        return _stage_subprocess(stage, data, run, shard_size)

    data = work / f"{kind}-{scale:g}" / "data"
    run = work / f"{kind}-{scale:g}" / "run"
    t0 = time.perf_counter()
    counts = generate_dataset(data, kind, scale)
    gen_s = time.perf_counter() - t0
    out: dict[str, Any] = {"dataset": kind, "scale": scale, **counts, "shard_size": shard_size,
                           "generate_seconds": round(gen_s, 1), "stages": {}}
    log(f"[{kind} x{scale:g}] {counts['objects']} objects, {counts['images']} images, json "
        f"{counts['json_bytes'] / 2**20:.0f} MB ({gen_s:.0f} s)")
    first = [s for s in stages if s in ("baseline", "prepare", "plan")]
    rest = [s for s in stages if s not in first]
    for stage in first:
        out["stages"][stage] = measure(stage)
        log(f"  {stage:16s} {out['stages'][stage]}")
    if rest:
        out["setup"] = measure("setup")
        log(f"  {'setup':16s} {out['setup']}")
    for stage in ("merge_points", *[s for s in rest if s != "merge_points"]):  # pseudo shard reads points.parquet
        if stage in rest:
            out["stages"][stage] = measure(stage)
            log(f"  {stage:16s} {out['stages'][stage]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["coco", "lvis"], choices=sorted(SIZES))
    ap.add_argument("--scales", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES + EXTRA_STAGES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/exits_scale"))
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/scale.json (scale_full.json with --full)")
    ap.add_argument("--full", action="store_true", help="the whole `exits run` + report + export + queue through the CLI "
                    "on a dataset with images (bench/scale_full_run.py)")
    ap.add_argument("--kill-in", nargs=2, metavar=("STAGE", "SECONDS"), help="--full: SIGKILL the run this far into "
                    "STAGE, then measure the re-run")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="--full: `exits run --set` values")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        result = run_stage(args.child, args.data, args.run, args.shard_size)
        print(json.dumps(result, default=str))
        return
    if args.full:
        from bench.scale_full_run import RESULTS as FULL_RESULTS, main_full

        kill = (args.kill_in[0], float(args.kill_in[1])) if args.kill_in else None
        main_full(args.scales, args.work / "full", args.out or FULL_RESULTS, kill_in=kill,
                  overrides=tuple(args.overrides))
        return
    args.out = args.out or RESULTS
    from exits.io import write_json

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows = {(r["dataset"], r["scale"]): r for r in previous.get("rows", [])}
    for kind in args.datasets:
        for scale in args.scales:
            load = os.getloadavg()[0]
            row = run_scale(kind, scale, args.work, args.shard_size, tuple(args.stages))
            row["loadavg_1min_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            rows[(kind, scale)] = row
            write_json(args.out, {"benchmark": "per-stage wall time and own peak RSS (os.wait4), 2 threads",
                                  "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                  "rows": sorted(rows.values(), key=lambda r: (r["dataset"], r["scale"]))}, indent=1)


if __name__ == "__main__":
    main()
