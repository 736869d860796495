"""In-domain vs out-of-domain click editing against GrabCut (issue 28, item 5): the table.

    python bench/clicks_domain_table.py LABEL=RESULT.json [...] [--protocol pseudo]
        [--out bench/results/clicks_domain.json]

Each RESULT is a ``bench/bench_clicks.py`` output (its ``full`` rows: one model per seed,
evaluated with GrabCut on the same objects and clicks). LABEL names the evaluation data and
the photographs of the generated training objects, e.g. ``holdout/ood`` for a run on the
holdout variant whose click model trained on objects cut from the demo photographs. Per
label: click model and GrabCut, mean ± sd over seeds of NoC@85/90, NoF@85/90 and
mIoU@1/3/5 (GrabCut does not depend on the click model's seed), and whether the click
model needs fewer clicks at 85 % and 90 % and fails no more often (the issue's bar).
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

KEYS = ("NoC@85", "NoC@90", "NoF@85", "NoF@90", "mIoU@1", "mIoU@3", "mIoU@5")


def summarize(result: dict, protocol: str) -> dict:
    out: dict = {"seeds": sorted(result.get("full", {}), key=int)}
    for method in ("click_model", "grabcut"):
        rows = [r["protocols"][protocol][method] for r in result.get("full", {}).values()
                if method in r["protocols"].get(protocol, {})]
        out[method] = {k: {"mean": statistics.fmean(r[k] for r in rows),
                           "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0} for k in KEYS} \
            if rows else {}
    m, g = out["click_model"], out["grabcut"]
    if m and g:
        out["click_model_wins"] = bool(m["NoC@85"]["mean"] < g["NoC@85"]["mean"] and m["NoC@90"]["mean"] < g["NoC@90"]["mean"]
                                       and m["NoF@85"]["mean"] <= g["NoF@85"]["mean"]
                                       and m["NoF@90"]["mean"] <= g["NoF@90"]["mean"])
    return out


def cell(stat: dict, key: str) -> str:
    scale = 100 if key.startswith("mIoU") else 1
    digits = 1 if key.startswith(("mIoU", "NoF")) else 2
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['sd']:.{digits}f}"


def markdown(table: dict) -> str:
    lines = ["| data / training photographs | method | seeds | " + " | ".join(KEYS) + " |",
             "|---|---|---:|" + "---:|" * len(KEYS)]
    for label, s in table.items():
        for method, name in (("click_model", "click model"), ("grabcut", "GrabCut, same clicks")):
            if s.get(method):
                lines.append(f"| {label} | {name} | {len(s['seeds'])} | " + " | ".join(cell(s[method][k], k) for k in KEYS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="LABEL=RESULT.json")
    ap.add_argument("--protocol", default="pseudo")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clicks_domain.json")
    args = ap.parse_args()
    table = {}
    for item in args.results:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected LABEL=RESULT.json")
        table[label] = summarize(json.loads(Path(path).read_text()), args.protocol)
    write_json(args.out, {"benchmark": "clicks_domain", "protocol": args.protocol, "rows": table}, indent=1)
    print(markdown(table))
    for label, s in table.items():
        print(f"{label}: click model {'meets' if s.get('click_model_wins') else 'does not meet'} the bar")


if __name__ == "__main__":
    main()
