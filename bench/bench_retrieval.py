"""Benchmark: EXITS point retrieval (Sinkhorn + random walk), batched vs naive, on CPU.

Per object, in milliseconds, for a batch of B similarity matrices at the paper-like grid
N = 32 (n = 1024 patches) and the demo grid N = 12 (n = 144):
  * sinkhorn            exits.propagation.sinkhorn, batched, fixed iteration count
  * sinkhorn_lse        textbook log-domain Sinkhorn (two n^2 logsumexps per iteration),
                        batched, same iterations: the design alternative we did not take
  * walk                random_walk_scores, FG and BG in one batched matmul per step
  * walk_matrix_power   naive walk: per object torch.linalg.matrix_power(T, alpha), then
                        the mean of the seed rows (random_walk_scores_reference)
  * total / total_naive sinkhorn + walk  vs  sinkhorn + walk_matrix_power
  * retrieve_defaults   retrieve_points with library defaults (early-stopping Sinkhorn)
  * before / after / naive (per object, one run, back to back): the full retrieval
      before: the pre-issue-12 Sinkhorn (from git history, BEFORE_REV, 50 iterations,
              column-vector products) + transition_matrix + the batched walk
      formed_T: the first issue-12 path (sinkhorn_transition, tol 1e-3, omega 1.5, T formed)
              + the batched walk on T
      after:  retrieve_points' path (propagation_scores): the same Sinkhorn, kept as its
              factors K, u, v, and factored_walk_scores (T never formed)
      naive:  textbook log-domain Sinkhorn (50 iterations) + matrix_power walk per object
      sketch20: the issue's calibration point ("a plain sketch with 20 Sinkhorn iterations
              and a vector walk", 8-9 ms on the machine the issue was filed on): "before"
              with 20 iterations; timing it in the same run makes "after" comparable
              across VMs whose speed differs
    with the label agreement of "after" vs "before" on the synthetic objects

Run:  .venv/bin/python bench/bench_retrieval.py   (writes bench/results/retrieval.json)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# "before": the Sinkhorn of exits/propagation/sinkhorn.py before issue 12 (column-vector
# products, no over-relaxation), taken from git history rather than kept as a second copy.
BEFORE_REV = "0315ab6^"


def load_sinkhorn_before() -> Callable:
    """``sinkhorn`` of ``exits/propagation/sinkhorn.py`` at ``BEFORE_REV`` (needs the git history)."""
    import subprocess
    import types

    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_REV}:exits/propagation/sinkhorn.py"],
                            capture_output=True, text=True)
    if source.returncode != 0:
        raise SystemExit(f"bench_retrieval: the 'before' column needs git history ({BEFORE_REV}): "
                         f"{source.stderr.strip()} (a shallow clone? run `git fetch --unshallow`)")
    module = types.ModuleType("sinkhorn_before")
    exec(compile(source.stdout, f"{BEFORE_REV}:exits/propagation/sinkhorn.py", "exec"), module.__dict__)
    return module.sinkhorn


sinkhorn_before = load_sinkhorn_before()

from exits.io import write_json  # noqa: E402
from exits.propagation import (  # noqa: E402
    DEFAULT_ALPHA,
    label_points,
    marginal_error,
    retrieval_score,
    sinkhorn_transition,
    random_walk_scores,
    random_walk_scores_reference,
    retrieve_points,
    seed_masks,
    sinkhorn,
    transition_matrix,
)
from exits.propagation.retrieval import DEFAULT_SINKHORN_OMEGA, DEFAULT_SINKHORN_TOL, propagation_scores  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "retrieval.json"


def sinkhorn_logsumexp(S: torch.Tensor, iters: int) -> torch.Tensor:
    """Textbook log-domain Sinkhorn: log A -= lse(rows); log A -= lse(cols), iters times."""
    log_a = torch.log(S.clamp_min(torch.finfo(S.dtype).tiny))
    for _ in range(iters):
        log_a = log_a - torch.logsumexp(log_a, dim=-1, keepdim=True)
        log_a = log_a - torch.logsumexp(log_a, dim=-2, keepdim=True)
    return log_a.exp()


def synthetic_batch(B: int, N: int, crop: int, g: torch.Generator):
    """Attention-like S for B elliptic objects (features + spatial locality) and their seeds."""
    n = N * N
    p = crop / N
    centre = (torch.arange(N).float() + 0.5) * p
    x0 = torch.randint(int(0.1 * crop), int(0.3 * crop), (B,), generator=g).float()
    y0 = torch.randint(int(0.1 * crop), int(0.3 * crop), (B,), generator=g).float()
    x1 = crop - torch.randint(int(0.1 * crop), int(0.3 * crop), (B,), generator=g).float()
    y1 = crop - torch.randint(int(0.1 * crop), int(0.3 * crop), (B,), generator=g).float()
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    ex = ((centre - xm[:, None]) / ((x1 - x0)[:, None] / 2)) ** 2
    ey = ((centre - ym[:, None]) / ((y1 - y0)[:, None] / 2)) ** 2
    obj = ((ey[:, :, None] + ex[:, None, :]) <= 1).flatten(1).long()
    feats = torch.randn(2, 32, generator=g)[obj] + 1.2 * torch.randn(B, n, 32, generator=g)
    rc = torch.stack(torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij"), -1).reshape(-1, 2).float()
    locality = torch.cdist(rc, rc) ** 2 / (N / 4) ** 2
    # Temperature and locality give head-averaged-attention-like rows (median row max ~0.2-0.4).
    S = torch.softmax(0.08 * (feats @ feats.transpose(1, 2)) - 2.0 * locality, dim=-1)
    box = torch.stack([x0, y0, x1, y1], 1)
    points = torch.stack(
        [torch.stack(v, 1) for v in ((xm, y0), (x0, ym), (xm, y1 - 1), (x1 - 1, ym))], 1
    )
    return S.contiguous(), seed_masks(points, box, crop_size=crop, grid=N, delta=p)


def time_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    # Minimum, not median: on a shared machine other processes only ever add time.
    return min(samples)


def _labels(pi: torch.Tensor, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    score = retrieval_score(pi[:, 0], pi[:, 1])
    return label_points(score, seeds.box, 0.5, -0.5, seeds.fg.any(-1) & seeds.bg.any(-1))


def bench_grid(N: int, crop: int, B: int, alpha: int, iters: int, reps: int) -> dict:
    S, seeds = synthetic_batch(B, N, crop, torch.Generator().manual_seed(N))
    stacked = torch.stack([seeds.fg, seeds.bg], 1)
    T = transition_matrix(sinkhorn(S, iters=iters))

    def walk_naive() -> None:
        for b in range(B):  # matrix_power per object, as a straightforward implementation would
            random_walk_scores_reference(T[b], stacked[b], alpha)

    per_obj = {
        "sinkhorn": time_ms(lambda: sinkhorn(S, iters=iters), reps) / B,
        "sinkhorn_lse": time_ms(lambda: sinkhorn_logsumexp(S, iters), max(1, reps // 3)) / B,
        "walk": time_ms(lambda: random_walk_scores(T, stacked, alpha), reps) / B,
        "walk_matrix_power": time_ms(walk_naive, max(1, reps // 3)) / B,
        "retrieve_defaults": time_ms(lambda: retrieve_points(S, seeds), reps) / B,
    }
    def before() -> torch.Tensor:
        return random_walk_scores(transition_matrix(sinkhorn_before(S, iters=iters)), stacked, alpha)

    def formed_T() -> torch.Tensor:
        T = sinkhorn_transition(S, iters=iters, tol=DEFAULT_SINKHORN_TOL, omega=DEFAULT_SINKHORN_OMEGA)
        return random_walk_scores(T, stacked, alpha)

    def after() -> torch.Tensor:
        return torch.stack(propagation_scores(S, seeds.fg, seeds.bg, alpha=alpha, sinkhorn_iters=iters), 1)

    def naive() -> None:
        T_lse = transition_matrix(sinkhorn_logsumexp(S, iters))
        for b in range(B):
            random_walk_scores_reference(T_lse[b], stacked[b], alpha)

    def sketch20() -> torch.Tensor:
        return random_walk_scores(transition_matrix(sinkhorn_before(S, iters=20)), stacked, alpha)

    per_obj["before"] = time_ms(before, reps) / B
    per_obj["sketch20"] = time_ms(sketch20, reps) / B
    per_obj["formed_T"] = time_ms(formed_T, reps) / B
    per_obj["after"] = time_ms(after, reps) / B
    per_obj["naive"] = time_ms(naive, max(1, reps // 3)) / B
    fg0, bg0 = _labels(before(), seeds)
    fg1, bg1 = _labels(after(), seeds)
    box = int(seeds.box.sum())
    differ = int(((fg0 != fg1) | (bg0 != bg1)).sum())
    per_obj["total"] = per_obj["sinkhorn"] + per_obj["walk"]
    per_obj["total_naive"] = per_obj["sinkhorn"] + per_obj["walk_matrix_power"]
    # Agreement of the two walks, as a sanity check on what was timed.
    diff = (random_walk_scores(T, stacked, alpha) - random_walk_scores_reference(T, stacked, alpha)).abs().max()
    return {
        "grid": N,
        "n": N * N,
        "batch": B,
        "alpha": alpha,
        "sinkhorn_iters": iters,
        "ms_per_object": {k: round(v, 4) for k, v in per_obj.items()},
        "walk_speedup_vs_matrix_power": round(per_obj["walk_matrix_power"] / per_obj["walk"], 1),
        "max_abs_diff_walk_vs_reference": float(diff),
        "after_vs_before": {"box_patches": box, "labels_differ": differ, "agreement": round(1 - differ / box, 5),
                            "marginal_error_before": float(marginal_error(sinkhorn_before(S, iters=iters)).max()),
                            "marginal_error_after": float(marginal_error(sinkhorn(S, iters=iters, tol=DEFAULT_SINKHORN_TOL,
                                                                                  omega=DEFAULT_SINKHORN_OMEGA)).max())},
    }


def markdown(rows: list[dict]) -> str:
    cols = ["before", "sketch20", "formed_T", "after", "naive", "sinkhorn", "sinkhorn_lse", "walk", "walk_matrix_power", "retrieve_defaults"]
    head = "| N | n | B | alpha | " + " | ".join(cols) + " | walk speed-up | labels after = before |"
    sep = "|" + "---|" * (len(cols) + 6)
    lines = [head, sep]
    for r in rows:
        ms = r["ms_per_object"]
        cells = " | ".join(f"{ms[c]:.3f}" for c in cols)
        lines.append(f"| {r['grid']} | {r['n']} | {r['batch']} | {r['alpha']} | {cells} | {r['walk_speedup_vs_matrix_power']}x | {100 * r['after_vs_before']['agreement']:.2f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50, help="Sinkhorn iterations (fixed, no early stop)")
    ap.add_argument("--alphas", type=int, nargs="+", default=[DEFAULT_ALPHA, 20])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = [
        bench_grid(N, crop, args.batch, alpha, args.iters, args.reps)
        for N, crop in ((32, 256), (12, 96))
        for alpha in args.alphas
    ]
    write_json(
        args.out,
        {
            "benchmark": "exits.propagation retrieval, ms per object (best of reps)",
            "device": "cpu",
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            # Other processes on a shared machine inflate timings: judge rows by this.
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "rows": rows,
        },
        indent=2,
    )
    print(markdown(rows))
    print(f"\n1-min load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
