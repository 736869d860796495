"""Report plots with matplotlib: IoU histograms, per-category mIoU bars, score vs IoU.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot):
no global backend is switched, nothing leaks between figures, and it works headless and
inside a notebook alike. :func:`figure_png` turns a figure into PNG bytes.
"""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ALL_COLOUR = "#4c72b0"
SEPARATED_COLOUR = "#dd8452"
NON_SEPARATED_COLOUR = "#55a868"
MAX_CATEGORIES = 25
MAX_SCATTER_POINTS = 20_000


def new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas (inches, 100 dpi, constrained layout)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def iou_histogram_figure(iou: np.ndarray, separated: np.ndarray, n_bins: int = 20) -> Figure:
    """Share of objects per IoU bin for all, separated and non-separated objects.

    iou: (n,) in [0, 1]; separated: (n,) bool. Each subset is normalised to sum 1 so their
    shapes compare despite different sizes; dashed lines mark each subset's mIoU.
    """
    iou = np.asarray(iou, dtype=np.float64)
    separated = np.asarray(separated, dtype=bool)
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    if iou.size == 0:
        _no_data(ax, "no evaluated objects")
        return fig
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    subsets = (("all", iou, ALL_COLOUR), ("separated", iou[separated], SEPARATED_COLOUR),
               ("non-separated", iou[~separated], NON_SEPARATED_COLOUR))
    for k, (label, values, colour) in enumerate(subsets):
        if values.size == 0:
            continue
        weights = np.full(values.size, 1.0 / values.size)
        kwargs = {"alpha": 0.35, "histtype": "stepfilled"} if k == 0 else {"histtype": "step", "linewidth": 2}
        ax.hist(values, bins=edges, weights=weights, color=colour,
                label=f"{label} (n={values.size}, mIoU {100 * values.mean():.1f})", **kwargs)
        ax.axvline(values.mean(), color=colour, linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU of pseudo mask vs GT")
    ax.set_ylabel("share of objects")
    ax.set_title("IoU distribution")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def category_miou_figure(per_category: Sequence[Mapping[str, Any]], max_categories: int = MAX_CATEGORIES) -> Figure:
    """Grouped bars of mIoU (%) per category, all objects vs separated ones.

    The ``max_categories`` most numerous categories are shown (LVIS has over a thousand);
    a category with no separated object has no orange bar.
    """
    cats = sorted(per_category, key=lambda r: (-r["count"], r["category_id"]))[:max_categories]
    fig = new_figure(max(6.4, 0.45 * len(cats) + 2.0), 4.0)
    ax = fig.add_subplot()
    if not cats:
        _no_data(ax, "no categories")
        return fig
    x = np.arange(len(cats))
    whole = [100 * (r["miou"] or 0.0) for r in cats]
    sep = [100 * r["separated_miou"] if r["separated_miou"] is not None else np.nan for r in cats]
    ax.bar(x - 0.2, whole, width=0.4, color=ALL_COLOUR, label="all")
    ax.bar(x + 0.2, sep, width=0.4, color=SEPARATED_COLOUR, label="separated")
    ax.set_xticks(x, [f"{r['name']}\n(n={r['count']}, sep {r['separated_count']})" for r in cats],
                  rotation=45 if len(cats) > 6 else 0, ha="right" if len(cats) > 6 else "center", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("mIoU (%)")
    title = "mIoU per category"
    if len(per_category) > len(cats):
        title += f" ({len(cats)} most numerous of {len(per_category)})"
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def score_iou_figure(score: np.ndarray, iou: np.ndarray, separated: np.ndarray, calibration: Mapping[str, Any],
                     max_points: int = MAX_SCATTER_POINTS, seed: int = 0) -> Figure:
    """Left: score vs IoU per object (a fixed random subsample of ``max_points`` on large
    runs). Right: mIoU per score bin (``calibration["bins"]``, lowest scores first) against
    the overall mIoU: a useful score makes the bars rise left to right."""
    score = np.asarray(score, dtype=np.float64)
    iou = np.asarray(iou, dtype=np.float64)
    separated = np.asarray(separated, dtype=bool)
    keep = np.flatnonzero(np.isfinite(score))
    if keep.size > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_points, replace=False))
    fig = new_figure(9.6, 3.8)
    left, right = fig.subplots(1, 2)
    if keep.size == 0:
        _no_data(left, "no pseudo-label scores")
        _no_data(right, "no pseudo-label scores")
        return fig
    for mask, colour, label in ((~separated[keep], NON_SEPARATED_COLOUR, "non-separated"),
                                (separated[keep], SEPARATED_COLOUR, "separated")):
        idx = keep[mask]
        left.scatter(score[idx], iou[idx], s=8, alpha=0.5, color=colour, label=label, linewidths=0)
    left.set_xlabel("pseudo-label score")
    left.set_ylabel("IoU")
    left.set_ylim(0, 1)
    rho = calibration.get("spearman")
    left.set_title("score vs IoU" + (f" (Spearman ρ = {rho:.3f})" if rho is not None else ""))
    left.legend(fontsize=8, loc="lower right")
    bins = calibration.get("bins") or []
    x = np.arange(1, len(bins) + 1)
    right.bar(x, [100 * b["miou"] for b in bins], color=ALL_COLOUR, width=0.7)
    right.axhline(100 * float(iou[np.isfinite(score)].mean()), color="grey", linestyle="--", linewidth=1,
                  label="mIoU of scored objects")
    right.set_xticks(x, [f"{b['score_min']:.3g}–\n{b['score_max']:.3g}" for b in bins], fontsize=6)
    right.set_ylim(0, 100)
    right.set_xlabel("score bin (lowest scores first; score range below)")
    right.set_ylabel("mIoU in bin (%)")
    right.set_title(f"calibration: {len(bins)} {calibration.get('binning', 'bins')}", fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    return fig


def report_figures(table: pa.Table, summary: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every report plot, by name, from the metrics table (non-crowd rows)."""
    rows = table.filter(pc.invert(table["iscrowd"]))
    iou = rows["iou"].to_numpy(zero_copy_only=False)
    sep = rows["separated"].to_numpy(zero_copy_only=False)
    score = rows["score"].to_numpy(zero_copy_only=False)
    figs = {
        "iou_histogram": iou_histogram_figure(iou, sep),
        "category_miou": category_miou_figure(summary["per_category"]),
        "score_vs_iou": score_iou_figure(score, iou, sep, summary["calibration"]),
    }
    return {name: figure_png(fig) for name, fig in figs.items()}
