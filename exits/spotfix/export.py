"""Merge spot-fix decisions over the pseudo labels: ``WORKDIR/pseudo_labels_fixed.json``.

Per object, the latest decision wins (exits.spotfix.store):
- accepted: ``segmentation`` = the fix's RLE; ``area`` / ``bbox`` recomputed from it
  (pycocotools), ``num_parts`` recounted on it, ``score`` = 1.0 (a person checked it;
  the old score is kept as ``pseudo_score``), ``fixed: true``;
- rejected: the object is removed (the person judged its mask unusable, and stage 2
  trains better without an object than with a wrong mask);
- every other object is copied unchanged.
The output records the sha256 of the pseudo_labels.json it was merged from, so a stale
merge (stage 1 re-run after the export) is detected by :func:`training_labels_path`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exits.io import write_json
from exits.spotfix.catalog import PSEUDO_JSON
from exits.spotfix.masks import decode_rle, encode_rle, rle_area_bbox, rle_parts
from exits.spotfix.store import FixesStore, FixRecord

FIXED_JSON = "pseudo_labels_fixed.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeCounts:
    objects_in: int
    accepted: int
    rejected: int
    unchanged: int
    objects_out: int
    unknown_ids: int  # decisions for objects not in the pseudo labels (ignored)
    invalid: int  # accepted masks that do not fit the image (ignored, object unchanged)
    records: int


@dataclass(frozen=True)
class ExportResult:
    path: Path
    counts: MergeCounts


def merge_fixes(pseudo: dict[str, Any], latest: dict[int, FixRecord], n_records: int = 0) -> tuple[dict[str, Any], MergeCounts]:
    """Pure merge of the latest decision per ann_id over a pseudo-label COCO dict."""
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in pseudo.get("images", [])}
    out = copy.deepcopy({k: v for k, v in pseudo.items() if k != "annotations"})
    anns: list[dict[str, Any]] = []
    accepted = rejected = invalid = 0
    seen: set[int] = set()
    for ann in pseudo.get("annotations", []):
        ann_id = int(ann["id"])
        seen.add(ann_id)
        rec = latest.get(ann_id)
        if rec is None:
            anns.append(copy.deepcopy(ann))
        elif rec.decision == "reject":
            rejected += 1
        else:
            fixed = _apply_fix(ann, rec, sizes.get(int(ann["image_id"])))
            if fixed is None:
                invalid += 1
                anns.append(copy.deepcopy(ann))
            else:
                accepted += 1
                anns.append(fixed)
    out["annotations"] = anns
    unknown = sum(1 for ann_id in latest if ann_id not in seen)
    counts = MergeCounts(objects_in=len(seen), accepted=accepted, rejected=rejected,
                         unchanged=len(seen) - accepted - rejected, objects_out=len(anns),
                         unknown_ids=unknown, invalid=invalid, records=n_records)
    return out, counts


def _apply_fix(ann: dict[str, Any], rec: FixRecord, size: tuple[int, int] | None) -> dict[str, Any] | None:
    if rec.rle is None or size is None:
        return None
    try:
        mask = decode_rle(rec.rle, *size)
    except ValueError as exc:
        log.warning("fix for object %d ignored: %s", rec.ann_id, exc)
        return None
    rle = encode_rle(mask)
    area, bbox = rle_area_bbox(rle)
    fixed = copy.deepcopy(ann)
    fixed.update(segmentation=rle, area=area, bbox=bbox, num_parts=rle_parts(rle), score=1.0, fixed=True,
                 pseudo_score=ann.get("score"), fix_user=rec.user, fix_time=rec.time)
    return fixed


def run_export(workdir: str | Path) -> ExportResult:
    """Write ``WORKDIR/pseudo_labels_fixed.json`` (atomically) and return it with counts."""
    workdir = Path(workdir)
    src = workdir / PSEUDO_JSON
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: run stage 1 (`exits run`) first")
    raw = src.read_bytes()
    store = FixesStore(workdir)
    records = store.records()
    merged, counts = merge_fixes(json.loads(raw), store.latest(), n_records=len(records))
    merged.setdefault("info", {})["spotfix"] = {
        "source": PSEUDO_JSON, "source_sha256": hashlib.sha256(raw).hexdigest(), "counts": asdict(counts),
        "rule": "latest decision per object wins; accepted masks replace pseudo masks; rejected objects removed",
    }
    path = write_json(workdir / FIXED_JSON, merged)
    return ExportResult(path=path, counts=counts)


def export_fixes(workdir: str | Path) -> Path:
    """Merge the fixes over the pseudo labels; returns ``WORKDIR/pseudo_labels_fixed.json``."""
    return run_export(workdir).path


def training_labels_path(workdir: str | Path) -> Path:
    """The json stage 2 should train on: the merged fixes when present and made from the
    current pseudo_labels.json, else pseudo_labels.json (a stale merge is logged, not used)."""
    workdir = Path(workdir)
    fixed, src = workdir / FIXED_JSON, workdir / PSEUDO_JSON
    if not fixed.is_file():
        return src
    with open(fixed, encoding="utf-8") as fh:
        recorded = json.load(fh).get("info", {}).get("spotfix", {}).get("source_sha256")
    if src.is_file() and recorded != hashlib.sha256(src.read_bytes()).hexdigest():
        log.warning("%s was merged from an older %s; run `exits export` again. Using the pseudo labels.", fixed, src.name)
        return src
    return fixed
