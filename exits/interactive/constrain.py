"""Clicks are always respected: the decoder's probabilities refined under hard click labels.

A learned decoder may leave a clicked pixel with the wrong label (the click is only an
input). As graph-cut editors do (GrabCut, and the "probability map + hard seeds" step of
interactive segmenters), the decoder's output is taken as the unary of a dense CRF
(Kraehenbuehl & Koltun 2011) in which every click disk is a hard constraint:

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) [w_g k_g(i, j) + w_b k_b(i, j)]
    psi_u(x_i = fg) = -log p_i - lam log c_i,  psi_u(x_i = bg) = -log(1 - p_i) - lam log(1 - c_i)
    (p clipped to [eps, 1-eps]); inside a disk of a click with label l: psi_u(l) = 0 and
    psi_u(not l) = -log eps (eps = 1e-6): a hard label
    c_i = H_fg(b_i) / (H_fg(b_i) + H_bg(b_i))   a click-conditioned colour model: colour
          histograms (8 levels per RGB channel, b_i the bin of pixel i, +1 smoothing) with
          weights H_fg += p_j + K [j in a positive disk], H_bg += (1 - p_j) + K [j in a
          negative disk], K = 20 (as GrabCut's colour models, but seeded by the decoder)
    k_g = exp(-|p_i - p_j|^2 / (2 * 3^2)),  w_g = 3
    k_b = exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2)),  w_b = ``crf_w``
    mu = Potts; mean-field inference, ``crf_iters`` steps (pydensecrf)

so a click's label spreads to the colour-similar pixels around it even where the decoder
ignored it, and elsewhere the decoder's mask gets colour-consistent boundaries. Without
the colour term (lam = 0) a clamped disk hardly moves an unsure region: every other pixel
of the region votes with the decoder's bias (checked in tests/test_interactive_paper.py). Mean field
only approximates the energy's minimum, so the disks are finally set to their labels: the
output keeps every click, whatever the decoder did (``constraint="disk"`` is that last
step alone, ``"none"`` the plain decoder).

``constraint="grabcut"``: a graph cut instead of the mean field. OpenCV's GrabCut starts
from the decoder's mask (p >= 0.5 probable fg, else probable bg), the disks as definite
labels, and runs ``crf_iters`` rounds of GMM colour models + min-cut. A min-cut honours the
hard labels exactly, and GrabCut's colour models keep improving boundaries over rounds where
a learned decoder stops short (docs/benchmarks.md, spot-fix: GrabCut alone needs fewer
clicks to 90 % IoU but more to the first 85 %); the decoder's probabilities enter only
through the initial labels (OpenCV's GrabCut has no custom unary).

Works on whatever grid it is given: the predictor passes the object's window at the
image's own pixels (``crf_resolution: window``, the default: the decoder's probabilities
resampled to the window, so the boundary can follow image edges finer than the encoder's
crop resolves) or the S x S crop. Inputs whose long side exceeds ``max_size`` are refined at
that size (the CRF's cost is linear in pixels) with ``sxy`` scaled to it, and the labels
upsampled.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from exits.interactive.clicks import Click, click_label_map

__all__ = ["CrfKernels", "click_unary", "colour_model", "constrain_clicks", "crf_with_clicks", "grabcut_with_clicks"]

EPS = 1e-6


def colour_model(prob: np.ndarray, image_rgb: np.ndarray, labels: np.ndarray, levels: int = 8,
                 click_weight: float = 20.0) -> np.ndarray:
    """(H, W) float32 c_i = H_fg / (H_fg + H_bg) of pixel i's colour bin (module doc)."""
    q = (np.asarray(image_rgb, np.int64) * levels) // 256
    bins = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    flat = bins.ravel()
    p = np.asarray(prob, np.float64).ravel()
    w_fg = p + click_weight * (labels.ravel() > 0)
    w_bg = (1 - p) + click_weight * (labels.ravel() < 0)
    n = levels ** 3
    h_fg = np.bincount(flat, weights=w_fg, minlength=n) + 1.0
    h_bg = np.bincount(flat, weights=w_bg, minlength=n) + 1.0
    return (h_fg / (h_fg + h_bg))[bins].astype(np.float32)


def click_unary(prob: np.ndarray, image_rgb: np.ndarray, labels: np.ndarray, colour: float) -> np.ndarray:
    """(2, H*W) float32 energies [bg, fg] of the module doc: decoder term, colour term with
    weight ``colour`` (0 = off), hard labels inside the click disks."""
    p = np.clip(np.asarray(prob, np.float32), EPS, 1 - EPS)
    e_fg, e_bg = -np.log(p), -np.log(1 - p)
    if colour > 0:
        c = np.clip(colour_model(p, image_rgb, labels), EPS, 1 - EPS)
        e_fg, e_bg = e_fg - colour * np.log(c), e_bg - colour * np.log(1 - c)
    hard = -np.log(EPS)
    e_fg = np.where(labels > 0, 0.0, np.where(labels < 0, hard, e_fg))
    e_bg = np.where(labels < 0, 0.0, np.where(labels > 0, hard, e_bg))
    return np.ascontiguousarray(np.stack([e_bg, e_fg]).reshape(2, -1), dtype=np.float32)


class CrfKernels:
    """The image-only part of the click CRF of one object, built once and reused per click.

    The pairwise kernels (pydensecrf's permutohedral lattice for the bilateral term, the
    Gaussian term) and the image resized to the working size depend on the image alone, not
    on the clicks: building them was 7 of the CRF's 18 ms per click at 128 px and 25 of 58
    ms at 192 px (2-core VM). The predictor keeps one per object with its cached features
    and builds it in ``prepare``. Each click only sets a new unary and runs the mean field
    (same marginals as a fresh CRF, tested). A lock serialises clicks on one object (the web
    server may prefetch and answer on different threads).

    image: (3, H, W) in [0, 1]; the working size is (H, W) scaled so its long side is at most
    ``max_size``; ``sxy`` in pixels of a 96-px object extent (scaled to the working size).
    """

    def __init__(self, image: torch.Tensor, *, max_size: int, sxy: float, srgb: float, weight: float) -> None:
        h, w = image.shape[-2:]
        scale = min(1.0, int(max_size) / max(h, w))
        zh, zw = max(1, round(h * scale)), max(1, round(w * scale))
        img = image.float()
        if (zh, zw) != (h, w):
            img = F.interpolate(img[None], size=(zh, zw), mode="bilinear", align_corners=False, antialias=True)[0]
        self.size, self.work = (int(h), int(w)), (int(zh), int(zw))
        self.params = (int(max_size), float(sxy), float(srgb), float(weight))
        self.rgb = np.ascontiguousarray((img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        self._sxy = float(sxy) * max(zh, zw) / 96.0
        self._crf = None
        self._lock = threading.Lock()

    def _build(self):
        import pydensecrf.densecrf as dcrf

        zh, zw = self.work
        crf = dcrf.DenseCRF2D(zw, zh, 2)
        crf.addPairwiseGaussian(sxy=3.0, compat=3.0)
        _, _, srgb, weight = self.params
        if weight > 0:
            crf.addPairwiseBilateral(sxy=self._sxy, srgb=srgb, rgbim=self.rgb, compat=float(weight))
        return crf

    def prepare(self) -> "CrfKernels":
        """Build the lattice now (otherwise on the first click)."""
        with self._lock:
            if self._crf is None:
                self._crf = self._build()
        return self

    def marginals(self, prob: np.ndarray, labels: np.ndarray, *, iters: int, colour: float) -> np.ndarray:
        """(zh, zw) float32 foreground marginals for decoder probabilities and click labels at
        the working size (see :func:`crf_with_clicks`)."""
        if prob.shape != self.work or labels.shape != self.work:
            raise ValueError(f"prob {prob.shape} / labels {labels.shape} do not match the working size {self.work}")
        unary = click_unary(prob, self.rgb, labels, colour)
        with self._lock:
            if self._crf is None:
                self._crf = self._build()
            self._crf.setUnaryEnergy(unary)
            q = np.asarray(self._crf.inference(int(iters)), np.float32)
        return q.reshape(2, *self.work)[1]


def crf_with_clicks(prob: np.ndarray, image_rgb: np.ndarray, labels: np.ndarray, *, iters: int = 5,
                    sxy: float = 20.0, srgb: float = 13.0, weight: float = 10.0, colour: float = 1.0) -> np.ndarray:
    """(H, W) float32 foreground marginals of the dense CRF (module doc).

    prob (H, W) decoder probabilities; image_rgb (H, W, 3) uint8; labels (H, W) int8 from
    :func:`exits.interactive.clicks.click_label_map` (+1 fg disk, -1 bg disk, 0 free);
    ``colour`` the weight lam of the click-conditioned colour term (0 = off); ``sxy`` in
    pixels of this grid. One colour model, built from the decoder's p: re-estimating it from
    the CRF's output for 3 rounds (GrabCut's EM) was tried and cost clicks
    (bench/bench_clicks.py tuning split, seed 0: NoC@90 5.90 -> 6.58 at the crop's
    resolution, 4.10 -> 5.00 at the window's).
    """
    import pydensecrf.densecrf as dcrf

    h, w = prob.shape
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(click_unary(prob, image_rgb, labels, colour))
    crf.addPairwiseGaussian(sxy=3.0, compat=3.0)
    if weight > 0:
        crf.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(image_rgb, dtype=np.uint8),
                                 compat=float(weight))
    q = np.asarray(crf.inference(int(iters)), np.float32).reshape(2, h, w)
    return q[1]


def grabcut_with_clicks(prob: np.ndarray, image_rgb: np.ndarray, labels: np.ndarray, *, iters: int = 5) -> np.ndarray:
    """(H, W) float32 0/1 foreground of GrabCut started from the decoder's mask (module doc).

    prob (H, W) decoder probabilities; image_rgb (H, W, 3) uint8; labels (H, W) int8 click
    disks (+1 / -1 / 0). Without any foreground label GrabCut has no fg samples: the
    decoder's mask is returned.
    """
    import cv2

    from exits.grabcut import ensure_background, is_foreground, run_grabcut

    init = np.where(np.asarray(prob) >= 0.5, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    init[labels > 0] = cv2.GC_FGD
    init[labels < 0] = cv2.GC_BGD
    if not is_foreground(init).any():
        return np.zeros(prob.shape, np.float32)
    run_grabcut(np.ascontiguousarray(image_rgb), ensure_background(init), 0, 0, iters=iters)
    return is_foreground(init).astype(np.float32)


def _resized(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h', w') -> size, bilinear with ``align_corners=False`` (the grids cover the same region:
    the map :func:`exits.data.crops.crop_to_window` uses). No antialiasing: the decoder's
    probabilities are smooth, and the demo's numbers stay those of crop_to_window."""
    if prob.shape == tuple(size):
        return prob
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(prob))[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def constrain_clicks(prob: np.ndarray, image: torch.Tensor, clicks: Sequence[Click], radius: float, *,
                     method: str = "crf", iters: int = 5, sxy: float = 20.0, srgb: float = 13.0,
                     weight: float = 10.0, colour: float = 1.0, max_size: int = 256,
                     kernels: CrfKernels | None = None) -> np.ndarray:
    """(H, W) bool mask that keeps every click's label.

    image (3, H, W) in [0, 1] (the S x S crop, or the window at its native pixels); prob
    decoder probabilities over the same region at any resolution (the decoder's grid: it is
    resampled once, straight to the working size); clicks (u, v, positive) in the image's pixels;
    radius the disk radius in its pixels; ``sxy`` in pixels of a 96-px object extent (scaled
    with the working size's long side). Inputs whose long side exceeds ``max_size`` are
    refined at that size and the labels upsampled. method: "crf" | "grabcut" | "disk" |
    "none" (``iters`` is the GrabCut rounds for "grabcut"). ``kernels``: this image's
    cached :class:`CrfKernels` (built with the same size and kernel settings), else built
    for this call.
    """
    h, w = image.shape[-2:]
    prob = np.asarray(prob, np.float32)
    if method in ("none", "disk") or not clicks:
        prob = _resized(prob, (h, w))
    if method == "none" or not clicks:
        return prob >= 0.5
    labels = click_label_map(clicks, (h, w), radius)
    if method in ("crf", "grabcut"):
        if kernels is None:
            kernels = CrfKernels(image, max_size=max_size, sxy=sxy, srgb=srgb, weight=weight)
        elif kernels.size != (h, w) or kernels.params != (int(max_size), float(sxy), float(srgb), float(weight)):
            raise ValueError(f"cached CRF kernels are for {kernels.size} with {kernels.params}, "
                             f"not {(h, w)} with {(max_size, sxy, srgb, weight)}")
        zh, zw = kernels.work
        p_z = _resized(prob, (zh, zw))
        if (zh, zw) != (h, w):
            sy, sx = zh / h, zw / w
            lab_z = click_label_map([(u * sx + 0.5 * sx - 0.5, v * sy + 0.5 * sy - 0.5, pos)
                                     for u, v, pos in clicks], (zh, zw), max(radius * max(sx, sy), 1.0))
        else:
            lab_z = labels
        if method == "crf":
            q = kernels.marginals(p_z, lab_z, iters=iters, colour=colour)
        else:
            q = grabcut_with_clicks(p_z, kernels.rgb, lab_z, iters=iters)
        if (zh, zw) != (h, w):
            q = F.interpolate(torch.from_numpy(q)[None, None], size=(h, w), mode="bilinear",
                              align_corners=False)[0, 0].numpy()
        out = q >= 0.5
    elif method == "disk":
        out = prob >= 0.5
    else:
        raise ValueError(f"unknown constraint method {method!r}")
    out[labels > 0] = True
    out[labels < 0] = False
    return out
