"""Box-constrained dense CRF at image resolution: the final refinement of a pseudo mask.

Stage 1d's generator predicts an S x S crop probability p (S = 96 in the demo). Refining
it with a CRF on the crop and then resampling to the image blurs the boundary by the
crop-to-image scale. Here the CRF runs on the crop window of the original image, at image
resolution (pydensecrf, ``exits.crf.dense``'s energy), with what the extreme points
guarantee built into the prior:

    prior(x) = 0                                        outside the extreme-point box
    prior(x) = clip(b + w (p~(x) - 1/2), 0, 1)           inside it
    prior(x) = 1                                        in a disk of r px around each extreme point
    U(fg) = -log max(prior, 1e-5),  U(bg) = -log max(1 - prior, 1e-5)
    pairwise: Gaussian (sxy_gauss px) + bilateral (sxy = sxy_frac * max(window side),
              srgb in 0..255 units), Potts
    mask = Q(fg) > 1/2 inside the box,

with p~ the crop probability resampled to the window (bilinear, ``paste_mask``'s map) from
its values inside the box only (the zeros stage 1d leaves outside the box are not resampled
in: :func:`image_crf_prior`), then restricted to the box at window resolution.
w < 1 softens the generator's confident mistakes into a prior the colour kernel can
overrule; b = 1/2, w = 0 is the uninformed box (the CRF then only sees colour); the
box-prior dense-CRF peer (``exits.baselines.dense_crf_box_mask``) is b = 0.55, w = 0.

Deviation from the paper (EXITS takes the generator's mask as it is). Chosen on the demo
split only, with two demo-config generators A (an older run, no EMA warm-up) and B (seed 0
of bench/bench_stage1.py), mIoU all / separated:

    crop-level dense CRF, then paste (the former stage 1d)   A 76.5 / 65.4   B 76.5 / 62.5
    image-level, b 0.5, w 1.0                                A 78.1 / 66.7
    image-level, b 0.5, w 0.4                                A 80.1 / 70.0
    image-level, b 0.5, w 0.3                                A 80.6 / 70.9   B 80.1 / 67.4
    image-level, b 0.5, w 0.2                                A 81.6 / 72.4   B 81.0 / 68.9
    image-level, b 0.5, w 0.15 (default)                     A 82.0 / 73.4   B 81.5 / 70.1
    image-level, b 0.5, w 0.1                                A 81.1 / 73.1   B 81.0 / 70.3
    image-level, b 0.48 / 0.52, w 0.2                        A 80.8 / 72.6, 80.9 / 70.6
    image-level, b 0.5, w 0.2, sxy_frac 0.4                  A 78.0 / 71.4

These were measured with the former prior, which resampled the zeros outside the box in
(see :func:`image_crf_prior`); removing that bias moved a small demo run (3 + 8 epochs, same
generator) from 81.24 / 71.78 to 81.25 / 71.81.

About 60 ms per object on one CPU thread (pydensecrf), under load.
"""
from __future__ import annotations

from typing import Any, Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from exits.data.crops import CropWindow

DEFAULT_IMAGE_CRF: dict[str, float] = {"prior_bias": 0.5, "prior_weight": 0.15, "iters": 10, "sxy_gauss": 3.0,
                                       "compat_gauss": 3.0, "sxy_frac": 0.2, "srgb": 13.0, "compat_bilateral": 10.0}
_CLIP = 1e-5


def box_prior_crf(image_rgb: np.ndarray, window: CropWindow, points: np.ndarray, inside_prob: np.ndarray | float, *,
                  point_radius: int = 2, iters: int = 10, sxy_gauss: float = 3.0, compat_gauss: float = 3.0,
                  sxy_frac: float = 0.2, srgb: float = 13.0, compat_bilateral: float = 10.0) -> np.ndarray:
    """Dense CRF over the crop window of ``image_rgb`` with a box prior (see module docstring).

    Args:
        image_rgb: (H, W, 3) uint8 image.
        window: the object's crop window (inside the image).
        points: (4, 2) extreme points [x, y], image pixel indices (top, left, bottom, right).
        inside_prob: FG prior inside the box: a float, or (window.height, window.width)
            float array over the window (only its box part is read).
    Returns:
        (H, W) bool mask, False outside the box.
    """
    fg = box_prior_crf_window(image_rgb, window, points, inside_prob, point_radius=point_radius, iters=iters,
                              sxy_gauss=sxy_gauss, compat_gauss=compat_gauss, sxy_frac=sxy_frac, srgb=srgb,
                              compat_bilateral=compat_bilateral)
    return paste_window_mask(fg, window, image_rgb.shape[0], image_rgb.shape[1])


def paste_window_mask(window_mask: np.ndarray, window: CropWindow, height: int, width: int) -> np.ndarray:
    """(window.height, window.width) bool -> (height, width) bool, False outside the window."""
    out = np.zeros((height, width), bool)
    out[window.y0:window.y0 + window.height, window.x0:window.x0 + window.width] = window_mask
    return out


def box_prior_crf_window(image_rgb: np.ndarray, window: CropWindow, points: np.ndarray,
                         inside_prob: np.ndarray | float, *, point_radius: int = 2, iters: int = 10,
                         sxy_gauss: float = 3.0, compat_gauss: float = 3.0, sxy_frac: float = 0.2, srgb: float = 13.0,
                         compat_bilateral: float = 10.0) -> np.ndarray:
    """:func:`box_prior_crf` on the window only: (window.height, window.width) bool.

    What the CRF worker processes of ``exits.stages.image_crf_pool`` run: the window
    mask is all they send back.
    """
    import pydensecrf.densecrf as dcrf

    x0, y0, ww, wh = window.as_list()
    # pydensecrf reads raw buffers: uint8 C-contiguous HxWx3 image, float32 C-contiguous unaries.
    sub = np.ascontiguousarray(image_rgb[y0:y0 + wh, x0:x0 + ww], dtype=np.uint8)
    q = np.asarray(points).round().astype(int) - np.array([x0, y0])
    box = (slice(max(0, q[0, 1]), q[2, 1] + 1), slice(max(0, q[1, 0]), q[3, 0] + 1))
    prior = np.zeros((wh, ww), np.float32)
    prior[box] = inside_prob[box] if isinstance(inside_prob, np.ndarray) else float(inside_prob)
    disks = np.zeros((wh, ww), np.uint8)
    for x, y in q:
        cv2.circle(disks, (int(x), int(y)), point_radius, 1, -1)
    prior[disks > 0] = 1.0
    unary = np.ascontiguousarray(-np.log(np.clip(np.stack([1.0 - prior, prior]).reshape(2, -1), _CLIP, 1.0)),
                                 dtype=np.float32)
    crf = dcrf.DenseCRF2D(ww, wh, 2)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=sxy_gauss, compat=compat_gauss)
    crf.addPairwiseBilateral(sxy=sxy_frac * max(ww, wh), srgb=srgb, rgbim=sub, compat=compat_bilateral)
    fg = np.asarray(crf.inference(int(iters)), dtype=np.float32).reshape(2, wh, ww)[1] > 0.5
    inside = np.zeros((wh, ww), bool)
    inside[box] = True
    return fg & inside


def crop_support(crop_prob: torch.Tensor) -> torch.Tensor:
    """(S, S) float {0, 1}: the smallest rectangle of crop pixels holding every nonzero value
    of ``crop_prob`` (all zeros when there is none).

    Stage 1d's crop probabilities are zero outside the object's box
    (``exits.stages.pseudo_labels.predict_crop_probs`` multiplies by the crop's box mask, a
    rectangle of crop pixels): there the zeros are no answer of the generator, and this
    rectangle is that box. A probability that was not cut to a box has its nonzero values
    (nearly) everywhere, and the rectangle is (nearly) the whole crop."""
    nz = crop_prob != 0
    rows, cols = nz.any(dim=1), nz.any(dim=0)
    return (rows[:, None] & cols[None, :]).float()


def image_crf_prior(crop_prob: torch.Tensor, window: CropWindow, *, prior_bias: float = DEFAULT_IMAGE_CRF["prior_bias"],
                    prior_weight: float = DEFAULT_IMAGE_CRF["prior_weight"]) -> np.ndarray:
    """(window.height, window.width) float32 prior clip(b + w (p~ - 1/2), 0, 1) from an (S, S)
    crop probability p, with p~ its bilinear resampling to the window (module docstring).

    p~ resamples only the values inside the crop's box (:func:`crop_support`, the rectangle
    of p's nonzero values): p~ = R(p m) / R(m), R the bilinear resampling, m the box's crop
    pixels, wherever R(m) > 0 (0 elsewhere, outside the box). Resampling the zeros outside
    the box in as values would pull the box's edge rows and columns at window resolution
    towards 0 (a constant p = 0.9 became p~ ~ 0.3 in the window's box corners, a prior
    under 1/2); the box is applied at window resolution afterwards
    (:func:`box_prior_crf_window`)."""
    size = (window.height, window.width)
    def resample(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]

    prob = crop_prob.float()
    support = crop_support(prob)
    weight = resample(support)
    local = torch.where(weight > 0, resample(prob * support) / weight.clamp_min(1e-12), torch.zeros_like(weight))
    return np.clip(prior_bias + prior_weight * (local.numpy() - 0.5), 0.0, 1.0).astype(np.float32)


def split_image_crf_params(params: Mapping[str, float]) -> tuple[dict[str, float], dict[str, Any]]:
    """User ``image_crf`` settings -> (prior_bias / prior_weight, :func:`box_prior_crf` keywords),
    defaults from ``DEFAULT_IMAGE_CRF``."""
    merged = {**DEFAULT_IMAGE_CRF, **params}
    prior = {k: merged.pop(k) for k in ("prior_bias", "prior_weight")}
    crf: dict[str, Any] = dict(merged)
    crf["iters"] = int(crf["iters"])
    return prior, crf


def image_crf_refine(image_rgb: np.ndarray, crop_prob: torch.Tensor, window: CropWindow, points: np.ndarray,
                     **params: float) -> np.ndarray:
    """(H, W) bool pseudo mask from an (S, S) crop probability (module docstring's formula).

    ``params``: prior_bias, prior_weight (:func:`image_crf_prior`) and iters, sxy_gauss,
    compat_gauss, sxy_frac, srgb, compat_bilateral of :func:`box_prior_crf` (defaults
    ``DEFAULT_IMAGE_CRF``).
    """
    prior, crf = split_image_crf_params(params)
    return box_prior_crf(image_rgb, window, points, image_crf_prior(crop_prob, window, **prior), **crf)
