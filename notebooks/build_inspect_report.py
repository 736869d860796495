"""Write notebooks/inspect_report.ipynb (run: python notebooks/build_inspect_report.py).

The notebook is generated so its cells stay reviewable as Python source; edit this file,
not the .ipynb, and re-run it. tests/test_report.py checks the two agree and executes the
notebook on a small run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from exits.io import atomic_open

NOTEBOOK = Path(__file__).with_name("inspect_report.ipynb")

CELLS = [
    ("md", """# Inspect an EXITS pseudo-mask report

Reads a run's `report/metrics.parquet` and `report/summary.json` (written by
`exits report -w RUN` or at the end of `exits run`), shows the summary tables and plots,
lets you filter objects (category, separated, IoU range, size) and shows the worst objects of
the selection: image with the extreme points | pseudo mask | GT mask.

Filters are plain variables in the cell marked **FILTER** (no widgets needed): edit them and
re-run that cell and the ones below it."""),
    ("code", """# Parameters: the run folder (EXITS_RUN_DIR overrides) and how many objects to show.
import os
from pathlib import Path

RUN_DIR = Path(os.environ.get("EXITS_RUN_DIR", "../runs/demo"))
N_WORST = 6""", {"tags": ["parameters"]}),
    ("code", """import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
from IPython.display import Image, Markdown, display

from exits.report.figures import category_miou_figure, figure_png, iou_histogram_figure, score_iou_figure
from exits.report.gallery import run_gallery
from exits.report.render import key_facts, markdown_table, rows_table, summary_tables

REPORT = RUN_DIR / "report"
metrics = pq.read_table(REPORT / "metrics.parquet")
summary = json.loads((REPORT / "summary.json").read_text())
print(f"{metrics.num_rows} objects in {REPORT / 'metrics.parquet'}")
print("columns:", ", ".join(metrics.column_names))"""),
    ("md", "## Summary"),
    ("code", """display(Markdown("\\n".join(f"- {fact}" for fact in key_facts(summary))))
for table in summary_tables(summary):
    display(Markdown(markdown_table(table, heading="###")))"""),
    ("md", "## Plots"),
    ("code", """scored = metrics.filter(pc.invert(metrics["iscrowd"]))  # crowd regions are not scored
iou = scored["iou"].to_numpy(zero_copy_only=False)
separated = scored["separated"].to_numpy(zero_copy_only=False)
score = scored["score"].to_numpy(zero_copy_only=False)
display(Image(figure_png(iou_histogram_figure(iou, separated))))
display(Image(figure_png(category_miou_figure(summary["per_category"]))))
display(Image(figure_png(score_iou_figure(score, iou, separated, summary["calibration"]))))"""),
    ("md", """## Filter

Edit the values in the **FILTER** cell (`None` = no filter on that column), then run it and
every cell below. Categories in this run are listed by the next cell."""),
    ("code", """print("categories:", sorted(set(metrics["category"].to_pylist())))"""),
    ("code", """# ---- FILTER: edit these values ----
CATEGORY = None            # a category name from the list above, or None for all
SEPARATED = None           # True: separated only; False: non-separated only; None: both
IOU_MIN, IOU_MAX = 0.0, 1.0  # keep IOU_MIN <= IoU <= IOU_MAX
SIZE = None                # "small", "medium", "large" or None"""),
    ("code", """# Apply the filter with pyarrow.compute (the table may have a million rows).
cond = pc.and_(pc.invert(metrics["iscrowd"]),
               pc.and_(pc.greater_equal(metrics["iou"], IOU_MIN), pc.less_equal(metrics["iou"], IOU_MAX)))
if CATEGORY is not None:
    cond = pc.and_(cond, pc.equal(metrics["category"], CATEGORY))
if SEPARATED is not None:
    cond = pc.and_(cond, pc.equal(metrics["separated"], SEPARATED))
if SIZE is not None:
    cond = pc.and_(cond, pc.equal(metrics["size"], SIZE))
selected = metrics.filter(cond)
if selected.num_rows:
    print(f"{selected.num_rows} of {metrics.num_rows} objects selected; "
          f"mIoU {100 * pc.mean(selected['iou']).as_py():.1f} %, "
          f"{pc.sum(selected['separated']).as_py()} separated")
else:
    print("no object matches the filter")"""),
    ("code", """# mIoU of the selection per category and separated flag.
by_group = (selected.group_by(["category", "separated"])
            .aggregate([("iou", "mean"), ("iou", "count"), ("score", "mean")])
            .sort_by([("category", "ascending"), ("separated", "ascending")]))
display(Markdown(markdown_table(rows_table(by_group.to_pylist(), by_group.column_names,
                                           title="Selection by category"), heading="###")))"""),
    ("code", """# The selection's lowest-IoU objects.
worst = selected.sort_by([("iou", "ascending"), ("ann_id", "ascending")]).slice(0, N_WORST)
columns = ["ann_id", "image_id", "category", "size", "parts", "separated", "iou", "score"]
display(Markdown(markdown_table(rows_table(worst.to_pylist(), columns, title="Lowest IoU in the selection"),
                                heading="###")))"""),
    ("md", """## Worst objects of the selection

Panels: image with the extreme points (top red, left green, bottom blue, right yellow) |
pseudo mask (orange) | GT mask (green)."""),
    ("code", """for item in run_gallery(RUN_DIR, worst["ann_id"].to_pylist()):
    kind = f"separated ({item.parts} parts)" if item.separated else f"{item.parts} part(s)"
    display(Markdown(f"**ann {item.ann_id}** · {item.category} · IoU {100 * item.iou:.1f} % · "
                     f"score {item.score:.3f} · {kind}"))
    display(Image(item.png))"""),
]


def build_notebook() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    cells = []
    for kind, source, *meta in CELLS:
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        if meta:
            cell.metadata.update(meta[0])
        cells.append(cell)
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main(out: Path = NOTEBOOK) -> Path:
    nb = build_notebook()
    nbformat.validate(nb)
    # Fixed cell ids keep regenerations diff-free.
    for k, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{k:02d}"
    with atomic_open(out) as fh:
        nbformat.write(nb, fh)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK))
