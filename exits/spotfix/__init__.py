"""Spot-fix: review the worst pseudo masks in a web page, fix them with clicks, store every
decision append-only (WORKDIR/fixes/fixes.jsonl) and merge them over the pseudo labels
(WORKDIR/pseudo_labels_fixed.json) for stage 2.

Names are imported on first use: the store needs only the standard library (cheap in
worker processes), the app pulls in FastAPI, the editors OpenCV and torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EditorUnavailable": "editors", "GrabCutEditor": "editors", "MaskEditor": "editors", "load_editor": "editors",
    "ExportResult": "export", "MergeCounts": "export", "merge_fixes": "export", "run_export": "export",
    "FixesStore": "store", "FixRecord": "store", "RevisionConflict": "store",
    "create_app": "app", "RunCatalog": "catalog",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'exits.spotfix' has no attribute {name!r}")
    return getattr(importlib.import_module(f"exits.spotfix.{_WHERE[name]}"), name)
