"""Simulated spot-fix review: the robot user edits the K worst pseudo masks of a run.

What a reviewer does on the spot-fix page (``exits spotfix``), played by the evaluation
robot of ``exits eval-clicks`` (:func:`exits.interactive.robot.next_click`, RITM convention;
:func:`exits.interactive.evaluate.robot_curve`):

    queue   = the run's objects, lowest pseudo-mask ``score`` first (the spot-fix order)
    K       = the first ``k`` objects of the queue
    per object: start from the pseudo mask m_0; click k = 1..max_clicks on the current
            error against the GT mask g, the editor answers m_k = editor(clicks_1..k, m_{k-1});
            stop once IoU(m_k, g) >= stop_iou or no error is left
    kept    = ``keep="best"``: argmax_k IoU(m_k, g) over k = 0..K (the page has undo and
              reset, so a reviewer who sees a click make the mask worse takes it back; the
              robot's judgement is the GT IoU, an oracle a person only approximates), or
              ``keep="last"``: m_K (the robot's last mask, no take-backs)

``IoU(kept, g) >= IoU(m_0, g)`` holds with ``keep="best"`` by construction. GT masks are only
read through :mod:`exits.eval.ground_truth` (the leak boundary) by :func:`review_worst`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from exits.interactive.clicks import Click
from exits.interactive.evaluate import robot_curve
from exits.interactive.metrics import mask_iou

__all__ = ["ObjectReview", "ReviewResult", "review_objects", "review_worst", "KEEP_RULES"]

KEEP_RULES = ("best", "last")


class _Editor(Protocol):
    def predict(self, ann_id: int, clicks: list[Click], prev_mask: np.ndarray | None) -> np.ndarray: ...


@dataclass(frozen=True)
class ObjectReview:
    """One reviewed object: IoU with the GT mask before, after (the kept mask) and of the
    robot's last mask (differs from ``iou_after`` only where ``keep="best"`` took a click
    back), and the clicks spent."""

    ann_id: int
    score: float | None
    iou_before: float
    iou_after: float
    clicks: int
    iou_last: float


@dataclass
class ReviewResult:
    """Edited masks ((H, W) bool, by ann id) and the per-object record, in queue order."""

    masks: dict[int, np.ndarray]
    objects: list[ObjectReview]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """mIoU of the reviewed objects before/after (%), mean clicks, how many improved."""
        n = len(self.objects)
        if n == 0:
            return {"objects": 0}
        before = [o.iou_before for o in self.objects]
        after = [o.iou_after for o in self.objects]
        return {"objects": n,
                "miou_before": round(100 * float(np.mean(before)), 2),
                "miou_after": round(100 * float(np.mean(after)), 2),
                "mean_clicks": round(float(np.mean([o.clicks for o in self.objects])), 2),
                "total_clicks": int(sum(o.clicks for o in self.objects)),
                "miou_last": round(100 * float(np.mean([o.iou_last for o in self.objects])), 2),
                "improved": int(sum(a > b for a, b in zip(after, before))),
                "taken_back": int(sum(o.iou_last < o.iou_after for o in self.objects)),
                "reached_stop_iou": int(sum(a >= self.settings.get("stop_iou", 1.0) for a in after))}


def review_objects(editor: _Editor, objects: Iterable[tuple[int, float | None, np.ndarray, np.ndarray]], *,
                   max_clicks: int = 10, stop_iou: float = 0.9, keep: str = "best") -> ReviewResult:
    """Robot-review each ``(ann_id, score, pseudo_mask, gt_mask)`` (masks (H, W) bool) with
    ``editor.predict``; see the module docstring for the protocol and ``keep``.

    Raises:
        ValueError: unknown ``keep``, ``max_clicks < 0``, or masks of different shapes.
    """
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {list(KEEP_RULES)}, got {keep!r}")
    if max_clicks < 0:
        raise ValueError(f"max_clicks must be >= 0, got {max_clicks}")
    masks: dict[int, np.ndarray] = {}
    records: list[ObjectReview] = []
    for ann_id, score, pseudo, gt in objects:
        pseudo = np.asarray(pseudo, bool)
        gt = np.asarray(gt, bool)
        if pseudo.shape != gt.shape:
            raise ValueError(f"object {ann_id}: pseudo mask {pseudo.shape} and GT mask {gt.shape} differ in shape")
        outputs = [pseudo]

        def predict(clicks: list[Click], prev: np.ndarray | None, _a: int = ann_id) -> np.ndarray:
            out = np.asarray(editor.predict(_a, clicks, prev), bool)
            outputs.append(out)
            return out

        ious, clicks = robot_curve(predict, gt, pseudo, max_clicks=max_clicks, stop_iou=stop_iou)
        k = int(np.argmax(ious)) if keep == "best" else len(ious) - 1  # argmax: first of equal IoUs
        masks[ann_id] = outputs[k]
        records.append(ObjectReview(int(ann_id), score, float(ious[0]), float(mask_iou(outputs[k], gt)), len(clicks),
                                    float(ious[-1])))
    return ReviewResult(masks, records, {"max_clicks": max_clicks, "stop_iou": stop_iou, "keep": keep})


def review_worst(workdir: str | Path, gt_json: str | Path, k: int, *, editor: str = "auto",
                 images: str | Path | None = None, max_clicks: int = 10, stop_iou: float = 0.9,
                 keep: str = "best", log: Callable[[str], None] | None = None) -> ReviewResult:
    """Review the ``k`` lowest-scoring objects of the run in ``workdir`` that have a GT mask in
    ``gt_json``, with the spot-fix editor ``editor`` (``auto``: what ``exits spotfix`` would
    pick, :func:`exits.spotfix.editors.resolve_editor`; without a click model: GrabCut).
    ``settings`` of the result name the editor and why it was chosen.
    """
    from exits.eval.ground_truth import load_gt_masks
    from exits.eval.rle import decode_rle
    from exits.spotfix.catalog import RunCatalog
    from exits.spotfix.editors import load_editor, resolve_editor

    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    catalog = RunCatalog.load(workdir, images)
    kind, why = resolve_editor(editor, workdir)
    if log is not None:
        log(f"simulated review: editor {kind} ({why})")
    mask_editor = load_editor(kind, workdir, catalog)
    gt = load_gt_masks(gt_json, set(int(a) for a in catalog.objects))
    chosen = [o for o in catalog.queue() if o.ann_id in gt][:k]

    def objects() -> Iterable[tuple[int, float | None, np.ndarray, np.ndarray]]:
        for obj in chosen:
            yield obj.ann_id, obj.score, catalog.pseudo_mask(obj.ann_id), decode_rle(gt[obj.ann_id].rle)

    result = review_objects(mask_editor, objects(), max_clicks=max_clicks, stop_iou=stop_iou, keep=keep)
    result.settings.update({"k": k, "editor": kind, "editor_reason": why, "order": "lowest pseudo score first",
                            "robot": "RITM: farthest point from the error boundary (exits eval-clicks)"})
    return result

