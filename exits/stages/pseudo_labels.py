"""Stage 1d: pseudo masks for every object, pasted back into the image as RLE.

For each object crop: M = sigmoid(generator(crop)) (optionally CRF-refined), zeroed outside
the extreme-point box (no object pixel lies outside it), pasted back with the exact inverse
of the crop map, thresholded and RLE-encoded in image pixels. The generator's own confidence:

    certainty       = mean over box pixels of |2M - 1|     (how decided the mask is)
    point_agreement = fraction of labelled patches (seeds + retrieved) whose label M keeps
    generator_score = (certainty + point_agreement) / 2    (certainty alone without points)

and the triage score of the mask the user gets (after every refinement; it orders the
spot-fix queue, picks the click model's training masks and feeds the report's calibration),
from signals of the final mask F (:mod:`exits.stages.mask_quality`):

    box_fit          = IoU of F's tight box with the extreme-point box
    point_reach      = mean_k exp(-dist(e_k, F) / (0.05 diag))  over the 4 extreme points
    refine_agreement = IoU of F with the generator's own mask (M >= t, pasted): how far the
                       CRF had to move it (crop- or image-level; none without refinement)
    score            = mean(box_fit, point_reach, refine_agreement)
                       (generator_score in place of refine_agreement when refine_at: none)

The generator's own mask (M >= t pasted, before any CRF: the mask refine_agreement compares
against; the final mask itself when refine_at: none) is kept too, as ``generator_rle_counts``
of the Parquet rows (not of the COCO json): the report's "parts" table
(:mod:`exits.report.parts`) sets it beside the final mask and the classical peers.

Why these: the generator's confidence is computed before the refinement and measured
Spearman 0.46 against the final mask's IoU on the demo; how much the refinement changed
the mask measured 0.67, and the extreme points' geometry (an outline that must reach all
four points and span their box) adds to it (docs/benchmarks.md, "Triage").

Dataset-wide runs compute masks per shard of objects (one ``PSEUDO_SCHEMA`` Parquet file of
RLEs + scores each, see ``exits.stages.shards``) and :func:`merge_pseudo_labels` writes the
run's ``pseudo_labels.json`` / ``.parquet`` from them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from exits.data.ids import as_int_id
from exits.io.json_stream import open_json_text
from exits.baselines import box_mask_full
from exits.eval.rle import encode_rle_json as encode_rle
from exits.eval.separated import count_parts_rle
from exits.crf import crf_refine
from exits.crf.image_refine import crop_support, paste_window_mask
from exits.data.crops import paste_mask
from exits.stages.mask_quality import final_mask_signals
from exits.stages.pseudo_label_files import write_pseudo_label_files
from exits.stages.shards import ShardTables

log = logging.getLogger(__name__)

PSEUDO_SCHEMA = pa.schema(
    [
        ("ann_id", pa.int64()),
        ("image_id", pa.int64()),
        ("category_id", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("rle_counts", pa.string()),
        ("area", pa.int64()),
        ("score", pa.float32()),
        ("certainty", pa.float32()),
        ("point_agreement", pa.float32()),
        ("num_parts", pa.int32()),  # visible parts of the pseudo mask (exits.eval.separated rule)
        ("generator_score", pa.float32()),
        ("box_fit", pa.float32()),
        ("point_reach", pa.float32()),
        ("refine_agreement", pa.float32()),  # NaN: no refinement after the generator
        # COCO RLE counts of the generator's own mask (size = height, width): M >= t pasted,
        # before the CRF; null when not stored (older shards, placeholders, write_pseudo_labels)
        ("generator_rle_counts", pa.string()),
    ]
)
# Columns a shard written by an older version may lack (read as null; num_parts is recounted
# on merge, a missing triage signal stays null and that shard keeps its old score, a missing
# generator mask stays null and the report's parts table says so).
TRIAGE_COLUMNS = ("generator_score", "box_fit", "point_reach", "refine_agreement")
GENERATOR_MASK_COLUMN = "generator_rle_counts"
NULLABLE_COLUMNS = (*TRIAGE_COLUMNS, GENERATOR_MASK_COLUMN)
OPTIONAL_COLUMNS = ("num_parts", *NULLABLE_COLUMNS)


def mask_iou_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) IoU |a ∧ b| / |a ∨ b| of (B, S, S) bool masks (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@torch.no_grad()
def predict_crop_probs(model: torch.nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int,
                       device: torch.device, crf_impl: str | None = None, crf_params: dict | None = None,
                       progress: bool = True, autocast_dtype: torch.dtype | None = None,
                       on_batch: Callable[[int, torch.Tensor], None] | None = None,
                       crf_agreement: list[float] | None = None, threshold: float = 0.5,
                       raw_probs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(K, S, S) float16 foreground probability per object crop, zero outside its box.

    ``crf_agreement``: with ``crf_impl``, this list receives per object the IoU inside the
    box of the generator's mask (sigmoid >= ``threshold``) with the CRF-refined one (the
    triage score's ``refine_agreement`` for ``refine_at: crop``). ``raw_probs``: with
    ``crf_impl``, this list receives each batch's (B, S, S) float16 probability *before* the
    CRF (zero outside the box): ``torch.cat`` of it is the ``generator_probs`` of
    :func:`shard_pseudo_label_table`.

    ``autocast_dtype``: the forward pass under autocast (``exits.engine.device.amp_dtype``);
    the sigmoid, the CRF and the box mask run in float32. ``on_batch(start, probs)`` is called
    with each batch's (B, S, S) result as soon as it exists (``ImageCRFRefiner.submit``: the
    image-level CRF of earlier batches runs in other processes while later batches run here).
    """
    model = model.to(device).eval()
    out = []
    start = 0
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False), desc="pseudo masks",
                      disable=not progress, unit="batch"):
        images = batch["image"].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(images)
        prob = torch.sigmoid(logits.float())
        box = batch["box_mask"].to(device)
        if crf_impl:
            raw = prob[:, 0] * box
            prob = crf_refine(images, prob, impl=crf_impl, **(crf_params or {}))
            if crf_agreement is not None:
                crf_agreement.extend(mask_iou_batch(raw >= threshold, prob[:, 0] * box >= threshold).tolist())
            if raw_probs is not None:
                raw_probs.append(raw.half().cpu())
        prob = (prob[:, 0] * box).half().cpu()
        if on_batch is not None:
            on_batch(start, prob)
        start += len(prob)
        out.append(prob)
    return torch.cat(out) if out else torch.zeros((0, 1, 1), dtype=torch.float16)


def mask_scores(probs: torch.Tensor, box_masks: torch.Tensor, labelled: torch.Tensor | None,
                target: torch.Tensor | None, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """certainty, agreement, score per object (see module docstring).

    probs, box_masks: (K, S, S); labelled, target: (K, N, N) bool patch labels or None.
    """
    p = probs.float()
    inside = box_masks.float()
    certainty = ((2 * p - 1).abs() * inside).sum((1, 2)) / inside.sum((1, 2)).clamp_min(1)
    if labelled is None:
        agreement = torch.full_like(certainty, float("nan"))
        score = certainty
    else:
        grid = labelled.shape[-1]
        cell = F.adaptive_avg_pool2d((p >= threshold).float()[:, None], grid)[:, 0] >= 0.5
        agree = ((cell == target) & labelled).sum((1, 2)).float()
        agreement = agree / labelled.sum((1, 2)).clamp_min(1).float()
        score = 0.5 * (certainty + agreement)
    return certainty.numpy(), agreement.numpy(), score.numpy()


def paste_box_prob(prob: torch.Tensor, window: Any, height: int, width: int) -> torch.Tensor:
    """(S, S) crop probability, zero outside the object's box -> (height, width) image
    probability R(p m) / R(m), R = ``paste_mask``'s bilinear resampling, m the box's crop
    pixels (:func:`exits.crf.image_refine.crop_support`), 0 where R(m) = 0.

    Pasting p itself would resample the zeros outside the box in as values and pull the
    box's edge rows and columns towards 0 (a constant 0.9 drops under the 0.5 threshold
    there): the same bias the image CRF's prior had (``image_crf_prior``)."""
    support = crop_support(prob)
    num = paste_mask(prob * support, window, height, width)
    den = paste_mask(support, window, height, width)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def paste_pseudo_masks(probs: torch.Tensor, dataset: Any, images: dict[int, Any], image_ids: list[int],
                       threshold: float, progress: bool = True,
                       refine: Callable[[int, torch.Tensor], np.ndarray] | None = None,
                       generator_probs: torch.Tensor | None = None) -> list[dict]:
    """Image-space RLE per object: {ann_id, rle, area}, the final mask's triage signals
    box_fit, point_reach, refine_agreement (:func:`exits.stages.mask_quality.final_mask_signals`)
    and ``generator_rle_counts``, the RLE counts of the generator's own mask
    G = paste(p_gen) >= threshold, inside the box (the final mask itself without refinement).

    ``refine(i, probs[i]) -> (window.height, window.width) bool`` replaces paste + threshold
    when given (the image-resolution CRF: ``exits.stages.image_crf_pool.ImageCRFRefiner``);
    refine_agreement is then the IoU of its mask with G, else NaN. ``generator_probs``
    (K, S, S): the crop probabilities before a crop-level CRF (``probs`` are then the refined
    ones, pasted as the final mask); p_gen = ``generator_probs[i]`` when given, else ``probs[i]``."""
    rows = []
    for i in tqdm(range(len(dataset)), desc="pasting masks", disable=not progress, unit="obj"):
        img = images[image_ids[i]]
        h, w, window = img["height"], img["width"], dataset.windows[i]
        # Resampling can spill past the box edge by a pixel; no object pixel lies outside it.
        box = box_mask_full(dataset.points_image[i], h, w).astype(bool)
        own = probs[i] if generator_probs is None else generator_probs[i]
        generator_mask = (paste_box_prob(own.float(), window, h, w) >= threshold).numpy() & box
        if refine is not None:
            m = paste_window_mask(refine(i, probs[i]), window, h, w) & box
        elif generator_probs is not None:
            m = (paste_box_prob(probs[i].float(), window, h, w) >= threshold).numpy() & box
        else:
            m = generator_mask
        signals = final_mask_signals(m, dataset.points_image[i], generator_mask if refine is not None else None)
        rle = encode_rle(m)
        own_counts = rle["counts"] if m is generator_mask else encode_rle(generator_mask)["counts"]
        rows.append({"ann_id": int(dataset.ann_ids[i]), "rle": rle, "area": int(m.sum()), **signals,
                     "generator_rle_counts": own_counts})
    return rows


def triage_score(generator_score: float, box_fit: float, point_reach: float, refine_agreement: float) -> float:
    """The final mask's triage score (module docstring):

        score = (box_fit + point_reach + r) / 3,  r = refine_agreement, or generator_score
                                                  when there was no refinement (NaN)

    Equal weights, fixed before the held-out variant was looked at (not fitted)."""
    r = refine_agreement if np.isfinite(refine_agreement) else generator_score
    return (box_fit + point_reach + r) / 3.0


def shard_pseudo_label_table(probs: torch.Tensor, table: pa.Table, dataset: Any, labelled: torch.Tensor | None,
                             target: torch.Tensor | None, threshold: float, progress: bool = False,
                             refine: Callable[[int, torch.Tensor], np.ndarray] | None = None,
                             crop_refine_agreement: Sequence[float] | None = None,
                             generator_probs: torch.Tensor | None = None) -> pa.Table:
    """One shard's ``PSEUDO_SCHEMA`` table: pasted RLEs, the generator's scores
    (:func:`mask_scores`) and the final mask's triage score (:func:`triage_score`).

    probs: (K, S, S) crop probabilities of the shard's K objects (:func:`predict_crop_probs`);
    table: their K rows of the instances table (same order); labelled / target: (K, N, N)
    point labels of the same objects, or None without retrieval. crop_refine_agreement: (K,)
    from ``predict_crop_probs(crf_agreement=...)`` when the crop-level CRF refined ``probs``;
    generator_probs: (K, S, S) their probabilities before that CRF (``raw_probs=``), the
    generator's own masks (:func:`paste_pseudo_masks`).
    """
    box_masks = torch.stack([dataset[i]["box_mask"] for i in range(len(dataset))])
    certainty, agreement, generator_score = mask_scores(probs, box_masks, labelled, target, threshold)
    cols = table.select(["image_id", "category_id", "height", "width"]).to_pydict()
    sizes = {i: {"height": h, "width": w} for i, h, w in zip(cols["image_id"], cols["height"], cols["width"])}
    rows = paste_pseudo_masks(probs, dataset, sizes, cols["image_id"], threshold, progress=progress, refine=refine,
                              generator_probs=generator_probs)
    scores = {}
    for i, r in enumerate(rows):
        if crop_refine_agreement is not None:
            r["refine_agreement"] = float(crop_refine_agreement[i])
        signals = {k: r[k] for k in ("box_fit", "point_reach", "refine_agreement")}
        scores[r["ann_id"]] = {"score": triage_score(float(generator_score[i]), **signals),
                               "generator_rle_counts": r["generator_rle_counts"],
                               "certainty": float(certainty[i]), "agreement": float(agreement[i]),
                               "generator_score": float(generator_score[i]), **signals}
    return pseudo_label_table(rows, scores, cols["image_id"], cols["category_id"])


def pseudo_label_table(rows: list[dict], scores: Mapping[int, Mapping[str, float]], image_ids: Sequence[int],
                       category_ids: Sequence[int]) -> pa.Table:
    """Rows of :func:`paste_pseudo_masks` with their scores as a ``PSEUDO_SCHEMA`` table (same order).

    ``image_ids`` / ``category_ids`` are per row; ``scores[ann_id]`` has score, certainty, agreement
    and optionally the :data:`NULLABLE_COLUMNS` (null where absent).
    """
    cols: dict[str, list] = {name: [] for name in PSEUDO_SCHEMA.names}
    for r, image_id, category_id in zip(rows, image_ids, category_ids, strict=True):
        s = scores[r["ann_id"]]
        h, w = r["rle"]["size"]
        for key, value in (("ann_id", r["ann_id"]), ("image_id", image_id), ("category_id", category_id),
                           ("height", h), ("width", w), ("rle_counts", r["rle"]["counts"]), ("area", r["area"]),
                           ("score", s["score"]), ("certainty", s["certainty"]), ("point_agreement", s["agreement"]),
                           ("num_parts", count_parts_rle(r["rle"]))):
            cols[key].append(value)
        for key in NULLABLE_COLUMNS:  # absent in the scores of write_pseudo_labels' callers: null
            cols[key].append(s.get(key))
    return pa.table(cols, schema=PSEUDO_SCHEMA)


def write_pseudo_labels(annotations_json: Path, rows: list[dict], scores: dict[int, dict[str, float]],
                        workdir: Path) -> dict[str, Path]:
    """:func:`write_pseudo_label_files` from pasted rows and scores (ids/categories from the json)."""
    with open_json_text(annotations_json) as fh:
        # Keyed by the strict int id: a rejected "1" or True must not stand in for object 1.
        meta = {as_int_id(a["id"]): (a["image_id"], a["category_id"]) for a in json.load(fh)["annotations"]
                if isinstance(a, dict) and as_int_id(a.get("id")) is not None}
    rows = [r for r in rows if r["ann_id"] in meta]
    table = pseudo_label_table(rows, scores, [meta[r["ann_id"]][0] for r in rows], [meta[r["ann_id"]][1] for r in rows])
    return write_pseudo_label_files(annotations_json, [table], workdir, PSEUDO_SCHEMA)


def merge_pseudo_labels(shards: list[Path], annotations_json: Path, workdir: Path) -> dict[str, Path]:
    """Pseudo-label shards (in order, read one at a time) -> the run's pseudo_labels.json / .parquet."""
    return write_pseudo_label_files(annotations_json, ShardTables(shards, PSEUDO_SCHEMA, optional=OPTIONAL_COLUMNS),
                                    workdir, PSEUDO_SCHEMA)
