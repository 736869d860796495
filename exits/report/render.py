"""The report as Markdown (report.md, figures/gallery as files beside it) and as one
self-contained HTML page (report.html: figures and gallery embedded as base64 PNG data URIs,
inline CSS, no external reference). Both are rendered from the same table specs, so they
always show the same numbers. mIoU values print as percentages.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from exits.eval.miou import SIZE_BUCKETS

FIGURE_TITLES = {
    "iou_histogram": "IoU distribution: all vs separated objects",
    "category_miou": "mIoU per category: all vs separated",
    "score_vs_iou": "Pseudo-label score vs IoU, and calibration per score bin",
}
MAX_CATEGORY_ROWS = 40


@dataclass(frozen=True)
class TableSpec:
    """A table to render: cells already formatted as text; ``align`` is "l" or "r" per column."""

    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    align: Sequence[str]
    note: str | None = None


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; "–" for None."""
    return "–" if value is None else f"{100.0 * value:.1f}"


def num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def key_facts(summary: Mapping[str, Any]) -> list[str]:
    """One-line facts for the top of the report."""
    objs = summary["objects"]
    sep = summary["separated_objects"]
    cal = summary["calibration"]
    facts = [
        f"Objects evaluated: {summary['all']['count']} (of {objs['predicted']} pseudo masks; "
        f"{objs['without_gt_mask']} without a GT mask, {objs['crowd']} crowd regions not scored)",
        f"mIoU: all {pct(summary['all']['miou'])} %, separated {pct(summary['separated']['miou'])} %, "
        f"non-separated {pct(summary['non_separated']['miou'])} %",
        f"Separated objects: {sep['count']} ({pct(sep['share'])} %), "
        + ("from the id list " + str(summary["separated_source"]) if summary["separated_rule"] is None else
           "derived from GT masks (>= 2 parts of >= max({min_part_pixels} px, {min_part_fraction:g} of the area), "
           "8-connected)".format(**summary["separated_rule"])),
        f"Score vs IoU: Spearman rho {num(cal['spearman'])}, Pearson r {num(cal['pearson'])} over {cal['count']} "
        f"objects; {pct(cal['worst_decile_overlap'])} % of the 10 % lowest-scored masks are among the 10 % "
        f"lowest-IoU ones",
    ]
    ret = summary.get("retrieval")
    if ret:
        facts.append(f"Point retrieval: {pct(ret['share_no_retrieval'])} % of objects retrieved nothing and trained "
                     f"on MIL alone ({pct(ret['share_invalid'])} % had no FG or BG seed set, "
                     f"{pct(ret['share_no_box_bg_seed'])} % no patch outside the box); "
                     f"{ret['fg_per_object']:.1f} FG / {ret['bg_per_object']:.1f} BG points per object")
    return facts


def parts_table(summary: Mapping[str, Any]) -> TableSpec | None:
    """What each part of the method gives (summary["parts"], :mod:`exits.report.parts`): one
    row per part, mIoU all / separated / non-separated / per size on one sample of objects;
    None when the report has no parts section."""
    parts = summary.get("parts")
    if not parts:
        return None
    sample = parts["sample"]
    rows = [[r["label"], str(r["all"]["count"]), pct(r["all"]["miou"]), pct(r["separated"]["miou"]),
             pct(r["non_separated"]["miou"])] + [pct(r["per_size"][b]["miou"]) for b in SIZE_BUCKETS]
            for r in parts["rows"]]
    sizes = {}
    if parts["rows"]:
        sizes = {b: parts["rows"][0]["per_size"][b]["count"] for b in SIZE_BUCKETS}
    note = (f"All rows on the same {sample['objects']} of {sample['evaluated']} evaluated objects "
            f"({sample['separated']} separated; " + ", ".join(f"{b} {n}" for b, n in sizes.items()) + "), "
            f"evenly strided over their sorted ann ids (at most {sample['peer_sample']}: --peer-sample / "
            "eval.peer_sample). (a)-(c) need no training; (d) is the generator before any refinement; "
            "(e) is the pseudo mask (its full-set numbers are above).")
    note += "".join(f" Not shown: {o['label']}: {o['reason']}." for o in parts.get("omitted", []))
    return TableSpec("What each part gives (like for like)",
                     ["Part", "Objects", "mIoU all (%)", "Separated (%)", "Non-separated (%)",
                      *(f"{b.capitalize()} (%)" for b in SIZE_BUCKETS)], rows, "lrrrrrrr", note)


def summary_tables(summary: Mapping[str, Any], max_categories: int = MAX_CATEGORY_ROWS) -> list[TableSpec]:
    """Subset, size, parts, category, points-source and calibration tables of a report summary."""
    n_all = summary["all"]["count"]
    subsets = [[label, str(summary[key]["count"]), pct(summary[key]["count"] / n_all if n_all else None),
                pct(summary[key]["miou"])]
               for label, key in (("All", "all"), ("Separated", "separated"), ("Non-separated", "non_separated"))]
    tables = [TableSpec("mIoU by subset", ["Subset", "Objects", "Share (%)", "mIoU (%)"], subsets, "lrrr")]

    sizes = [[b, str(s["count"]), pct(s["miou"]), str(s["separated_count"]), pct(s["separated_miou"])]
             for b in SIZE_BUCKETS for s in [summary["per_size"][b]]]
    th = summary["size_thresholds"]
    tables.append(TableSpec("mIoU by size", ["Size", "Objects", "mIoU (%)", "Separated", "Separated mIoU (%)"], sizes,
                            "lrrrr", f"COCO buckets by GT area: small < {th['small_below_area']}, "
                                     f"medium < {th['medium_below_area']}, large otherwise."))
    parts = parts_table(summary)
    if parts is not None:
        tables.append(parts)

    cats = sorted(summary["per_category"], key=lambda r: (-r["count"], r["category_id"]))
    shown = cats[:max_categories]
    tables.append(TableSpec(
        "mIoU by category", ["Category", "Id", "Objects", "mIoU (%)", "Separated", "Separated mIoU (%)"],
        [[str(r["name"]), str(r["category_id"]), str(r["count"]), pct(r["miou"]), str(r["separated_count"]),
          pct(r["separated_miou"])] for r in shown], "lrrrrr",
        f"{len(cats) - len(shown)} more categories in summary.json." if len(cats) > len(shown) else None))

    sources = summary.get("per_points_source") or {}
    if sources:
        tables.append(TableSpec("mIoU by extreme-point source", ["Points", "Objects", "mIoU (%)"],
                                [[k, str(v["count"]), pct(v["miou"])] for k, v in sources.items()], "lrr"))

    cal = summary["calibration"]
    tables.append(TableSpec(
        "Score calibration", ["Score bin", "Objects", "Score range", "Mean score", "mIoU (%)"],
        [[str(b["bin"] + 1), str(b["count"]), f"{b['score_min']:.3f} – {b['score_max']:.3f}", num(b["score_mean"]),
          pct(b["miou"])] for b in cal["bins"]], "rrrrr",
        f"{cal['binning']}, lowest scores first. Spearman rho = {num(cal['spearman'])}."))
    return tables


def worst_table(rows: Sequence[Mapping[str, Any]]) -> TableSpec:
    """The worst objects' numbers (metrics rows), lowest IoU first."""
    return TableSpec("Worst objects", ["Ann id", "Category", "IoU (%)", "Score", "Separated", "Parts"],
                     [[str(r["ann_id"]), str(r["category"]), pct(r["iou"]), num(r["score"]),
                       "yes" if r["separated"] else "no", str(r["parts"])] for r in rows], "rlrrlr")


def rows_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> TableSpec:
    """Any list of dict rows as a table (floats with 3 decimals), e.g. filtered metrics rows."""
    def cell(v: Any) -> str:
        return num(v) if isinstance(v, float) else str(v)

    return TableSpec(title, list(columns), [[cell(r.get(c)) for c in columns] for r in rows],
                     ["r" if rows and isinstance(rows[0].get(c), (int, float)) else "l" for c in columns])


_MD_PUNCT = str.maketrans({c: "\\" + c for c in "\\`[]|"})


def md_text(text: Any) -> str:
    """Text from the data (category names, paths, the run folder's name) made inert in
    Markdown: HTML escaped as report.html does (``<img ...>`` shows as text, never as a tag),
    backslash, backtick, brackets (no links or images) and ``|`` (no extra table column)
    escaped, line breaks joined. Renders as the original text."""
    return html.escape(str(text), quote=False).translate(_MD_PUNCT).replace("\r", " ").replace("\n", " ")


def md_code(text: Any) -> str:
    """``text`` as an inline code span (shown verbatim): fenced with more backticks than it
    holds, so a backtick in a path cannot end the span early."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    runs = [len(r) for r in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_cell(text: str) -> str:
    return md_text(text)


def markdown_table(spec: TableSpec, heading: str = "##") -> str:
    """A GitHub-flavoured Markdown table (with its title as a heading and note below)."""
    lines = [f"{heading} {md_text(spec.title)}", ""] if spec.title else []
    lines.append("| " + " | ".join(_md_cell(h) for h in spec.header) + " |")
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in spec.align) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in spec.rows]
    if spec.note:
        lines += ["", md_text(spec.note)]
    return "\n".join(lines) + "\n"


def html_table(spec: TableSpec) -> str:
    """An HTML table (title as <h2>, note as a paragraph), every text escaped."""
    esc = html.escape
    cls = ['class="num"' if a == "r" else "" for a in spec.align]
    head = "".join(f"<th {c}>{esc(h)}</th>" for h, c in zip(spec.header, cls))
    body = "".join("<tr>" + "".join(f"<td {c}>{esc(v)}</td>" for v, c in zip(row, cls)) + "</tr>"
                   for row in spec.rows)
    out = f"<h2>{esc(spec.title)}</h2>" if spec.title else ""
    out += f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if spec.note:
        out += f'<p class="note">{esc(spec.note)}</p>'
    return out + "\n"


def _inputs_lines(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    inputs = summary.get("inputs") or {}
    return [(k.replace("_", " "), str(v)) for k, v in inputs.items() if v is not None]


def _gallery_caption(r: Mapping[str, Any]) -> str:
    sep = f"separated ({r['parts']} parts)" if r["separated"] else f"{r['parts']} part(s)"
    return f"ann {r['ann_id']} · {r['category']} · IoU {pct(r['iou'])} % · score {num(r['score'])} · {sep}"


def render_markdown(summary: Mapping[str, Any], *, title: str, worst_rows: Sequence[Mapping[str, Any]] = (),
                    figure_paths: Mapping[str, str] | None = None,
                    gallery_paths: Mapping[int, str] | None = None) -> str:
    """report.md: facts, tables, figures (relative image links) and the gallery.

    Without ``figure_paths``/``gallery_paths`` (e.g. a Prefect artifact) the images are left
    out; the worst objects are listed as a table either way.
    """
    parts = [f"# {md_text(title)}", ""]
    parts += [f"- {md_text(fact)}" for fact in key_facts(summary)]
    parts += [""] + [f"- {md_text(k)}: {md_code(v)}" for k, v in _inputs_lines(summary)] + [""]
    parts += [markdown_table(t) for t in summary_tables(summary)]
    for name, path in (figure_paths or {}).items():
        parts += [f"## {FIGURE_TITLES.get(name, name)}", "", f"![{name}]({path})", ""]
    if worst_rows:
        parts.append(markdown_table(worst_table(worst_rows)))
        if gallery_paths:
            parts += ["Panels: image with extreme points (top red, left green, bottom blue, right yellow) | "
                      "pseudo mask (orange) | GT mask (green).", ""]
            for r in worst_rows:
                if int(r["ann_id"]) in gallery_paths:
                    parts += [f"**{md_text(_gallery_caption(r))}**", "",
                              f"![ann {r['ann_id']}]({gallery_paths[int(r['ann_id'])]})", ""]
    return "\n".join(parts).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{padding:.25rem .6rem;border-bottom:1px solid #eee}
th{background:#f5f5f5;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:.85rem}img{max-width:100%}figure{margin:1rem 0}figcaption{font-size:.9rem;color:#444}
.gallery figure{border:1px solid #eee;padding:.5rem}code{background:#f5f5f5;padding:0 .2rem}
"""


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(summary: Mapping[str, Any], *, title: str, figures: Mapping[str, bytes],
                worst_rows: Sequence[Mapping[str, Any]] = (), gallery_png: Mapping[int, bytes] | None = None) -> str:
    """report.html: one self-contained page (inline CSS, images as data URIs, no links)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", "<ul>"]
    out += [f"<li>{esc(fact)}</li>" for fact in key_facts(summary)]
    out += ["</ul>", "<ul>"] + [f"<li>{esc(k)}: <code>{esc(v)}</code></li>" for k, v in _inputs_lines(summary)]
    out.append("</ul>")
    out += [html_table(t) for t in summary_tables(summary)]
    for name, png in figures.items():
        caption = FIGURE_TITLES.get(name, name)
        out.append(f'<h2>{esc(caption)}</h2><figure><img alt="{esc(name)}" src="{png_data_uri(png)}"></figure>')
    if worst_rows:
        out.append(html_table(worst_table(worst_rows)))
        if gallery_png:
            out.append('<p class="note">Panels: image with extreme points (top red, left green, bottom blue, '
                       'right yellow) | pseudo mask (orange) | GT mask (green).</p><div class="gallery">')
            for r in worst_rows:
                png = gallery_png.get(int(r["ann_id"]))
                if png is not None:
                    out.append(f'<figure><img alt="ann {r["ann_id"]}" src="{png_data_uri(png)}">'
                               f"<figcaption>{esc(_gallery_caption(r))}</figcaption></figure>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
