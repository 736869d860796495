"""The report's "parts" table: what each part of the method gives, like for like.

Five masks per object, each scored against its GT mask on the *same* sample of evaluated
objects, so the rows can be compared:

    (a) box        the extreme-point box filled (:func:`exits.baselines.box_mask_full`)
    (b) grabcut    OpenCV GrabCut from the box, extreme points sure FG (:func:`exits.baselines.grabcut_mask`)
    (c) densecrf   dense CRF over a flat box prior (:func:`exits.baselines.dense_crf_box_mask`,
                   ``DENSE_PEER_PARAMS``): the classical peer of EXITS's CRF step
    (d) generator  the generator's own mask, M >= t pasted, before any refinement
                   (``generator_rle_counts`` of pseudo_labels.parquet, stage 1d)
    (e) final      the pseudo mask the user gets (its IoU from metrics.parquet)

(a)-(c) need no training; (d) - (a..c) is what the learning contributes, (e) - (d) the
refinement. Per row: mIoU over all sampled objects, separated, non-separated and per COCO
size bucket (:func:`exits.eval.summarize_miou_columns`, the report's own mean), with the
separated flag and GT area of metrics.parquet (the report's rule for both).

Sample: GrabCut and the dense CRF cost ~20-60 ms per object, so the rows are computed on at
most ``peer_sample`` of the evaluated (non-crowd, GT-masked) objects: with the n evaluated
ann ids sorted ascending, positions floor(i n / k), i = 0 .. k-1, k = min(n, peer_sample)
(evenly strided, deterministic: the same run gives the same sample). The full-set numbers
of (e) stay in the rest of the report.

Streaming: only the sampled objects' GT masks are kept (the GT json is streamed once more,
:func:`exits.eval.load_gt_masks`), and their instances rows and generator RLEs are read a
row group at a time; one image is held at a time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exits.baselines import DENSE_PEER_PARAMS, PeerObject, peer_masks
from exits.eval import load_gt_masks, summarize_miou_columns
from exits.eval.mask_iou import pair_ious
from exits.eval.rle import Rle, to_rle
from exits.report.run_files import read_object_geometry
from exits.run_folder import RunFolder

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PEER_SAMPLE", "PARTS", "PART_LABELS", "SAMPLE_RULE", "parts_comparison", "part_stats",
           "read_generator_rles", "sample_positions", "sampled_rows"]

DEFAULT_PEER_SAMPLE = 300
PARTS = ("box", "grabcut", "densecrf", "generator", "final")
PART_LABELS = {
    "box": "(a) extreme-point box",
    "grabcut": "(b) GrabCut (box init, points sure FG)",
    "densecrf": "(c) dense CRF over a box prior",
    "generator": "(d) generator's own mask (before refinement)",
    "final": "(e) final pseudo mask",
}
SAMPLE_RULE = ("evaluated (non-crowd) objects sorted by ann id, positions floor(i * n / k) for i < k, "
               "k = min(n, peer_sample)")
GRABCUT_SETTINGS = {"iters": 5, "point_radius": 2}  # exits.baselines.grabcut_mask's defaults
DENSECRF_POINT_RADIUS = 2  # exits.baselines.dense_crf_box_mask's default


def sample_positions(n: int, k: int) -> np.ndarray:
    """(min(n, k),) int64 positions floor(i n / k), i = 0 .. k-1, into n sorted items: evenly
    strided, first item included, strictly increasing; all n items when k >= n."""
    n, k = int(n), int(k)
    if k <= 0 or n <= 0:
        return np.zeros(0, np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(k, dtype=np.int64) * n) // k


def sampled_rows(metrics: pa.Table, peer_sample: int) -> tuple[np.ndarray, int]:
    """Rows of a metrics table (columns ann_id, iscrowd) picked for the parts table and the
    number of evaluated objects they come from (:data:`SAMPLE_RULE`). Rows in ann id order."""
    ann = np.asarray(metrics["ann_id"].to_numpy(), np.int64)
    crowd = np.asarray(metrics["iscrowd"].to_numpy(zero_copy_only=False), bool)
    evaluated = np.flatnonzero(~crowd)
    evaluated = evaluated[np.argsort(ann[evaluated], kind="stable")]
    return evaluated[sample_positions(evaluated.size, peer_sample)], int(evaluated.size)


def part_stats(iou: np.ndarray, separated: np.ndarray, area: np.ndarray) -> dict[str, Any]:
    """mIoU all / separated / non-separated / per size of one part over the sample.

    iou, separated, area: (k,) per sampled object (IoU as a fraction, the report's separated
    flag, the GT area). The means are :func:`exits.eval.summarize_miou_columns`'
    (sum in order / count), per_size its buckets with their separated subsets."""
    k = int(np.asarray(iou).size)
    s = summarize_miou_columns(np.asarray(iou, np.float64), np.zeros(k, bool), np.asarray(separated, bool),
                               np.asarray(area, np.float64), np.zeros(k, np.int64))
    return {"all": s["all"], "separated": s["separated"], "non_separated": s["non_separated"],
            "per_size": s["per_size"]}


def read_generator_rles(workdir: str | Path, ann_ids: np.ndarray) -> tuple[dict[int, Rle] | None, str | None]:
    """The generator's own masks of ``ann_ids`` from pseudo_labels.parquet's
    ``generator_rle_counts`` (a row group at a time, only those rows kept), or None and why
    not (the file or column is missing, older than pseudo_labels.json, or some of those
    objects have none: written before stage 1d stored it, or a placeholder shard)."""
    run = RunFolder(workdir)
    path = run.pseudo_parquet
    if not path.is_file():
        return None, f"{path.name} not found (the generator's masks are stored there only)"
    if run.pseudo_json.is_file() and path.stat().st_mtime_ns < run.pseudo_json.stat().st_mtime_ns:
        return None, f"{path.name} is older than {run.pseudo_json.name}: its generator masks may not match"
    pf = pq.ParquetFile(path)
    if "generator_rle_counts" not in pf.schema_arrow.names:
        return None, f"{path.name} has no generator_rle_counts column (written before stage 1d stored the generator's mask)"
    wanted = pa.array(np.unique(np.asarray(ann_ids, np.int64)), pa.int64())
    out: dict[int, Rle] = {}
    missing = 0
    for g in range(pf.metadata.num_row_groups):
        ids = pf.read_row_group(g, columns=["ann_id"])["ann_id"]
        keep = pc.is_in(ids, value_set=wanted)
        if not pc.any(keep).as_py():
            continue
        t = pf.read_row_group(g, columns=["ann_id", "height", "width", "generator_rle_counts"]).filter(keep)
        for a, h, w, counts in zip(*(t[c].to_pylist() for c in ("ann_id", "height", "width", "generator_rle_counts"))):
            if counts is None:
                missing += 1
                out.pop(int(a), None)
                continue
            out[int(a)] = to_rle({"size": [int(h), int(w)], "counts": counts})
    absent = len(wanted) - len(out)
    if absent:
        return None, (f"{absent} of {len(wanted)} sampled objects have no generator mask in {path.name} "
                      "(shards written before stage 1d stored it, placeholder shards, or masks written by hand)")
    return out, None


def _peer_objects(workdir: Path, ann_ids: np.ndarray, gt: Mapping[int, Rle]) -> tuple[list[PeerObject] | None, str | None]:
    """:class:`PeerObject` of each sampled object (geometry from instances.parquet, size from
    its GT mask), or None and why not."""
    geometry = read_object_geometry(workdir, set(ann_ids.tolist()))
    if not geometry:
        return None, f"{RunFolder(workdir).instances.name} not found or holds none of the sampled objects"
    lacking = [int(a) for a in ann_ids if int(a) not in geometry]
    if lacking:
        return None, (f"{len(lacking)} of {ann_ids.size} sampled objects are not in "
                      f"{RunFolder(workdir).instances.name} (e.g. ann {lacking[0]})")
    objects = []
    for a in ann_ids.tolist():
        g, (h, w) = geometry[a], gt[a]["size"]
        objects.append(PeerObject(ann_id=a, file_name=g.file_name, extreme_points=g.extreme_points,
                                  crop_box=g.crop_box, height=int(h), width=int(w)))
    return objects, None


def _scored(rles: Mapping[int, Rle], ann_ids: np.ndarray, gt: Mapping[int, Rle]) -> np.ndarray:
    """(k,) IoU of ``rles[a]`` with ``gt[a]`` for the sampled ids, in order."""
    ids = ann_ids.tolist()
    pred = [to_rle(dict(rles[a])) for a in ids]
    for a, p in zip(ids, pred):
        if list(p["size"]) != list(gt[a]["size"]):
            raise ValueError(f"annotation {a}: mask size {list(p['size'])} differs from GT size {list(gt[a]['size'])}")
    return np.asarray(pair_ious(pred, [gt[a] for a in ids]), np.float64)


def parts_comparison(workdir: str | Path, gt_json: str | Path, metrics: pa.Table,
                     peer_sample: int = DEFAULT_PEER_SAMPLE) -> dict[str, Any] | None:
    """summary.json's ``"parts"``: each part's mIoU on one sample of the evaluated objects.

    Args:
        workdir: the run folder (instances.parquet, pseudo_labels.parquet, run.json's images).
        gt_json: the GT json the report scores against.
        metrics: the report's per-object table (ann_id, iscrowd, separated, area, iou),
            sorted by ann id.
        peer_sample: objects in the sample at most; 0 = no parts table (returns None).
    Returns:
        ``{"sample": {...}, "rows": [{"part", "label", "all", "separated", "non_separated",
        "per_size"}, ...] in PARTS order, "omitted": [{"part", "reason"}], "settings": {...}}``;
        a part that cannot be computed for this run is listed under "omitted" with the reason.
    """
    if int(peer_sample) <= 0:
        return None
    workdir = Path(workdir)
    rows, n_evaluated = sampled_rows(metrics, peer_sample)
    ann_ids = np.asarray(metrics["ann_id"].to_numpy(), np.int64)[rows]
    separated = np.asarray(metrics["separated"].to_numpy(zero_copy_only=False), bool)[rows]
    area = np.asarray(metrics["area"].to_numpy(), np.float64)[rows]
    final_iou = np.asarray(metrics["iou"].to_numpy(zero_copy_only=False), np.float64)[rows]
    gt = {a: inst.rle for a, inst in load_gt_masks(gt_json, set(ann_ids.tolist())).items()}
    ious: dict[str, np.ndarray] = {"final": final_iou}
    omitted: dict[str, str] = {}

    objects, why = _peer_objects(workdir, ann_ids, gt)
    if objects is None:
        omitted.update(dict.fromkeys(("box", "grabcut", "densecrf"), str(why)))
    else:
        masks, per_object = peer_masks(objects, workdir, ["box"])  # the box reads no image
        ious["box"] = _scored(masks["box"], ann_ids, gt)
        try:
            images = RunFolder(workdir).images_dir()
            masks, per_object = peer_masks(objects, images, ["grabcut", "densecrf"])
        except (OSError, ValueError) as exc:  # no image folder, an unreadable or mismatched image
            omitted.update(dict.fromkeys(("grabcut", "densecrf"), f"images not readable: {exc}"))
        else:
            for kind in ("grabcut", "densecrf"):
                ious[kind] = _scored(masks[kind], ann_ids, gt)
            log.info("report parts: GrabCut %.1f ms, dense CRF %.1f ms per object over %d objects",
                     1000 * per_object["grabcut"], 1000 * per_object["densecrf"], ann_ids.size)

    generator, why = read_generator_rles(workdir, ann_ids)
    if generator is None:
        omitted["generator"] = str(why)
    else:
        ious["generator"] = _scored(generator, ann_ids, gt)

    n_sep = int(np.count_nonzero(separated))
    return {
        "sample": {"objects": int(ann_ids.size), "evaluated": n_evaluated, "peer_sample": int(peer_sample),
                   "separated": n_sep, "rule": SAMPLE_RULE},
        "rows": [{"part": p, "label": PART_LABELS[p], **part_stats(ious[p], separated, area)}
                 for p in PARTS if p in ious],
        "omitted": [{"part": p, "label": PART_LABELS[p], "reason": omitted[p]} for p in PARTS if p in omitted],
        "settings": {"grabcut": dict(GRABCUT_SETTINGS),
                     "densecrf": {**DENSE_PEER_PARAMS, "point_radius": DENSECRF_POINT_RADIUS}},
    }
