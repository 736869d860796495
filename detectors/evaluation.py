"""Mask AP of stage-2 predictions: COCO bbox/segm AP, LVIS AP, and AP on separated objects.

Predictions are COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
``score``, ``segmentation`` compressed RLE). Values follow pycocotools/lvis conventions:
AP in [0, 1]; ``-1.0`` where a bucket has no ground truth (e.g. APs with no small objects).

Separated subset (Separated-COCO style): the separated set comes from the GT masks by the
rule in :mod:`exits.eval.separated` (or is given explicitly). AP is computed with every
image and all detections, but GT objects that are *not* separated are marked ignore: a
detection matched to one of them is neither a true nor a false positive, and missing them
costs nothing. Detections that match no GT object at all stay false positives. So the
number measures how well separated objects are found and segmented without rewarding or
punishing what the model does on the other objects.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from exits.eval.ground_truth import gt_instances_from_coco
from exits.io.json_stream import open_json_text
from exits.eval.separated import separated_ann_ids

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
IOU_TYPES = ("bbox", "segm")

GtArg = str | os.PathLike | Mapping[str, Any]


def _load_gt(gt_json: GtArg) -> dict[str, Any]:
    if isinstance(gt_json, Mapping):
        return copy.deepcopy(dict(gt_json))
    with open_json_text(gt_json) as fh:  # gzip / UTF-16 / BOM as the reader accepts them
        return json.load(fh)


def _coco_api(data: dict[str, Any]) -> COCO:
    # LVIS annotations have no iscrowd, which COCOeval reads for every GT object.
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results_for(predictions: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of the predictions fit for ``COCO.loadRes`` under ``iou_type``.

    For segm the bbox is dropped so loadRes takes the detection's area from its mask (as
    Detectron2 does); with a bbox it would use w * h, which shifts objects between the
    small/medium/large buckets.
    """
    out = []
    for p in predictions:
        r = {k: v for k, v in p.items() if k not in ("id", "area")}
        if iou_type == "segm":
            if "segmentation" not in r:
                raise ValueError("segm evaluation needs a 'segmentation' in every prediction")
            r.pop("bbox", None)
        out.append(r)
    return out


class _IgnoringCOCOeval(COCOeval):
    """COCOeval that treats the GT annotations in ``ignore_ids`` as ignore regions.

    pycocotools overwrites an annotation's ``ignore`` flag with ``iscrowd`` in ``_prepare``;
    setting ``iscrowd`` instead would also switch that object to crowd IoU (intersection over
    the detection's area). Setting ``ignore`` after ``_prepare`` keeps ordinary IoU.
    """

    def __init__(self, coco_gt: COCO, coco_dt: COCO, iou_type: str, ignore_ids: set[int]) -> None:
        super().__init__(coco_gt, coco_dt, iou_type)
        self.ignore_ids = set(ignore_ids)

    def _prepare(self) -> None:
        super()._prepare()
        for gts in self._gts.values():
            for g in gts:
                if g["id"] in self.ignore_ids:
                    g["ignore"] = 1


def _run_cocoeval(
    coco_gt: COCO, predictions: Sequence[Mapping[str, Any]], iou_type: str, ignore_ids: set[int] | None = None
) -> dict[str, float]:
    if not predictions:  # loadRes cannot take an empty list; nothing detected = AP 0
        return {name: 0.0 for name in COCO_STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(_results_for(predictions, iou_type))
        ev = (_IgnoringCOCOeval(coco_gt, coco_dt, iou_type, ignore_ids) if ignore_ids
              else COCOeval(coco_gt, coco_dt, iou_type))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats[: len(COCO_STAT_NAMES)])}


def coco_ap(
    predictions: Sequence[Mapping[str, Any]], gt_json: GtArg, iou_types: Iterable[str] = IOU_TYPES
) -> dict[str, dict[str, float]]:
    """``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` by pycocotools COCOeval."""
    coco_gt = _coco_api(_load_gt(gt_json))
    return {t: _run_cocoeval(coco_gt, predictions, t) for t in iou_types}


def separated_ap(
    predictions: Sequence[Mapping[str, Any]],
    gt_json: GtArg,
    separated_ids: Iterable[int] | None = None,
    iou_types: Iterable[str] = IOU_TYPES,
) -> dict[str, Any]:
    """AP on separated GT objects only (others are ignore regions; see module docstring).

    Args:
        separated_ids: explicit separated annotation ids; ``None`` derives them from the GT
            masks with :func:`exits.eval.separated.separated_ann_ids`.
    Returns:
        ``{iou_type: {AP...}, "count": number of separated objects, "source": "gt_masks" |
        "given"}``; with no separated object the AP values are ``-1.0``.
    """
    data = _load_gt(gt_json)
    if separated_ids is None:
        ids, source = separated_ann_ids(gt_instances_from_coco(data)), "gt_masks"
    else:
        ids, source = {int(i) for i in separated_ids}, "given"
    all_ids = {int(a["id"]) for a in data["annotations"]}
    ids &= all_ids
    out: dict[str, Any] = {"count": len(ids), "source": source}
    coco_gt = _coco_api(data)
    for t in iou_types:
        if not ids:
            out[t] = {name: -1.0 for name in COCO_STAT_NAMES}
        else:
            out[t] = _run_cocoeval(coco_gt, predictions, t, ignore_ids=all_ids - ids)
    return out


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """Temporarily provide ``numpy.float`` (= builtin ``float``) for lvis 0.5.3.

    Why: lvis 0.5.3 (the latest release) calls ``np.float`` in ``LVISEval.accumulate``;
    numpy 1.24 removed that alias, so evaluation crashes with AttributeError. We must not
    edit the installed package, so the alias exists only while LVIS evaluation runs and the
    previous state (normally: no attribute) is restored afterwards, even on error.
    """
    had = "float" in np.__dict__
    previous = np.__dict__.get("float")
    np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if had:
            np.float = previous  # type: ignore[attr-defined]
        else:
            with contextlib.suppress(AttributeError):
                delattr(np, "float")


def lvis_ap(
    predictions: Sequence[Mapping[str, Any]], gt_json: GtArg, iou_types: Iterable[str] = IOU_TYPES,
    max_dets: int = 300,
) -> dict[str, dict[str, float]]:
    """``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}}`` by LVISEval."""
    from lvis import LVISEval, LVISResults

    from exits.data.lvis_api import lvis_from_dict

    out: dict[str, dict[str, float]] = {}
    data = _load_gt(gt_json)
    with contextlib.redirect_stdout(io.StringIO()):
        lvis_gt = lvis_from_dict(data)
    for t in iou_types:
        if not predictions:
            out[t] = {name: 0.0 for name in LVIS_STAT_NAMES}
            continue
        # LVISResults deep-copies and mutates its input; hand it copies.
        results = [dict(r) for r in _results_for(predictions, t)]
        with contextlib.redirect_stdout(io.StringIO()), numpy_float_alias(), warnings.catch_warnings():
            # lvis logs through the deprecated Logger.warn; not ours to fix.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="lvis")
            lvis_dt = LVISResults(lvis_gt, results, max_dets=max_dets)
            ev = LVISEval(lvis_gt, lvis_dt, iou_type=t)
            ev.run()
        out[t] = {name: float(ev.results[name]) for name in LVIS_STAT_NAMES}
    return out


def is_lvis(data: Mapping[str, Any]) -> bool:
    from exits.data.reader import detect_format

    return detect_format(dict(data)) == "lvis"


def evaluate(
    predictions: Sequence[Mapping[str, Any]],
    gt_json: GtArg,
    iou_types: Iterable[str] = IOU_TYPES,
    separated: bool | Iterable[int] = True,
) -> dict[str, Any]:
    """All stage-2 metrics of ``predictions`` against ``gt_json`` (COCO or LVIS format).

    Returns:
        ``{"format": "coco" | "lvis", "coco": {iou_type: {...}}, "lvis": {...} (LVIS gt
        only), "separated": {...} (unless ``separated=False``), "num_predictions": n}``.
        ``separated``: True derives the set from GT masks, an iterable gives the ids.
    """
    iou_types = tuple(iou_types)
    data = _load_gt(gt_json)
    lvis_format = is_lvis(data)
    out: dict[str, Any] = {"format": "lvis" if lvis_format else "coco", "num_predictions": len(predictions)}
    if lvis_format:
        out["lvis"] = lvis_ap(predictions, data, iou_types)
    # pycocotools reads LVIS json too (no iscrowd -> 0), which gives the COCO-style numbers.
    out["coco"] = coco_ap(predictions, data, iou_types)
    if separated is not False:
        ids = None if separated is True else separated
        out["separated"] = separated_ap(predictions, data, ids, iou_types)
    return out
