"""Merge spot-fix decisions over the pseudo labels: ``WORKDIR/pseudo_labels_fixed.json``.

Per object, the latest decision wins (exits.spotfix.store):
- accepted: ``segmentation`` = the fix's RLE; ``area`` / ``bbox`` recomputed from it
  (pycocotools), ``num_parts`` recounted on it, ``score`` = 1.0 (a person checked it;
  the old score is kept as ``pseudo_score``), ``fixed: true``;
- rejected: the object is removed (the person judged its mask unusable, and stage 2
  trains better without an object than with a wrong mask);
- every other object is copied unchanged.
The output records the digest of the pseudo_labels.json it was merged from, so a stale
merge (stage 1 re-run after the export) is detected by
:meth:`exits.run_folder.RunFolder.training_labels` (the rule for what stage 2 trains on).

Corrupt lines of fixes.jsonl are skipped with the store's warning (file and line number)
and counted (``skipped_lines``). The output is written atomically (exits.io: a temporary
``.pseudo_labels_fixed.json.*.tmp`` renamed over it); one export at a time runs on a run
folder (an exclusive ``flock`` on the folder), and it first removes its own temporary files
that an export killed mid-write left behind (never other stages' temporary files).
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from exits.io import atomic_open, file_digest
from exits.run_folder import FIXED_JSON, FIXED_SOURCE_DIGEST, PSEUDO_JSON, RunFolder
from exits.spotfix.masks import decode_rle, encode_rle, rle_area_bbox, rle_parts
from exits.spotfix.store import FixesStore, FixRecord

log = logging.getLogger(__name__)
# exits.io.atomic_path names its temporary files ``.<output name>.<random>.tmp``
TEMP_PREFIX = f".{FIXED_JSON}."


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
    skipped_lines: int = 0  # corrupt lines of fixes.jsonl (skipped with a warning naming each)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    counts: MergeCounts


def merge_fixes(pseudo: dict[str, Any], latest: dict[int, FixRecord], n_records: int = 0,
                skipped_lines: int = 0) -> tuple[dict[str, Any], MergeCounts]:
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
                         unknown_ids=unknown, invalid=invalid, records=n_records, skipped_lines=skipped_lines)
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
    """Write ``WORKDIR/pseudo_labels_fixed.json`` (atomically) and return it with counts.

    Streaming: ``pseudo_labels.json`` is read key by key (:mod:`exits.io.json_stream`),
    twice: the other keys, image sizes and counts (:func:`merge_fixes`'s rule, annotation
    by annotation); then the merged annotations are written one at a time. Memory holds the
    other keys (images, categories), the fixes and 8 B per annotation id, never the 860k
    annotations; the bytes are those of ``json.dump`` of :func:`merge_fixes`'s dict
    (annotations moved last, as there).

    Raises:
        FileNotFoundError: no pseudo_labels.json.
        OSError: a file cannot be read or written (disk full, read-only folder), naming
            it; the previous output is then unchanged and no temporary file is left.
    """
    run = RunFolder(workdir)
    src = run.pseudo_json
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: run stage 1 (`exits run`) first")
    with _export_lock(run.root) as locked:
        if locked:
            _remove_own_temp_files(run.root, stale=True)
        try:
            return _export(run)
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:  # a failed write/fsync names no file
                raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(run.fixed_json)) from exc
            raise
        finally:
            if locked:  # exits.io removes its temporary file on failure; this catches what it could not
                _remove_own_temp_files(run.root, stale=False)


def _remove_own_temp_files(root: Path, stale: bool) -> None:
    """Remove ``.pseudo_labels_fixed.json.*.tmp`` in ``root`` (only the export writes those
    names; the caller holds the export lock, so none belongs to a running export)."""
    prefix = TEMP_PREFIX
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        path = root / name
        try:
            if not path.is_symlink() and path.is_file():
                path.unlink()
                if stale:
                    log.info("removed %s, left by an export that did not finish", path)
        except OSError as exc:  # a read-only folder: the write reports it
            log.warning("could not remove the temporary file %s: %s", path, exc)


@contextlib.contextmanager
def _export_lock(root: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the run folder while exporting: a second export waits
    instead of removing the first one's temporary file. Yields whether the lock is held (a
    file system without flock support: no lock, and no temporary files are removed)."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("no export lock on %s: %s", root, exc)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as exc:
            log.debug("no export lock on %s: %s", root, exc)
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _export(run: RunFolder) -> ExportResult:
    """Two passes over ``pseudo_labels.json``: read (the other keys, the counts), then write.

    Held in memory: the keys other than ``annotations`` (images, categories: what the output
    writes before the annotations), the image sizes, the fixes, the annotations that have a
    decision (to count accepted vs. invalid once every image size is known), and one int64
    per annotation id (to count distinct ids and the decisions of unknown ids): ~8 B per
    object, never the annotations themselves.
    """
    from exits.io.json_stream import iter_top_level

    src = run.pseudo_json
    digest = file_digest(src, memo=False)
    store = FixesStore(run.root)
    records = store.records()
    latest = store.latest()
    head: dict[str, Any] = {}
    sizes: dict[int, tuple[int, int]] = {}
    ids = array("q")  # every annotation id, in file order (ids past int64: `big`)
    big: set[int] = set()
    rejected = n_in = 0
    accepting: list[tuple[dict[str, Any], FixRecord]] = []  # annotations with an accepted fix, in order

    # pass 1: the keys other than annotations, the image sizes and the counts (they go into
    # "info", which the output writes before the annotations)
    with open(src, encoding="utf-8") as fh:
        for key, value in iter_top_level(fh, stream="annotations", source=str(src)):
            if key != "annotations":
                head[key] = value
                if key == "images":
                    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in value}
                continue
            for ann in value:
                ann_id = int(ann["id"])
                n_in += 1
                try:
                    ids.append(ann_id)
                except OverflowError:
                    big.add(ann_id)
                rec = latest.get(ann_id)
                if rec is None:
                    continue
                if rec.decision == "reject":
                    rejected += 1
                else:
                    accepting.append((ann, rec))
    unique = np.unique(np.frombuffer(ids, dtype=np.int64)) if len(ids) else np.zeros(0, np.int64)
    del ids
    # the decisions' fixes are applied again while writing; here only whether each one fits
    invalid = sum(1 for ann, rec in accepting if _apply_fix(ann, rec, sizes.get(int(ann["image_id"]))) is None)
    accepted = len(accepting) - invalid
    del accepting
    seen = len(unique) + len(big)

    def known(ann_id: int) -> bool:
        if ann_id in big:
            return True
        j = int(np.searchsorted(unique, ann_id)) if -2**63 <= ann_id < 2**63 else len(unique)
        return j < len(unique) and int(unique[j]) == ann_id

    counts = MergeCounts(objects_in=seen, accepted=accepted, rejected=rejected,
                         unchanged=seen - accepted - rejected, objects_out=n_in - rejected,
                         unknown_ids=sum(1 for ann_id in latest if not known(ann_id)), invalid=invalid,
                         records=len(records), skipped_lines=len(store.skipped_lines))
    info_last = "info" not in head  # merge_fixes' setdefault then appends it after the annotations
    info = {} if info_last else head["info"]
    info["spotfix"] = {
        "source": PSEUDO_JSON, FIXED_SOURCE_DIGEST: digest, "counts": asdict(counts),
        "rule": "latest decision per object wins; accepted masks replace pseudo masks; rejected objects removed",
    }
    # pass 2: write; json.dump of merge_fixes' dict has every other key first (in file order),
    # then the annotations, then "info" when the input had none
    written = {k: json.dumps(v) for k, v in head.items()}
    del head
    with atomic_open(run.fixed_json) as out, open(src, encoding="utf-8") as fh:
        out.write("{")
        for key, text in written.items():
            out.write(json.dumps(key) + ": " + text + ", ")
        del written
        out.write('"annotations": [')
        k = 0
        for key, value in iter_top_level(fh, stream="annotations", source=str(src)):
            if key != "annotations":
                continue
            for ann in value:
                rec = latest.get(int(ann["id"]))
                if rec is not None:
                    if rec.decision == "reject":
                        continue
                    ann = _apply_fix(ann, rec, sizes.get(int(ann["image_id"]))) or ann
                out.write((", " if k else "") + json.dumps(ann))
                k += 1
        out.write("]")
        if info_last:
            out.write(', "info": ' + json.dumps(info))
        out.write("}")
    return ExportResult(path=run.fixed_json, counts=counts)
