"""Publish a report to Prefect as artifacts when running inside a Prefect flow or task run.

Outside a run (plain ``exits report``, tests, notebooks) nothing is sent and nothing is
imported from Prefect's client beyond its context module. Inside a run the flow run's page
shows a Markdown artifact (the report's facts and tables) and table artifacts (subsets, per
category, calibration, the parts comparison, worst objects). Keys are stable (``{key_prefix}-summary`` ...), so
Prefect keeps the history of each across runs.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Sequence
from uuid import UUID

from exits.report.metrics import finite_or_none

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "exits-report"


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run (``prefect.context.get_run_context`` succeeds)."""
    try:
        from prefect.context import get_run_context

        get_run_context()
    except Exception:  # MissingContextError, RuntimeError, or Prefect not importable
        return False
    return True


def artifact_key(prefix: str, name: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits and dashes)."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{name}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", key)


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    # Prefect serialises tables as JSON: NaN/inf are not JSON.
    return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}


def artifact_tables(summary: Mapping[str, Any], worst_rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, list[dict]]:
    """The report's tables as lists of JSON-able rows, by artifact name (mIoU as fractions)."""
    subsets = [{"subset": key, "count": summary[key]["count"], "miou": summary[key]["miou"]}
               for key in ("all", "separated", "non_separated")]
    subsets += [{"subset": f"size:{b}", "count": s["count"], "miou": s["miou"]} for b, s in summary["per_size"].items()]
    tables = {
        "subsets": subsets,
        "categories": [dict(r) for r in summary["per_category"]],
        "calibration": [dict(b) for b in summary["calibration"]["bins"]],
    }
    parts = summary.get("parts")
    if parts and parts["rows"]:
        tables["parts"] = [{"part": r["part"], "label": r["label"], "count": r["all"]["count"],
                            "miou_all": r["all"]["miou"], "miou_separated": r["separated"]["miou"],
                            "miou_non_separated": r["non_separated"]["miou"],
                            **{f"miou_{b}": s["miou"] for b, s in r["per_size"].items()}} for r in parts["rows"]]
    if worst_rows:
        cols = ("ann_id", "image_id", "category", "iou", "score", "separated", "parts", "size")
        tables["worst"] = [{c: r.get(c) for c in cols} for r in worst_rows]
    return {name: [_clean(r) for r in rows] for name, rows in tables.items()}


def publish_report_artifacts(summary: Mapping[str, Any], *, markdown: str | None = None,
                             worst_rows: Sequence[Mapping[str, Any]] = (),
                             key_prefix: str = DEFAULT_KEY_PREFIX) -> list[UUID]:
    """Create the report's Prefect artifacts when inside a Prefect run; else do nothing.

    Args:
        summary: the report summary (:func:`exits.report.build_report`'s result).
        markdown: text of the Markdown artifact (default: rendered from ``summary``).
        worst_rows: metrics rows of the gallery's objects (a "worst" table artifact).
        key_prefix: artifact key prefix (e.g. per dataset: ``exits-report-coco``).
    Returns:
        The created artifact ids ([] outside a run, or when Prefect refuses: a report is
        never lost because its artifacts could not be published).
    """
    if not in_prefect_run():
        return []
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from exits.report.render import render_markdown

    text = markdown if markdown is not None else render_markdown(summary, title="Pseudo-mask quality",
                                                                 worst_rows=worst_rows)
    ids: list[UUID] = []
    try:
        ids.append(create_markdown_artifact(markdown=text, key=artifact_key(key_prefix, "summary"),
                                            description="EXITS pseudo-mask quality report"))
        for name, rows in artifact_tables(summary, worst_rows).items():
            if rows:
                ids.append(create_table_artifact(table=rows, key=artifact_key(key_prefix, name),
                                                 description=f"EXITS report: {name.replace('_', ' ')}"))
    except Exception as exc:  # the API may be unreachable; the report files are already written
        log.warning("could not publish report artifacts to Prefect: %s", exc)
    return ids
