"""A COCO-sized run start to finish through the CLI: ``bench/bench_scale.py --full``.

    .venv/bin/python bench/bench_scale.py --full --scales 0.01 0.1 1 [--work /tmp/exits_full]

For each scale it makes a synthetic COCO train2017-sized dataset *with images* (118,287 x
scale small JPEGs, 160 x 120, each with its objects drawn as filled convex polygons in
distinct colours on a shaded background; 860,001 x scale objects in 80 categories with
extreme points and the polygon as GT mask), then runs, each as its own process the way a
user types it (console script, fresh ``PREFECT_HOME``, no Prefect server configured):

    exits run -i IMAGES -a ANNOTATIONS -w RUN -c scale-smoke   every stage, the temporary
                                                             Prefect server, the report
    exits report -w RUN                                      the report again, alone
    exits export -w RUN                                      after 1,000 fixes are appended
    the spot-fix queue                                       bench_scale.measure_queue_api

While a command runs, its process tree is sampled every ``SAMPLE_S`` seconds (psutil): the
RSS of every process, and its VmHWM (kernel high-water mark, so a spike between samples is
not missed), and every 4th sample its USS (private pages: what the process adds beside the
others; RSS counts the shared library pages of torch & co. in every process), attributed to
the stage that was running (from the ``for flow 'exits-...'``
lines Prefect logs) and to the process's kind (the flow process, the Prefect server,
DataLoader workers, the forkserver, Dask workers). Stage wall times are ``run_summary.json``'s
``seconds``; rate = objects / seconds. The CPU seconds (user + system) of the whole tree
between samples are attributed the same way: objects per CPU second is the figure that does
not depend on what else the machine was running. Results: ``bench/results/scale_full.json``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO = {"images": 118_287, "objects": 860_001, "categories": 80}
IMAGE_W, IMAGE_H = 160, 120
SAMPLE_S = 0.5
USS_EVERY = 4  # USS (pages no other process shares: what adding this process costs) every 4th sample
N_FIXES = 1000
CONFIG = "scale-smoke"
RESULTS = ROOT / "bench" / "results" / "scale_full.json"
# flow name (as Prefect logs it) -> stage name of run_summary.json
FLOW_STAGES = {"exits-pipeline": "startup", "exits-prepare-instances": "prepare",
               "exits-train-similarity": "similarity", "exits-retrieve-points": "retrieval",
               "exits-train-generator": "generator", "exits-pseudo-labels": "pseudo_labels",
               "exits-report": "report", "exits-train-detector": "detector"}
_FLOW_LINE = re.compile(r"for flow '([\w-]+)'")


# --- the dataset ---------------------------------------------------------------------------
def object_geometry(rng: np.random.Generator, n: int, width: int = IMAGE_W,
                    height: int = IMAGE_H, min_size: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (n, 4) [x, y, w, h], extreme points (n, 4, 2) top/left/bottom/right on the box
    edges and an 8-vertex convex polygon (n, 8, 2) through them (its mask is the GT mask).

    The polygon's other vertices lie halfway between the midpoint of two neighbouring extreme
    points and the box corner between them: v = (a + b) / 4 + corner / 2."""
    w = rng.integers(min_size, width // 2, n)
    h = rng.integers(min_size, height // 2, n)
    x = rng.integers(0, width - w + 1)
    y = rng.integers(0, height - h + 1)
    f = rng.uniform(0.3, 0.7, (n, 4))
    x1, y1 = x + w - 1, y + h - 1
    top = np.stack([np.round(x + f[:, 0] * (w - 1)), y], 1)
    left = np.stack([x, np.round(y + f[:, 1] * (h - 1))], 1)
    bottom = np.stack([np.round(x + f[:, 2] * (w - 1)), y1], 1)
    right = np.stack([x1, np.round(y + f[:, 3] * (h - 1))], 1)
    corners = [np.stack(c, 1).astype(np.float64) for c in ((x, y), (x, y1), (x1, y1), (x1, y))]
    mids = [(a + b) / 4 + c / 2 for a, b, c in ((top, left, corners[0]), (left, bottom, corners[1]),
                                                 (bottom, right, corners[2]), (right, top, corners[3]))]
    poly = np.stack([top, mids[0], left, mids[1], bottom, mids[2], right, mids[3]], 1).astype(np.float64)
    return np.stack([x, y, w, h], 1), np.stack([top, left, bottom, right], 1).astype(np.float64), poly


def _draw_images(folder: str, first: int, count: int, polys: np.ndarray, image_of: np.ndarray,
                 colours: np.ndarray, seed: int) -> int:
    """Images ``first .. first+count-1`` (0-based): shaded background, objects drawn in order
    (later objects occlude earlier ones), mild noise; JPEG quality 90. Returns bytes written."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, first])
    ramp = np.linspace(0.0, 1.0, IMAGE_W, dtype=np.float32)[None, :, None]
    bounds = np.searchsorted(image_of, np.arange(first, first + count + 1))
    written = 0
    for k in range(count):
        c0, c1 = rng.uniform(40, 215, (2, 3)).astype(np.float32)
        background = (c0 + (c1 - c0) * ramp) * np.ones((IMAGE_H, 1, 1), np.float32)
        img = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for j in range(bounds[k], bounds[k + 1]):
            draw.polygon([tuple(p) for p in polys[j]], fill=tuple(int(v) for v in colours[j]))
        pixels = np.asarray(img, np.int16) + rng.integers(-6, 7, (IMAGE_H, IMAGE_W, 3), dtype=np.int16)
        path = Path(folder) / f"{first + k + 1:012d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        written += path.stat().st_size
    return written


def generate_image_dataset(out: Path, scale: float, *, images: int | None = None, objects: int | None = None,
                           seed: int = 0, workers: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``out/images/*.jpg`` and ``out/annotations.json`` (COCO train2017 x ``scale``, or
    ``images`` / ``objects`` given); reuses a finished dataset (``out/counts.json``)."""
    n_img = images or max(1, round(COCO["images"] * scale))
    n_obj = objects or max(1, round(COCO["objects"] * scale))
    done = out / "counts.json"
    if done.is_file():
        counts = json.loads(done.read_text())
        if (counts["images"], counts["objects"], counts["seed"]) == (n_img, n_obj, seed):
            return counts
    from exits.io import write_json

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    image_of = rng.integers(0, n_img, n_obj)  # annotations in random image order, as in COCO
    cats = rng.integers(1, COCO["categories"] + 1, n_obj)
    boxes, pts, poly = object_geometry(rng, n_obj)
    colours = rng.integers(0, 256, (n_obj, 3))
    order = np.argsort(image_of, kind="stable")  # objects grouped by image for drawing
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    chunk = 2000
    jobs = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        bounds = np.searchsorted(image_of[order], np.arange(0, n_img + chunk, chunk).clip(max=n_img))
        for c, first in enumerate(range(0, n_img, chunk)):
            sel = order[bounds[c]:bounds[c + 1]]
            jobs.append(pool.submit(_draw_images, str(folder), first, min(chunk, n_img - first), poly[sel],
                                    image_of[sel], colours[sel], seed))
        image_bytes = sum(j.result() for j in jobs)
    images_s = time.perf_counter() - t0
    tmp = out / "annotations.json.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"info": {"description": "synthetic COCO-sized with images (scale %g)"}, "licenses": [], "images": [' % scale)
        fh.write(",".join(json.dumps({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": IMAGE_W,
                                      "height": IMAGE_H}) for i in range(n_img)))
        fh.write('], "categories": [')
        fh.write(",".join(json.dumps({"id": c, "name": f"cat{c}", "supercategory": "thing"})
                          for c in range(1, COCO["categories"] + 1)))
        fh.write('], "annotations": [')
        for i in range(n_obj):
            fh.write(("," if i else "") + json.dumps({
                "id": i + 1, "image_id": int(image_of[i]) + 1, "category_id": int(cats[i]), "iscrowd": 0,
                "bbox": [float(v) for v in boxes[i]], "area": float(boxes[i, 2] * boxes[i, 3]) * 0.75,
                "segmentation": [[round(float(v), 2) for v in poly[i].reshape(-1)]],
                "extreme_points": pts[i].tolist()}))
        fh.write("]}")
    os.replace(tmp, out / "annotations.json")
    counts = {"images": n_img, "objects": n_obj, "categories": COCO["categories"], "seed": seed,
              "image_size": [IMAGE_W, IMAGE_H], "images_bytes": image_bytes,
              "json_bytes": (out / "annotations.json").stat().st_size,
              "images_seconds": round(images_s, 1), "generate_seconds": round(time.perf_counter() - t0, 1)}
    write_json(done, counts, indent=1)
    log(f"dataset {out}: {n_img} images ({image_bytes / 2**20:.0f} MB), {n_obj} objects ({counts['generate_seconds']} s)")
    return counts


# --- measuring a command's process tree -----------------------------------------------------
def _hwm_mb(pid: int) -> float:
    """VmHWM (peak RSS of the process so far, MiB) from /proc; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_kind(proc: Any, root_pid: int, forkservers: set[int]) -> str:
    """What a process of the tree is: ``flow`` (the command itself), ``prefect_server``,
    ``forkserver``, ``dataloader_worker`` (a child of the forkserver), ``dask_worker``,
    ``resource_tracker``, or the program name."""
    if proc.pid == root_pid:
        return "flow"
    cmd = " ".join(proc.cmdline())
    if "uvicorn" in cmd or "prefect" in cmd and "server" in cmd:
        return "prefect_server"
    if "forkserver" in cmd and proc.ppid() == root_pid:
        forkservers.add(proc.pid)
        return "forkserver"
    if proc.ppid() in forkservers:
        return "dataloader_worker"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "distributed" in cmd or "dask" in cmd:
        return "dask_worker"
    if "multiprocessing" in cmd:
        return "mp_worker"
    return Path(proc.cmdline()[0]).name if proc.cmdline() else "?"


class TreeSampler:
    """Samples a process tree until the root exits: per (stage, kind) the peak RSS of any one
    process and of the tree's sum, per process its VmHWM. ``stage`` is set by the caller."""

    def __init__(self, root_pid: int, interval: float = SAMPLE_S):
        import psutil

        self.root = psutil.Process(root_pid)
        self.interval, self.stage = interval, "startup"
        self.kinds: dict[int, str] = {}
        self.hwm: dict[int, float] = {}
        self.first_stage: dict[int, str] = {}
        self.peak: dict[str, dict[str, float]] = {}  # stage -> kind -> MiB
        self.tree_peak: dict[str, float] = {}
        self.uss_peak: dict[str, dict[str, float]] = {}  # stage -> kind -> MiB (private pages, every USS_EVERY-th sample)
        self.cpu_s: dict[str, float] = {}  # stage -> CPU seconds (user + system) of the whole tree
        self._cpu_seen: dict[int, float] = {}
        self.samples = 0
        self._forkservers: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total, stage = 0.0, self.stage
            for p in procs:
                try:  # a process that exits before it is read once is not listed
                    kind = self.kinds.get(p.pid) or process_kind(p, self.root.pid, self._forkservers)
                    rss = p.memory_info().rss / 2**20
                    cpu = sum(p.cpu_times()[:2])
                except psutil.Error:
                    continue
                if p.pid not in self.kinds:
                    self.kinds[p.pid], self.first_stage[p.pid] = kind, stage
                # CPU time since the last sample belongs to this stage (load-independent cost)
                self.cpu_s[stage] = self.cpu_s.get(stage, 0.0) + cpu - self._cpu_seen.get(p.pid, 0.0)
                self._cpu_seen[p.pid] = cpu
                hwm = max(_hwm_mb(p.pid), rss)  # 0 from /proc when it just exited
                # a high-water mark that rose since the last sample was reached in this stage
                value = max(rss, hwm) if hwm > self.hwm.get(p.pid, 0.0) else rss
                self.hwm[p.pid] = max(self.hwm.get(p.pid, 0.0), hwm)
                by_kind = self.peak.setdefault(stage, {})
                by_kind[kind] = round(max(by_kind.get(kind, 0.0), value), 1)
                if self.samples % USS_EVERY == 0:
                    try:
                        uss = p.memory_full_info().uss / 2**20
                    except psutil.Error:
                        uss = 0.0
                    by_kind = self.uss_peak.setdefault(stage, {})
                    by_kind[kind] = round(max(by_kind.get(kind, 0.0), uss), 1)
                total += rss
            self.tree_peak[stage] = round(max(self.tree_peak.get(stage, 0.0), total), 1)
            self.samples += 1
            self._stop.wait(self.interval)

    def processes(self) -> list[dict[str, Any]]:
        return [{"pid": pid, "kind": kind, "first_seen_in": self.first_stage[pid], "peak_rss_mb": round(self.hwm.get(pid, 0.0), 1)}
                for pid, kind in self.kinds.items()]


def run_measured(args: list[str], env: dict[str, str], log_path: Path, *, kill_in: tuple[str, float] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``args`` with its process tree sampled; its output goes to ``log_path`` and is
    read for stage changes and progress (ETA) lines. ``kill_in=(stage, s)``: SIGKILL the
    command ``s`` seconds into ``stage`` (the resume test)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8", buffering=1) as out:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                cwd=ROOT, start_new_session=True)
        sampler = TreeSampler(proc.pid).start()
        stage_start: dict[str, float] = {}
        eta_lines: dict[str, int] = {}
        killed = None
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            found = _FLOW_LINE.search(line)
            if found and found.group(1) in FLOW_STAGES:
                sampler.stage = FLOW_STAGES[found.group(1)]
                stage_start[sampler.stage] = time.perf_counter() - t0
                log(f"    {time.perf_counter() - t0:7.1f} s  {sampler.stage}")
            if "ETA" in line:
                eta_lines[sampler.stage] = eta_lines.get(sampler.stage, 0) + 1
            if (kill_in and killed is None and sampler.stage == kill_in[0]
                    and time.perf_counter() - t0 - stage_start[sampler.stage] >= kill_in[1]):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = round(time.perf_counter() - t0, 1)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "killed_at_s": killed,
            "own_peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stage_started_at_s": stage_start,
            "eta_lines": eta_lines, "peak_rss_mb": sampler.peak, "cpu_s": {k: round(v, 1) for k, v in sampler.cpu_s.items()}, "tree_peak_rss_mb": sampler.tree_peak, "peak_uss_mb": sampler.uss_peak,
            "processes": sampler.processes(), "samples": sampler.samples}


def exits_command() -> list[str]:
    script = Path(sys.executable).with_name("exits")
    return [str(script)] if script.exists() else [sys.executable, "-m", "exits.cli"]


def user_env(home: Path) -> dict[str, str]:
    """The environment a user's shell gives ``exits``: no PREFECT_* settings but a new home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def append_fixes(run: Path, n: int, seed: int = 0) -> int:
    """``n`` spot-fix decisions (1 in 10 a rejection, the rest the object's box accepted)."""
    import pyarrow.parquet as pq
    import pycocotools.mask as mask_utils

    from exits.run_folder import RunFolder
    from exits.spotfix.store import FixesStore, FixRecord

    table = pq.read_table(RunFolder(run).instances, columns=["ann_id", "bbox", "width", "height"])
    rng = np.random.default_rng(seed)
    store = FixesStore(run)
    rows = rng.choice(table.num_rows, min(n, table.num_rows), replace=False)
    for j, i in enumerate(rows):
        ann, (x, y, w, h) = int(table["ann_id"][i].as_py()), table["bbox"][i].as_py()
        hh, ww = table["height"][i].as_py(), table["width"][i].as_py()
        rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], hh, ww))
        reject = j % 10 == 0
        store.append(FixRecord(ann_id=ann, decision="reject" if reject else "accept", user="bench",
                               clicks=[[x + 1, y + 1, True]],
                               rle=None if reject else {"size": rle["size"], "counts": rle["counts"].decode()}))
    return len(rows)


# --- one scale, start to finish --------------------------------------------------------------
def _stage_rows(summary: dict[str, Any], measured: dict[str, Any], objects: int) -> dict[str, Any]:
    """Per stage of run_summary.json: seconds, objects/s, peak RSS (MiB) per process kind and of
    the whole tree, progress (ETA) lines logged."""
    rows = {}
    # startup: command start -> first stage (imports, Prefect's temporary server, run files)
    seconds_of = {"startup": measured["stage_started_at_s"].get("prepare"), **summary["seconds"]}
    for stage, seconds in seconds_of.items():
        seconds = round(seconds, 1) if seconds is not None else None
        rows[stage] = {"seconds": seconds, "objects_per_s": round(objects / seconds, 1) if seconds else None,
                       "peak_rss_mb": measured["peak_rss_mb"].get(stage, {}),
                       "tree_peak_rss_mb": measured["tree_peak_rss_mb"].get(stage),
                       "peak_uss_mb": measured["peak_uss_mb"].get(stage, {}),
                       "cpu_s": measured["cpu_s"].get(stage),
                       "objects_per_cpu_s": round(objects / measured["cpu_s"][stage], 1) if measured["cpu_s"].get(stage) else None,
                       "eta_lines": measured["eta_lines"].get(stage, 0)}
    return rows


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_full(scale: float, work: Path, *, images: int | None = None, objects: int | None = None,
             overrides: tuple[str, ...] = (), kill_in: tuple[str, float] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate the dataset at ``scale`` and run every command on it (see the module
    docstring); returns the measurements. ``overrides``: ``--set`` values for ``exits run``.
    ``kill_in=(stage, s)``: first SIGKILL a run ``s`` seconds into ``stage``, then measure
    the re-run of the same command (which must finish only what is missing)."""
    import shutil

    sys.path.insert(0, str(ROOT))
    from bench.bench_scale import _stage_subprocess

    tag = f"coco-{scale:g}" if images is None else f"coco-{images}img"
    base = work / tag
    data, run, home = base / "data", base / "run", base / "prefect-home"
    counts = generate_image_dataset(data, scale, images=images, objects=objects, log=log)
    for stale in (run, home):
        shutil.rmtree(stale, ignore_errors=True)
    env = user_env(home)
    args = [*exits_command(), "run", "-i", str(data / "images"), "-a", str(data / "annotations.json"),
            "-w", str(run), "-c", CONFIG, *[a for o in overrides for a in ("--set", o)]]
    n = counts["objects"]
    out: dict[str, Any] = {"scale": scale, "config": CONFIG, "overrides": list(overrides), **counts,
                           "loadavg_1min_before": round(os.getloadavg()[0], 2)}
    log(f"[x{scale:g}] exits run: {n} objects, {counts['images']} images")
    if kill_in is not None:
        killed = run_measured(args, env, base / "killed.log", kill_in=kill_in, log=log)
        if killed["killed_at_s"] is None:
            raise RuntimeError(f"the run ended (exit {killed['rc']}) before {kill_in[0]} + {kill_in[1]} s: {base / 'killed.log'}")
        out["killed_run"] = {k: killed[k] for k in ("rc", "wall_s", "killed_at_s", "stage_started_at_s")}
        log(f"  killed at {killed['killed_at_s']} s in {kill_in[0]}; re-running")
    measured = run_measured(args, env, base / "run.log", log=log)
    if measured["rc"] != 0:
        raise RuntimeError(f"exits run failed (exit {measured['rc']}), {base / 'run.log'}:\n{_tail(base / 'run.log')}")
    summary = json.loads((run / "run_summary.json").read_text())
    out["run"] = {"wall_s": measured["wall_s"], "summary_objects": summary["objects"],
                  "tasks": summary["tasks"], "miou_all": summary.get("miou_all"),
                  "shards": -(-n // int(_config_value(run, "flows", "shard_size"))),
                  "stages": _stage_rows(summary, measured, n), "processes": measured["processes"],
                  "own_peak_rss_mb": measured["own_peak_rss_mb"], "samples": measured["samples"]}
    log(f"  run {measured['wall_s']} s, stages {summary['seconds']}, tasks {summary['tasks']}")
    for name, cmd in (("report", ["report", "-w", str(run), "--peer-sample", "0"]), ("export", ["export", "-w", str(run)])):
        if name == "export":
            out["fixes"] = append_fixes(run, N_FIXES)
        m = run_measured([*exits_command(), *cmd], env, base / f"{name}.log", log=log)
        if m["rc"] != 0:
            raise RuntimeError(f"exits {name} failed (exit {m['rc']}):\n{_tail(base / f'{name}.log')}")
        out[name] = {"wall_s": m["wall_s"], "objects_per_s": round(n / m["wall_s"], 1),
                     "peak_rss_mb": {k: max(v.get(k, 0.0) for v in m["peak_rss_mb"].values())
                                     for k in {k for v in m["peak_rss_mb"].values() for k in v}},
                     "own_peak_rss_mb": m["own_peak_rss_mb"], "cpu_s": round(sum(m["cpu_s"].values()), 1)}
        log(f"  exits {name}: {out[name]}")
    queue = _stage_subprocess("queue", data, run, 2048)
    out["queue"] = {k: queue[k] for k in ("objects", "catalog_load_seconds", "first_page_seconds", "own_peak_rss_mb",
                                          "rss_after_requests_mb", "thumbs")}
    out["queue"]["warm_median_ms"] = {k: v["warm_median_ms"] for k, v in queue["requests"].items()}
    log(f"  queue: {out['queue']}")
    out["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    return out


def _config_value(run: Path, section: str, key: str) -> Any:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())[section][key]


def main_full(scales: list[float], work: Path, out_path: Path = RESULTS, kill_in: tuple[str, float] | None = None,
              overrides: tuple[str, ...] = ()) -> None:
    """``bench_scale.py --full``: :func:`run_full` per scale, each row written as it finishes."""
    import platform

    from exits.io import write_json

    previous = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": []}
    rows = {(r["scale"], "killed_run" in r): r for r in previous.get("rows", [])}
    for scale in scales:
        row = run_full(scale, work, kill_in=kill_in, overrides=overrides)
        rows[(scale, "killed_run" in row)] = row
        write_json(out_path, {"benchmark": "exits run / report / export / spot-fix queue through the CLI on a "
                                           "synthetic COCO-sized dataset with images (bench/scale_full_run.py)",
                              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "rows": sorted(rows.values(), key=lambda r: (r["scale"], "killed_run" in r))}, indent=1)


def markdown_table(path: Path = RESULTS) -> str:
    """docs/benchmarks.md's table from ``scale_full.json``: per stage and scale, wall s, CPU s
    of the process tree and the peak RSS (MiB) of the flow process / of the largest other one."""
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if "killed_run" not in r]
    head = "| stage | " + " | ".join(f"1/{round(1 / r['scale'])} ({r['objects']:,} objects)" if r["scale"] < 1
                                      else f"1 ({r['objects']:,})" for r in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]
    for stage in rows[-1]["run"]["stages"]:
        cells = []
        for r in rows:
            s = r["run"]["stages"].get(stage, {})
            rss = s.get("peak_rss_mb", {})
            other = max((v for k, v in rss.items() if k != "flow"), default=0.0)
            cells.append(f"{s.get('seconds')} s · {s.get('cpu_s')} CPU s · {rss.get('flow', 0):.0f} / {other:.0f} MB")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    for name in ("report", "export"):
        lines.append(f"| `exits {name}` | " + " | ".join(
            f"{r[name]['wall_s']} s · {r[name]['cpu_s']} CPU s · {r[name]['own_peak_rss_mb']:.0f} MB" for r in rows) + " |")
    lines.append("| spot-fix queue (catalog load; first page) | " + " | ".join(
        f"{r['queue']['catalog_load_seconds']} s; {r['queue']['first_page_seconds']} s · {r['queue']['own_peak_rss_mb']:.0f} MB"
        for r in rows) + " |")
    lines.append("| `exits run` wall (peak RSS of the flow process) | " + " | ".join(
        f"{r['run']['wall_s']} s ({r['run']['own_peak_rss_mb']:.0f} MB)" for r in rows) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))
