"""The triage signals of a final mask (exits.stages.mask_quality), on small hand-made masks."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from exits.stages.mask_quality import REACH_TAU, box_fit, extreme_point_reach, mask_agreement

# A diamond-ish object in a 40 x 50 image: extreme points on its outline (x, y).
H, W = 40, 50
POINTS = np.array([[25, 5], [10, 20], [24, 34], [40, 19]], dtype=float)  # top, left, bottom, right


def diamond() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    cx, cy = 25, 19.5
    inside = np.abs(xx - cx) / 15.5 + np.abs(yy - cy) / 15 <= 1.0
    inside[5, 25] = inside[20, 10] = inside[34, 24] = inside[19, 40] = True
    return inside


def test_the_object_itself_scores_one_on_both_signals() -> None:
    m = diamond()
    assert box_fit(m, POINTS) == pytest.approx(1.0)
    assert extreme_point_reach(m, POINTS) == pytest.approx(1.0)


def test_a_mask_cut_in_half_loses_box_fit_and_reach() -> None:
    m = diamond()
    half = m.copy()
    half[:, 26:] = False  # the right half is missing: the right extreme point is 14 px away
    # box [10, 40] x [5, 34] vs mask box [10, 25] x [5, 34]: 16 / 31 columns
    assert box_fit(half, POINTS) == pytest.approx(16 / 31)
    diag = np.hypot(31, 30)
    d_right = np.hypot(40 - 25, 0)  # nearest kept pixel of row 19 is (25, 19)
    expected = (3 + np.exp(-d_right / (REACH_TAU * diag))) / 4
    assert extreme_point_reach(half, POINTS) == pytest.approx(expected, rel=1e-6)


def test_reach_equals_the_distance_transform() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((H, W)) < 0.02
        m[3, 3] = True
        d_edt = distance_transform_edt(~m)
        expected = np.mean([np.exp(-d_edt[int(y), int(x)] / (REACH_TAU * np.hypot(31, 30))) for x, y in POINTS])
        assert extreme_point_reach(m, POINTS) == pytest.approx(expected, rel=1e-9)


def test_empty_and_disjoint_masks() -> None:
    empty = np.zeros((H, W), bool)
    assert box_fit(empty, POINTS) == 0.0 and extreme_point_reach(empty, POINTS) == 0.0
    far = np.zeros((H, W), bool)
    far[0:3, 45:50] = True  # outside the extreme-point box
    assert box_fit(far, POINTS) == 0.0
    assert extreme_point_reach(far, POINTS) < 0.05


def test_mask_agreement_is_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert mask_agreement(a, b) == pytest.approx(4 / 12)
    assert mask_agreement(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
