"""Recompute stage 1d and the report of finished runs with the current code, nothing else.

    python bench/refresh_pseudo.py RUN [RUN ...] [--gt GT_JSON]

For runs made before a change to stage 1d's outputs (e.g. the generator's own mask that the
report's parts table reads, issue 28): the run's trained generator and points table are
used as they are (no training, no retrieval), every object is one shard computed in this
process, merged into the run's pseudo_labels.json / .parquet, and the report rebuilt
(``exits.pipeline.stage_report``: the run config's eval settings, GT from run.json or
``--gt``). A run whose new masks differ from its old ones is reported (the code changed
what stage 1d computes, not only what it stores).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.config import load_config  # noqa: E402
from exits.pipeline import stage_pseudo_shard, stage_report  # noqa: E402
from exits.run_folder import RunFolder  # noqa: E402
from exits.stages.pseudo_labels import merge_pseudo_labels  # noqa: E402


def refresh(workdir: Path, gt: Path | None) -> dict:
    run = RunFolder(workdir)
    cfg = load_config(str(run.config))
    meta = json.loads(run.run_meta.read_text())
    images, annotations = Path(meta["images"]), Path(meta["annotations"])
    old = pq.read_table(run.pseudo_parquet, columns=["ann_id", "rle_counts"]).to_pydict()
    old_rle = dict(zip(old["ann_id"], old["rle_counts"]))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=run.root) as tmp:
        shard = stage_pseudo_shard(cfg, images, run, 0, run.num_instances(), Path(tmp) / "pseudo.parquet",
                                   torch.device("cpu"))
        new = pq.read_table(shard, columns=["ann_id", "rle_counts"]).to_pydict()
        merge_pseudo_labels([shard], annotations, run.root)
    changed = sum(old_rle.get(a) != r for a, r in zip(new["ann_id"], new["rle_counts"]))
    summary = stage_report(cfg, run.root, gt or (Path(meta["gt"]) if meta.get("gt") else annotations))
    return {"run": str(workdir), "objects": len(new["ann_id"]), "masks_changed": changed,
            "seconds": round(time.perf_counter() - t0, 1), "parts": bool(summary and summary.get("parts"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--gt", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for workdir in args.runs:
        print(refresh(workdir, args.gt), flush=True)


if __name__ == "__main__":
    main()
