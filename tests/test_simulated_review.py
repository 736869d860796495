"""Simulated spot-fix review (exits.interactive.simulated_review): protocol and keep rules on
toy editors, and the run-level K-worst review with the default (GrabCut) editor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exits.interactive.metrics import mask_iou
from exits.interactive.simulated_review import review_objects, review_worst
from tests.spotfix_fixtures import H, W, make_run, pseudo_masks, rle_of, true_masks


class SquareEditor:
    """prev mask plus a 9x9 square per positive click, minus one per negative click."""

    def predict(self, ann_id, clicks, prev_mask):
        m = np.zeros((H, W), bool) if prev_mask is None else prev_mask.copy()
        for x, y, pos in clicks:
            m[max(0, int(y) - 4):int(y) + 5, max(0, int(x) - 4):int(x) + 5] = pos
        return m


class EmptyingEditor:
    """A harmful editor: every answer is an empty mask."""

    def predict(self, ann_id, clicks, prev_mask):
        return np.zeros((H, W), bool)


def _case() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((H, W), bool)
    gt[20:50, 20:60] = True
    pseudo = gt.copy()
    pseudo[:, 40:] = False  # the right half is missing: IoU 0.5
    return pseudo, gt


def test_review_improves_a_half_mask_and_stops_at_the_target():
    pseudo, gt = _case()
    res = review_objects(SquareEditor(), [(7, 0.2, pseudo, gt)], max_clicks=10, stop_iou=0.9)
    (obj,) = res.objects
    assert obj.ann_id == 7 and obj.iou_before == pytest.approx(0.5)
    assert obj.iou_after > obj.iou_before + 0.2
    assert obj.iou_after == pytest.approx(mask_iou(res.masks[7], gt))
    assert 1 <= obj.clicks <= 10
    # it stopped as soon as the target was reached (or ran out of clicks below it)
    assert obj.iou_after >= 0.9 or obj.clicks == 10
    s = res.summary()
    assert s["objects"] == 1 and s["improved"] == 1 and s["miou_after"] > s["miou_before"]


def test_exact_mask_costs_no_click_and_is_kept():
    _, gt = _case()
    res = review_objects(SquareEditor(), [(1, 0.9, gt.copy(), gt)])
    assert res.objects[0].clicks == 0 and res.objects[0].iou_after == 1.0
    assert np.array_equal(res.masks[1], gt)


def test_keep_best_never_ends_worse_but_keep_last_can():
    pseudo, gt = _case()
    best = review_objects(EmptyingEditor(), [(3, 0.1, pseudo, gt)], max_clicks=3, keep="best")
    assert best.objects[0].iou_after == pytest.approx(best.objects[0].iou_before)
    assert np.array_equal(best.masks[3], pseudo)  # the reviewer reset to the starting mask
    last = review_objects(EmptyingEditor(), [(3, 0.1, pseudo, gt)], max_clicks=3, keep="last")
    assert last.objects[0].iou_after == 0.0 and not last.masks[3].any()
    assert best.objects[0].iou_last == 0.0 and best.summary()["taken_back"] == 1


def test_bad_arguments_are_refused():
    pseudo, gt = _case()
    with pytest.raises(ValueError, match="keep"):
        review_objects(SquareEditor(), [], keep="first")
    with pytest.raises(ValueError, match="object 5"):
        review_objects(SquareEditor(), [(5, None, pseudo[:10], gt)])


def test_review_worst_takes_the_lowest_scores_with_grabcut(tmp_path: Path):
    run = make_run(tmp_path)
    truth = true_masks()
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"im{i}.png", "width": W, "height": H} for i in (1, 2)],
        "annotations": [{"id": a, "image_id": im, "category_id": c, "iscrowd": 0, "segmentation": rle_of(m),
                         "area": float(m.sum()), "bbox": [0, 0, 1, 1]} for a, (im, c, m, _) in truth.items()],
        "categories": [{"id": 1, "name": "round"}, {"id": 2, "name": "other"}]}))
    messages: list[str] = []
    res = review_worst(run, gt_json, 2, editor="auto", max_clicks=5, stop_iou=0.9, log=messages.append)
    assert [o.ann_id for o in res.objects] == [1, 3]  # scores 0.30, 0.55: the spot-fix queue's first two
    assert res.settings["editor"] == "grabcut" and "grabcut" in messages[0]
    worst = res.objects[0]
    before = mask_iou(pseudo_masks(truth)[1], truth[1][2])
    assert worst.iou_before == pytest.approx(before)
    assert worst.iou_after > before + 0.2  # GrabCut with the robot's clicks recovers the missing half
    assert res.objects[1].clicks == 0 and res.objects[1].iou_after == 1.0  # exact already: untouched
