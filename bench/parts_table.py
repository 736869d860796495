"""The report's parts table over seeds: mean ± sd per split (issue 28, item 1).

    python bench/parts_table.py demo=RUN [demo=RUN ...] holdout=RUN [...] [--out bench/results/parts.json]

Each RUN is a finished run folder whose ``report/summary.json`` has the parts table
(``exits report``; stage 1d of runs made before the generator's own mask was stored must be
recomputed first, e.g. ``bench/bench_stage1.py --refresh-pseudo``). Per split and part
(box, GrabCut, dense-CRF peer, generator's own mask, final mask): mIoU all / separated /
non-separated / per size as mean and sample sd over the runs (seeds), in percent. Box,
GrabCut and the dense-CRF peer do not depend on the seed (their sd is 0 when every run
sampled the same objects). Prints the markdown table docs/benchmarks.md shows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.io import write_json  # noqa: E402
from exits.report.parts import PART_LABELS, PARTS  # noqa: E402

COLUMNS = ("all", "separated", "non_separated", "small", "medium", "large")


def row_values(row: dict) -> dict[str, float | None]:
    """Percent mIoU of one parts row per column (None where the bucket is empty)."""
    out: dict[str, float | None] = {}
    for col in COLUMNS:
        cell = row.get(col) if col in ("all", "separated", "non_separated") else row.get("per_size", {}).get(col)
        out[col] = None if not cell or not cell.get("count") or cell.get("miou") is None else 100 * float(cell["miou"])
    return out


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 2), "sd": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(runs: list[Path]) -> dict:
    per_part: dict[str, dict[str, list[float]]] = {}
    counts = []
    for run in runs:
        parts = json.loads((run / "report" / "summary.json").read_text())["parts"]
        counts.append({"run": str(run), "objects": parts["sample"]["objects"], "separated": parts["sample"]["separated"],
                       "omitted": parts.get("omitted", {})})
        for row in parts["rows"]:
            for col, v in row_values(row).items():
                if v is not None:
                    per_part.setdefault(row["part"], {}).setdefault(col, []).append(v)
    return {"runs": counts,
            "parts": {p: {c: mean_sd(v) for c, v in cols.items()} for p, cols in per_part.items()}}


def markdown(result: dict) -> str:
    lines = ["| split | part | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for split, res in result["splits"].items():
        n = len(res["runs"])
        for part in PARTS:
            cols = res["parts"].get(part)
            if not cols:
                continue
            cells = [f"{cols[c]['mean']:.1f} ± {cols[c]['sd']:.1f}" if c in cols else "–" for c in COLUMNS]
            lines.append(f"| {split} ({n} seeds) | {PART_LABELS[part]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="SPLIT=RUN_FOLDER")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parts.json")
    args = ap.parse_args()
    by_split: dict[str, list[Path]] = {}
    for item in args.runs:
        split, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected SPLIT=RUN_FOLDER")
        by_split.setdefault(split, []).append(Path(path))
    result = {"benchmark": "parts", "splits": {s: aggregate(r) for s, r in by_split.items()}}
    write_json(args.out, result, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
