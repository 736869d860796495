"""Click encoding, 5-state rules, the robot user and NoC/NoF metrics (exits.interactive)."""
from __future__ import annotations

import numpy as np
import pytest

from exits.interactive.clicks import (DEFINITE_BG, DEFINITE_FG, POSSIBLE_BG, POSSIBLE_FG, UNKNOWN, apply_click,
                                      clicks_tensor, disk_maps, encode_click_maps, initial_state, state_map,
                                      update_with_prediction)
from exits.interactive.evaluate import robot_curve
from exits.interactive.metrics import mask_iou, number_of_clicks, summarize_curves
from exits.interactive.robot import largest_error_click, next_click, padded_distance


def _pixels(m: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(m))}


def test_disk_maps_exact_pixels():
    maps = disk_maps([(5.0, 5.0, True), (0.0, 0.0, False)], (10, 10), 1.5)
    assert maps.shape == (2, 10, 10)
    assert _pixels(maps[0]) == {(r, c) for r in (4, 5, 6) for c in (4, 5, 6)}  # dist^2 <= 2.25
    disk1 = disk_maps([(0.0, 0.0, False)], (10, 10), 1.0)[1]
    assert _pixels(disk1) == {(0, 0), (0, 1), (1, 0)}
    assert _pixels(maps[1]) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # r = 1.5 adds the diagonal
    frac = disk_maps([(2.5, 3.0, True)], (10, 10), 1.0)[0]
    assert _pixels(frac) == {(3, 2), (3, 3)}  # row 3, columns 2 and 3 at distance 0.5


def test_state_rules():
    prev = np.zeros((8, 8), bool)
    prev[2:6, 2:6] = True
    assert (initial_state(None, (8, 8)) == UNKNOWN).all()
    s0 = initial_state(prev, (8, 8))
    assert (s0[prev] == POSSIBLE_FG).all() and (s0[~prev] == POSSIBLE_BG).all()
    s1 = apply_click(s0, (1.0, 1.0, True), 1.0)
    assert _pixels(s1 == DEFINITE_FG) == {(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)}
    s2 = apply_click(s1, (2.0, 1.0, False), 1.0)  # overlaps: the later click wins
    assert s2[1, 2] == DEFINITE_BG and s2[1, 1] == DEFINITE_BG and s2[0, 1] == DEFINITE_FG
    pred = np.ones((8, 8), bool)
    s3 = update_with_prediction(s2, pred)
    definite = (s2 == DEFINITE_FG) | (s2 == DEFINITE_BG)
    assert (s3[definite] == s2[definite]).all()
    assert (s3[~definite] == POSSIBLE_FG).all()
    assert (update_with_prediction(s2, ~pred)[~definite] == POSSIBLE_BG).all()


def test_state_map_equals_incremental_process():
    rng = np.random.default_rng(3)
    clicks = [(float(rng.integers(16)), float(rng.integers(16)), bool(rng.random() < 0.5)) for _ in range(5)]
    preds = [rng.random((16, 16)) < 0.5 for _ in clicks]
    state, prev_pred = initial_state(None, (16, 16)), None
    for k, click in enumerate(clicks):  # click, predict, update; the last click not yet predicted
        state = apply_click(state, click, 2.0)
        if k < len(clicks) - 1:
            state = update_with_prediction(state, preds[k])
            prev_pred = preds[k]
    assert np.array_equal(state, state_map(clicks, prev_pred, (16, 16), 2.0))
    assert (state == DEFINITE_FG).any() or (state == DEFINITE_BG).any()


def test_encode_click_maps_one_hot_and_padding():
    maps = encode_click_maps([(3.0, 3.0, True)], None, (12, 12), 1.0)
    assert maps.shape == (7, 12, 12)
    assert np.allclose(maps[2:].sum(0).numpy(), 1.0)
    assert maps[2 + DEFINITE_FG, 3, 3] == 1 and maps[2 + UNKNOWN, 0, 0] == 1
    pts, valid = clicks_tensor([[(1.0, 2.0, True)], [], [(3.0, 4.0, False), (5.0, 6.0, True)]])
    assert pts.shape == (3, 2, 3) and valid.tolist() == [[True, False], [False, False], [True, True]]
    assert pts[2, 0].tolist() == [3.0, 4.0, -1.0]


def test_robot_clicks_centre_of_square():
    gt = np.zeros((10, 10), bool)
    gt[2:8, 2:8] = True
    assert next_click(gt, np.zeros_like(gt)) == (4.0, 4.0, True)
    clicked = np.zeros_like(gt)
    clicked[4, 4] = True
    assert next_click(gt, np.zeros_like(gt), clicked) == (5.0, 4.0, True)  # next tie, row-major
    assert next_click(gt, gt) is None


def test_robot_image_border_counts_as_boundary():
    gt = np.zeros((10, 10), bool)
    gt[:, :3] = True  # touches the top, left and bottom borders
    d = padded_distance(gt)
    assert d[0, 1] == 1.0 and d[5, 0] == 1.0 and d[5, 1] == 2.0
    assert next_click(gt, np.zeros_like(gt)) == (1.0, 1.0, True)


def test_robot_negative_click_and_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.random((12, 14)) < 0.3
        pred = rng.random((12, 14)) < 0.5
        click = next_click(gt, pred)
        fn, fp = gt & ~pred, ~gt & pred
        padded_out = lambda m: [(r, c) for r in range(-1, 13) for c in range(-1, 15)  # noqa: E731
                                if not (0 <= r < 12 and 0 <= c < 14) or not m[r, c]]
        def brute(m):
            out = np.zeros(m.shape)
            outside = np.array(padded_out(m), float)
            for r, c in zip(*np.nonzero(m)):
                out[r, c] = np.sqrt(((outside - [r, c]) ** 2).sum(1)).min()
            return out
        dfn, dfp = brute(fn), brute(fp)
        assert np.allclose(padded_distance(fn), dfn, atol=1e-3)
        positive = dfn.max() > dfp.max()
        dist = dfn if positive else dfp
        rows, cols = np.nonzero(np.isclose(dist, dist.max(), atol=1e-3))
        assert click == (float(cols[0]), float(rows[0]), positive)


def test_largest_error_click():
    gt = np.zeros((20, 20), bool)
    gt[1:3, 1:3] = True  # small FN (4 px)
    gt[10:13, 10:13] = True  # larger FN (9 px)
    assert largest_error_click(gt, np.zeros_like(gt)) == (11.0, 11.0, True)
    pred = gt.copy()
    pred[15:19, 1:5] = True  # 16 px false positive
    assert largest_error_click(gt, pred & ~(np.arange(20)[None, :] >= 10)) is not None
    assert largest_error_click(gt, pred)[2] is False
    assert largest_error_click(gt, gt) is None


def test_noc_nof_known_answers():
    assert number_of_clicks([0.0, 0.5, 0.86, 0.91], 0.85, 20) == (2, False)
    assert number_of_clicks([0.0, 0.5, 0.86, 0.91], 0.90, 20) == (3, False)
    assert number_of_clicks([0.0, 0.5, 0.8], 0.85, 20) == (20, True)
    assert number_of_clicks([0.88, 0.95], 0.85, 20) == (0, False)
    s = summarize_curves([[0.0, 0.5, 0.86, 0.91], [0.0, 0.8, 0.8]], 20, at_clicks=(0, 1, 3, 20))
    assert s["NoC@85"] == pytest.approx((2 + 20) / 2) and s["NoF@85"] == 1
    assert s["NoC@90"] == pytest.approx((3 + 20) / 2) and s["NoF@90"] == 1
    assert s["mIoU@1"] == pytest.approx(0.65) and s["mIoU@3"] == pytest.approx((0.91 + 0.8) / 2)
    assert s["mIoU@20"] == pytest.approx((0.91 + 0.8) / 2)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_toy_predictors_give_known_noc():
    gt = np.zeros((30, 30), bool)
    gt[5:20, 8:25] = True

    def after_three(clicks, prev):
        return gt.copy() if len(clicks) >= 3 else np.zeros_like(gt)

    ious, clicks = robot_curve(after_three, gt, None, max_clicks=20)
    assert ious == [0.0, 0.0, 0.0, 1.0] and all(c[2] for c in clicks)
    s = summarize_curves([ious], 20)
    assert s["NoC@85"] == 3 and s["NoC@90"] == 3 and s["NoF@90"] == 0

    ious, clicks = robot_curve(lambda c, p: np.zeros_like(gt), gt, None, max_clicks=20)
    assert len(clicks) == 20 and len({(c[0], c[1]) for c in clicks}) == 20
    s = summarize_curves([ious], 20)
    assert s["NoC@90"] == 20 and s["NoF@90"] == 1

    half = gt.copy()
    half[:, 17:] = False  # the edit protocol starts from an imperfect mask
    ious, _ = robot_curve(lambda c, p: gt.copy(), gt, half, max_clicks=20)
    assert ious[0] == pytest.approx(mask_iou(half, gt)) and ious[1:] == [1.0]
    assert summarize_curves([ious], 20)["NoC@85"] == 1
