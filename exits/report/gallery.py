"""Gallery of worst objects: image crop with the extreme points | pseudo mask | GT mask.

Each object becomes one PNG of three panels side by side, cropped around the union of its
extreme-point box, GT box and pseudo-mask box (plus a margin) and scaled to a common height:
1. the image with the four extreme points (top red, left green, bottom blue, right yellow)
   and the box they span;
2. the pseudo mask as an orange overlay with its outline;
3. the GT mask as a green overlay with its outline.
Evaluation side: GT masks are passed in (or read via :mod:`exits.eval` in
:func:`run_gallery`), never produced here.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
from PIL import Image

from exits.data.images import read_rgb
from exits.eval import load_gt_masks
from exits.eval.rle import to_rle
from exits.report.evaluation import pseudo_label_rles
from exits.report.run_files import ObjectGeometry, read_object_geometry
from exits.run_folder import RunFolder

log = logging.getLogger(__name__)

POINT_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25))  # top, left, bottom, right
PSEUDO_COLOUR = (255, 127, 14)
GT_COLOUR = (44, 160, 44)
PANEL_HEIGHT = 192
GAP_PX = 4


@dataclass(frozen=True)
class GalleryItem:
    """One gallery entry: the object's numbers and its three-panel PNG."""

    ann_id: int
    category: str
    iou: float
    score: float
    separated: bool
    parts: int
    png: bytes


def crop_region(height: int, width: int, boxes: Sequence[tuple[float, float, float, float]],
                margin: float = 0.1, min_margin_px: int = 4) -> tuple[int, int, int, int]:
    """Integer window (x0, y0, x1, y1), x1/y1 exclusive, covering all ``boxes`` (x0, y0, x1, y1)
    plus max(min_margin_px, margin * longer side), clipped to the image."""
    if not boxes:
        return 0, 0, width, height
    arr = np.asarray(boxes, dtype=np.float64)
    x0, y0 = arr[:, 0].min(), arr[:, 1].min()
    x1, y1 = arr[:, 2].max(), arr[:, 3].max()
    pad = max(float(min_margin_px), margin * max(x1 - x0, y1 - y0))
    cx0, cy0 = max(0, math.floor(x0 - pad)), max(0, math.floor(y0 - pad))
    cx1, cy1 = min(width, math.ceil(x1 + pad)), min(height, math.ceil(y1 + pad))
    return cx0, cy0, max(cx1, cx0 + 1), max(cy1, cy0 + 1)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) with x1/y1 exclusive of a (H, W) mask's pixels; None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def overlay_mask(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 image with ``mask`` (H, W) tinted ``colour`` and outlined."""
    out = image.astype(np.float32)
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, dtype=np.float32)
    out = np.ascontiguousarray(out.round().astype(np.uint8))
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def object_panel(image: np.ndarray, pseudo: np.ndarray, gt: np.ndarray, extreme_points: np.ndarray | None,
                 region: tuple[int, int, int, int], panel_height: int = PANEL_HEIGHT) -> np.ndarray:
    """Three panels (image + points | pseudo overlay | GT overlay) of ``region`` side by side.

    image: (H, W, 3) uint8; pseudo, gt: (H, W) bool; extreme_points: (4, 2) [x, y] image
    pixels or None; region: (x0, y0, x1, y1). Returns (h, 3 w + 2 gap, 3) uint8 with
    h = panel_height (or less when the crop is very wide: width is capped at 2 h).
    """
    x0, y0, x1, y1 = region
    crop = image[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    f = min(panel_height / h, 2 * panel_height / w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    base = cv2.resize(np.ascontiguousarray(crop), size, interpolation=interp)

    def resized(mask: np.ndarray) -> np.ndarray:
        return cv2.resize(mask[y0:y1, x0:x1].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)

    first = base.copy()
    if extreme_points is not None:
        fx, fy = size[0] / w, size[1] / h
        pts = [((x - x0 + 0.5) * fx - 0.5, (y - y0 + 0.5) * fy - 0.5) for x, y in np.asarray(extreme_points)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        cv2.rectangle(first, (round(min(xs)), round(min(ys))), (round(max(xs)), round(max(ys))), (255, 255, 255), 1)
        for (px, py), colour in zip(pts, POINT_COLOURS):
            cv2.circle(first, (round(px), round(py)), 5, (0, 0, 0), -1, lineType=cv2.LINE_AA)
            cv2.circle(first, (round(px), round(py)), 4, colour, -1, lineType=cv2.LINE_AA)
    gap = np.full((size[1], GAP_PX, 3), 255, dtype=np.uint8)
    return np.concatenate([first, gap, overlay_mask(base, resized(pseudo), PSEUDO_COLOUR), gap,
                           overlay_mask(base, resized(gt), GT_COLOUR)], axis=1)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB array."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _load_image(path: Path | None, height: int, width: int) -> np.ndarray:
    if path is not None and path.is_file():
        img = read_rgb(path)
        if img.shape[:2] == (height, width):
            return img
        log.warning("gallery: %s is %s, masks are %s; drawing on grey", path, img.shape[:2], (height, width))
    else:
        log.warning("gallery: image %s not found; drawing on grey", path)
    return np.full((height, width, 3), 128, dtype=np.uint8)


def gallery_items(rows: Sequence[Mapping[str, Any]], pred_rles: Mapping[int, dict], gt_rles: Mapping[int, dict],
                  geometry: Mapping[int, ObjectGeometry], image_dir: Path | None) -> list[GalleryItem]:
    """One :class:`GalleryItem` per metrics row (``ann_id``, ``category``, ``iou``, ``score``,
    ``separated``, ``parts``), in the given order. ``pred_rles``/``gt_rles``: ``{ann_id: RLE}``
    (a missing prediction draws as empty); ``geometry``: file names and extreme points (an
    object without one is drawn without points, on grey unless its file is known)."""
    images: dict[str, np.ndarray] = {}
    items = []
    for row in rows:
        ann_id = int(row["ann_id"])
        g_rle = to_rle(dict(gt_rles[ann_id]))
        height, width = (int(v) for v in g_rle["size"])
        gt = mask_utils.decode(g_rle).astype(bool)
        pred = mask_utils.decode(to_rle(dict(pred_rles[ann_id]))).astype(bool) if ann_id in pred_rles \
            else np.zeros_like(gt)
        geo = geometry.get(ann_id)
        boxes = [b for b in (mask_box(gt), mask_box(pred)) if b is not None]
        points = None
        if geo is not None:
            points = geo.extreme_points
            boxes.append((points[:, 0].min(), points[:, 1].min(), points[:, 0].max() + 1, points[:, 1].max() + 1))
            if geo.file_name not in images:
                images[geo.file_name] = _load_image(image_dir / geo.file_name if image_dir else None, height, width)
            image = images[geo.file_name]
        else:
            image = np.full((height, width, 3), 128, dtype=np.uint8)
        panel = object_panel(image, pred, gt, points, crop_region(height, width, boxes))
        items.append(GalleryItem(ann_id=ann_id, category=str(row["category"]), iou=float(row["iou"]),
                                 score=float(row["score"]), separated=bool(row["separated"]),
                                 parts=int(row["parts"]), png=encode_png(panel)))
    return items


def read_pseudo_rles(run_dir: Path, ann_ids: Sequence[int]) -> dict[int, dict]:
    """``{ann_id: RLE}`` of some pseudo masks: from pseudo_labels.parquet (its ids, then only
    the row groups holding those objects), else from pseudo_labels.json."""
    from exits.report.pseudo_masks import PseudoMasks

    run = RunFolder(run_dir)
    path = run.pseudo_parquet
    if not path.is_file():
        rles, _ = pseudo_label_rles(run.pseudo_json)
        return {i: rles[i] for i in ann_ids if i in rles}
    return PseudoMasks(path, round_scores=True).rles_of([int(i) for i in ann_ids])


def run_gallery(run_dir: str | Path, ann_ids: Sequence[int], gt: str | Path | None = None) -> list[GalleryItem]:
    """Gallery items of ``ann_ids`` (in that order) of a run that has a report.

    Reads ``report/metrics.parquet`` (numbers; the row groups holding those objects), the
    pseudo masks, ``instances.parquet`` and the GT json the report used
    (``report/summary.json``'s ``inputs.gt``, or ``gt``; streamed, only those masks kept).
    """
    from exits.report.metrics_parquet import metrics_rows

    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    wanted = [int(i) for i in ann_ids]
    if not wanted:
        return []
    metrics = run.report_dir / "metrics.parquet"
    try:
        rows = metrics_rows(metrics, wanted)
    except KeyError:
        known = pq.read_table(metrics, columns=["ann_id"])["ann_id"]
        present = set(pc.filter(known, pc.is_in(known, value_set=pa.array(wanted, type=pa.int64()))).to_pylist())
        raise KeyError(f"ann ids not in {metrics}: {[i for i in wanted if i not in present][:10]}") from None
    if gt is None:
        summary_path = run.report_dir / "summary.json"
        named = json.loads(summary_path.read_text()).get("inputs", {}).get("gt") if summary_path.is_file() else None
        gt = named or run.gt_json()
    gt_masks = load_gt_masks(gt, ann_ids=set(wanted))
    pred = read_pseudo_rles(run_dir, wanted)
    return gallery_items(rows, pred, {i: g.rle for i, g in gt_masks.items()},
                         read_object_geometry(run_dir, set(wanted)), run.read_meta().images)
