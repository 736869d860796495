"""The GrabCut mechanics shared by the peer, the click benchmark's reference and the editor."""
import cv2
import numpy as np

from exits.baselines import grabcut_mask
from exits.data.crops import CropWindow
from exits.grabcut import ensure_background, is_foreground, run_grabcut


def two_colour_image() -> np.ndarray:
    img = np.zeros((40, 40, 3), np.uint8)
    img[:] = (30, 120, 30)
    img[10:30, 12:28] = (220, 40, 40)  # a red square on green
    return img


def test_ensure_background_marks_only_probable_border_pixels():
    labels = np.full((5, 6), cv2.GC_PR_FGD, np.uint8)
    labels[0, 0] = cv2.GC_FGD  # a sure label on the border stays
    ensure_background(labels)
    assert labels[0, 0] == cv2.GC_FGD
    assert (labels[1:-1, 1:-1] == cv2.GC_PR_FGD).all()
    border = np.ones((5, 6), bool)
    border[1:-1, 1:-1] = False
    assert (labels[border] == cv2.GC_PR_BGD).sum() == border.sum() - 1
    untouched = np.full((3, 3), cv2.GC_PR_FGD, np.uint8)
    untouched[1, 1] = cv2.GC_BGD
    assert (ensure_background(untouched.copy()) == untouched).all()  # has background: unchanged


def test_run_grabcut_finds_the_square_and_is_deterministic():
    img = two_colour_image()
    results = []
    for _ in range(2):
        labels = np.full((40, 40), cv2.GC_BGD, np.uint8)
        labels[6:34, 8:32] = cv2.GC_PR_FGD
        assert run_grabcut(img, labels, 0, 0, iters=3)
        results.append(is_foreground(labels))
    assert (results[0] == results[1]).all()
    truth = np.zeros((40, 40), bool)
    truth[10:30, 12:28] = True
    iou = (results[0] & truth).sum() / (results[0] | truth).sum()
    assert iou > 0.95


def test_grabcut_peer_with_the_box_filling_the_window():
    img = two_colour_image()[10:30, 12:28].copy()  # the square only: box = window = image
    points = np.array([[8, 0], [0, 10], [8, 19], [15, 10]], float)
    mask = grabcut_mask(img, points, CropWindow(0, 0, 16, 20, 32))
    assert mask.shape == (20, 16) and mask.dtype == np.uint8
    assert mask.mean() > 0.9  # one colour inside: everything stays foreground
