"""Run every benchmark in bench/ (results in bench/results/, summary in docs/benchmarks.md).

    python bench/run_all.py            # all, ~2 hours on 2 CPU cores (stage-2 AP: ~1 hour)

Order matters: bench_stage1 writes the EXITS pseudo labels that bench_detector_ap and
bench_clicks use.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_retrieval.py", "bench_crf.py", "bench_throughput.py", "bench_stage1.py", "bench_flow_overhead.py",
           "bench_detector_speed.py", "bench_detector_ap.py", "bench_clicks.py"]


def main() -> None:
    for name in SCRIPTS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], check=True)


if __name__ == "__main__":
    main()
