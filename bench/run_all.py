"""Run every benchmark in bench/ (results in bench/results/, summary in docs/benchmarks.md).

    python bench/run_all.py            # all, ~25 minutes on 2 CPU cores
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_retrieval.py", "bench_crf.py", "bench_throughput.py", "bench_stage1.py", "bench_flow_overhead.py"]


def main() -> None:
    for name in SCRIPTS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], check=True)


if __name__ == "__main__":
    main()
