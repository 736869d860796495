"""Triage: does the mask score find the bad masks? (project issue 28, item 3)

    python bench/bench_triage.py RUN [RUN ...] [--out bench/results/triage.json]

For each finished run folder (``exits run`` with GT masks, so ``report/metrics.parquet``
holds every object's IoU), stage 1d is computed again in this process with the run's own
config and trained generator (every row, one shard), so the scores are those of the current
code even when the run's cached shards are older. Its masks must equal the run's (checked:
the IoU of ``metrics.parquet`` is then the IoU of these masks). Per run and per signal:

  spearman        Spearman rho of the signal vs the mask's IoU (floor 0.6 for ``score``)
  worst10_caught  share of the 10 % worst masks by IoU that are among the 10 % lowest
                  signals (floor 0.5): what a reviewer with a 10 % budget finds

Signals: ``score`` (the triage score the queue uses), its parts ``box_fit``, ``point_reach``,
``refine_agreement``, and the generator's own ``generator_score`` (the old queue order).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.config import load_config  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.pipeline import stage_pseudo_shard  # noqa: E402
from exits.run_folder import RunFolder  # noqa: E402

SIGNALS = ("score", "generator_score", "box_fit", "point_reach", "refine_agreement")
WORST = 0.1


def ranking_quality(signal: np.ndarray, iou: np.ndarray, worst: float = WORST) -> dict[str, float]:
    """Spearman rho of ``signal`` vs ``iou`` and the share of the ``worst`` fraction by IoU
    found among the same number of lowest signals (ties broken by position, stable)."""
    k = max(1, round(worst * len(iou)))
    bad = set(np.argsort(iou, kind="stable")[:k].tolist())
    low = set(np.argsort(signal, kind="stable")[:k].tolist())
    return {"spearman": round(float(spearmanr(signal, iou).statistic), 4), "worst10_caught": round(len(bad & low) / k, 4)}


def evaluate_run(workdir: Path) -> dict:
    run = RunFolder(workdir)
    cfg = load_config(str(run.root / "config.yaml"))
    images = Path(json.loads((run.root / "run.json").read_text())["images"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shard = stage_pseudo_shard(cfg, images, run, 0, run.num_instances(), Path(tmp) / "pseudo.parquet",
                                   torch.device("cpu"))
        fresh = pq.read_table(shard).to_pydict()
    seconds = time.perf_counter() - t0
    old = pq.read_table(run.root / "pseudo_labels.parquet", columns=["ann_id", "rle_counts"]).to_pydict()
    old_rle = dict(zip(old["ann_id"], old["rle_counts"]))
    same = sum(old_rle.get(a) == r for a, r in zip(fresh["ann_id"], fresh["rle_counts"]))
    if same != len(fresh["ann_id"]):
        raise SystemExit(f"{workdir}: {len(fresh['ann_id']) - same} masks differ from the run's: its IoUs do not apply")
    met = pq.read_table(run.root / "report" / "metrics.parquet", columns=["ann_id", "iou", "separated"]).to_pydict()
    iou_of = {a: v for a, v in zip(met["ann_id"], met["iou"]) if v is not None}
    rows = [i for i, a in enumerate(fresh["ann_id"]) if a in iou_of]
    iou = np.asarray([iou_of[fresh["ann_id"][i]] for i in rows])
    out = {"run": str(workdir), "config": cfg.name, "refine_at": cfg.pseudo.refine_at, "objects": len(rows),
           "miou": round(float(iou.mean()) * 100, 2), "stage_1d_seconds": round(seconds, 1), "signals": {}}
    for name in SIGNALS:
        values = np.asarray([fresh[name][i] for i in rows], dtype=np.float64)
        if not np.isfinite(values).any():
            continue
        out["signals"][name] = ranking_quality(np.nan_to_num(values, nan=float(np.nanmean(values))), iou)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "triage.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = []
    for workdir in args.runs:
        r = evaluate_run(workdir)
        results.append(r)
        print(f"{workdir}: {r['objects']} objects, mIoU {r['miou']}")
        for name, q in r["signals"].items():
            print(f"  {name:18s} spearman {q['spearman']:+.3f}  worst 10 % caught {q['worst10_caught']:.2f}")
    write_json(args.out, {"benchmark": "triage", "worst_fraction": WORST, "runs": results}, indent=1)


if __name__ == "__main__":
    main()
