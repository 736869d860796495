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


# InterFormer's transitions, written out: (state, prediction is fg) -> next state.
TRANSITION_TABLE = [
    (UNKNOWN, True, POSSIBLE_FG), (UNKNOWN, False, POSSIBLE_BG),
    (POSSIBLE_FG, True, POSSIBLE_FG), (POSSIBLE_FG, False, UNKNOWN),
    (POSSIBLE_BG, True, UNKNOWN), (POSSIBLE_BG, False, POSSIBLE_BG),
    (DEFINITE_FG, True, DEFINITE_FG), (DEFINITE_FG, False, DEFINITE_FG),
    (DEFINITE_BG, True, DEFINITE_BG), (DEFINITE_BG, False, DEFINITE_BG),
]


@pytest.mark.parametrize("state, pred_fg, expected", TRANSITION_TABLE)
def test_state_transition_table(state, pred_fg, expected):
    out = update_with_prediction(np.full((3, 4), state, np.uint8), np.full((3, 4), pred_fg))
    assert out.dtype == np.uint8 and (out == expected).all()


def test_state_transitions_pixelwise_on_a_mixed_map():
    states = np.array([[s for s, _, _ in TRANSITION_TABLE]], np.uint8)
    preds = np.array([[p for _, p, _ in TRANSITION_TABLE]])
    assert update_with_prediction(states, preds).tolist() == [[e for _, _, e in TRANSITION_TABLE]]


def test_state_rules_clicks_and_initial_state():
    prev = np.zeros((8, 8), bool)
    prev[2:6, 2:6] = True
    assert (initial_state(None, (8, 8)) == UNKNOWN).all()
    s0 = initial_state(prev, (8, 8))
    assert (s0[prev] == POSSIBLE_FG).all() and (s0[~prev] == POSSIBLE_BG).all()
    s1 = apply_click(s0, (1.0, 1.0, True), 1.0)
    assert _pixels(s1 == DEFINITE_FG) == {(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)}
    s2 = apply_click(s1, (2.0, 1.0, False), 1.0)  # overlaps: the later click wins
    assert s2[1, 2] == DEFINITE_BG and s2[1, 1] == DEFINITE_BG and s2[0, 1] == DEFINITE_FG
    # re-applying the same clicks to a carried state changes nothing
    assert np.array_equal(state_map([(1.0, 1.0, True), (2.0, 1.0, False)], None, (8, 8), 1.0, s2), s2)


def test_state_is_carried_and_flipped_pixels_pass_through_unknown():
    """A pixel the prediction flips becomes UNKNOWN, and settles one prediction later; the
    carried state differs from the one rebuilt from the last mask alone."""
    prev = np.zeros((6, 6), bool)
    prev[:, :3] = True
    z = initial_state(prev, (6, 6))
    z = apply_click(z, (0.0, 0.0, True), 0.5)
    pred1 = np.zeros((6, 6), bool)
    pred1[:, :4] = True  # column 3 flips bg -> fg
    pred1[0, 0] = True
    z1 = update_with_prediction(z, pred1)
    assert (z1[:, 3] == UNKNOWN).all() and (z1[1:, :3] == POSSIBLE_FG).all() and z1[0, 0] == DEFINITE_FG
    assert not np.array_equal(z1, state_map([(0.0, 0.0, True)], pred1, (6, 6), 0.5))  # memory matters
    z2 = update_with_prediction(z1, pred1)  # the flip is confirmed
    assert (z2[:, 3] == POSSIBLE_FG).all()
    pred3 = pred1.copy()
    pred3[:, 3] = False  # and undone again
    assert (update_with_prediction(z2, pred3)[:, 3] == UNKNOWN).all()


def test_encode_click_maps_one_hot_and_padding():
    maps = encode_click_maps([(3.0, 3.0, True)], None, (12, 12), 1.0)
    assert maps.shape == (8, 12, 12)
    assert np.allclose(maps[2:7].sum(0).numpy(), 1.0) and (maps[7] == 0).all()  # no previous mask
    prev = np.zeros((12, 12), bool)
    prev[5:9, 5:9] = True
    assert np.array_equal(encode_click_maps([], prev, (12, 12), 1.0)[7].numpy() > 0, prev)
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
