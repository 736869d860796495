import numpy as np
import pytest

from exits.data.extreme_points import box_from_extreme_points, derive_extreme_points


def test_rectangle_points_are_medians_of_extreme_lines():
    m = np.zeros((10, 12), np.uint8)
    m[2:7, 3:9] = 1  # rows 2..6, cols 3..8
    pts = derive_extreme_points(m)
    # top row 2: cols 3..8 -> lower median of 6 values is 5; left col 3: rows 2..6 -> 4
    assert pts.tolist() == [[5, 2], [3, 4], [5, 6], [8, 4]]
    assert box_from_extreme_points(pts) == (3.0, 2.0, 6.0, 5.0)


def test_hand_drawn_diamond_hits_tips():
    m = np.zeros((9, 9), np.uint8)
    for r in range(9):
        half = 4 - abs(4 - r)
        m[r, 4 - half:4 + half + 1] = 1
    assert derive_extreme_points(m).tolist() == [[4, 0], [0, 4], [4, 8], [8, 4]]


def test_separated_mask_points_lie_on_the_mask():
    m = np.zeros((20, 20), np.uint8)
    m[1:4, 10:15] = 1   # upper part
    m[12:19, 2:6] = 1   # lower-left part
    pts = derive_extreme_points(m).astype(int)
    assert pts.tolist() == [[12, 1], [2, 15], [3, 18], [14, 2]]
    for x, y in pts:
        assert m[y, x] == 1


def test_empty_mask_rejected():
    with pytest.raises(ValueError, match="empty"):
        derive_extreme_points(np.zeros((5, 5)))
