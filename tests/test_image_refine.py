"""Box-constrained dense CRF at image resolution (stage 1d's final refinement)."""
from __future__ import annotations

import numpy as np
import torch

from exits.crf.image_refine import box_prior_crf, image_crf_refine
from exits.data.crops import crop_mask, crop_window
from exits.data.extreme_points import derive_extreme_points


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """120x160 image: a red ellipse (the object) on a textured green/blue background."""
    rng = np.random.default_rng(0)
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    obj = ((xx - 80) / 40.0) ** 2 + ((yy - 60) / 30.0) ** 2 <= 1.0
    img = np.zeros((h, w, 3), np.float32)
    img[..., 1] = 120 + 40 * (xx // 10 % 2)
    img[..., 2] = 160
    img[obj] = (200, 40, 40)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), obj


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_refinement_recovers_the_object_from_a_coarse_prior() -> None:
    img, obj = _scene()
    pts = derive_extreme_points(obj).astype(float)
    win = crop_window(pts, img.shape[1], img.shape[0], margin=0.15, min_margin_px=4, size=32)
    # A coarse, shifted crop probability: the GT cropped to 32 px, blurred and moved 3 px.
    gt_crop = crop_mask(torch.from_numpy(obj.astype(np.float32)), win)
    coarse = torch.roll(torch.nn.functional.avg_pool2d(gt_crop[None, None], 5, 1, 2)[0, 0], shifts=3, dims=1)
    naive = torch.nn.functional.interpolate(coarse[None, None], size=(win.height, win.width), mode="bilinear",
                                            align_corners=False)[0, 0].numpy() >= 0.5
    naive_full = np.zeros_like(obj)
    naive_full[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width] = naive
    refined = image_crf_refine(img, coarse, win, pts)
    assert refined.shape == obj.shape and refined.dtype == bool
    assert _iou(refined, obj) > 0.95 > _iou(naive_full, obj)
    # Nothing outside the extreme-point box; the extreme points themselves are foreground.
    x0, y0, x1, y1 = pts[1, 0], pts[0, 1], pts[3, 0], pts[2, 1]
    ys, xs = np.nonzero(refined)
    assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
    assert all(refined[int(y), int(x)] for x, y in pts)


def test_a_flat_half_prior_is_decided_by_colour_and_a_sure_prior_is_kept() -> None:
    img, obj = _scene()
    pts = derive_extreme_points(obj).astype(float)
    win = crop_window(pts, img.shape[1], img.shape[0], margin=0.15, min_margin_px=4, size=32)
    box_only = box_prior_crf(img, win, pts, 0.55)
    assert _iou(box_only, obj) > 0.9  # the colour kernel carves the ellipse out of the box
    # A confident wrong prior (everything FG inside the box) is not overruled.
    stuck = box_prior_crf(img, win, pts, 1.0)
    box = np.zeros_like(obj)
    box[int(pts[0, 1]):int(pts[2, 1]) + 1, int(pts[1, 0]):int(pts[3, 0]) + 1] = True
    assert (stuck == box).all()


def test_meanfield_work_size_reaches_the_dense_crf_at_512_px() -> None:
    from exits.crf import crf_refine
    from exits.crf.synthetic import make_disk_scene, mask_iou

    torch.manual_seed(0)
    scene = make_disk_scene(512, seed=0)
    img, prob = scene.image[None], scene.prob[None]
    dense = mask_iou(crf_refine(img, prob, impl="dense")[0, 0] > 0.5, scene.mask)
    full = mask_iou(crf_refine(img, prob, impl="meanfield")[0, 0] > 0.5, scene.mask)
    small = crf_refine(img, prob, impl="meanfield", work_size=128, iters=20)
    assert small.shape == prob.shape and 0 <= float(small.min()) and float(small.max()) <= 1
    low = mask_iou(small[0, 0] > 0.5, scene.mask)
    assert low > dense + 0.1 and low > full + 0.1
