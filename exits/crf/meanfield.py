"""Batched local-window mean-field CRF in PyTorch (ConvCRF-style), on the input's device.

Written here because the CRF loss refines a teacher mask at every training step on the
training device (GPU): pydensecrf is CPU-only and goes one image at a time.

Following ConvCRF (Teichmann & Cipolla 2018), each pixel i only talks to pixels j in a
k x k window (optionally dilated) around it, which keeps every step a dense tensor op.
Mean-field update for labels l in {bg, fg}:

    Q_i(l) <- softmax_l( -U_i(l) - sum_m w_m sum_{l'} mu(l, l') sum_{j != i} kbar_m(i, j) Q_j(l') ),
    kbar_m(i, j) = k_m(i, j) / (1 + sum_{j' != i} k_m(i, j')),

with k_m, U, mu (Potts) as in ``exits.crf.common``. The "1 +" is the pixel's own kernel
weight (k(i, i) = 1) in the normaliser, as a dense-CRF filter that includes i: a pixel with
no similar neighbours gets little pairwise pull, a pixel in a uniform region gets up to w_m.
With two labels and Potts, sum_{l'} [l != l'] Q_j(l') = 1 - Q_j(l), so the softmax is

    Q_i(fg) = sigmoid( log(p_i / (1 - p_i)) + sum_m w_m (2 m_m,i - s_m,i) ),
    m_m,i = sum_{j != i} kbar_m(i, j) Q_j(fg),  s_m,i = sum_{j != i} kbar_m(i, j),

one channel, exactly the softmax above. The spatial Gaussian kernel is a fixed separable
convolution (radius ceil(2 sxy_gauss)); the bilateral kernel is precomputed per image as (K, H, W)
weights for the K = window^2 - 1 offsets, so memory is about K H W floats per image in
flight; ``max_kernel_mib`` splits the batch into chunks that respect it (exact: images are
independent).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from exits.crf.common import DEFAULT_CRF_PARAMS, check_crf_inputs, image_to_255

DEFAULT_WINDOW = 11
DEFAULT_DILATION = 2
DEFAULT_MAX_KERNEL_MIB = 512.0
_MIN_LOG_WEIGHT = 20.0
_WEIGHT_FLOOR = math.exp(-_MIN_LOG_WEIGHT)
# Q is kept in [sigmoid(-30), sigmoid(30)]: far smaller values would be float32 subnormals
# (slow, see bilateral_weights), and 1e-13 vs 1e-40 changes nothing downstream.
_MAX_LOGIT = 30.0


def _window_offsets(window: int, dilation: int) -> list[tuple[int, int]]:
    r = window // 2
    return [(dy * dilation, dx * dilation) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]


def _shifted(padded: torch.Tensor, dy: int, dx: int, pad: int, height: int, width: int) -> torch.Tensor:
    """View of ``padded`` (.., H + 2 pad, W + 2 pad) holding x[i + (dy, dx)] at position i."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def bilateral_weights(
    colour: torch.Tensor, offsets: list[tuple[int, int]], sxy: float, srgb: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised bilateral kernel for each window offset.

    kbar[o, b, y, x] = k(i, i + o) / (1 + sum_o' k(i, i + o')), k = 0 outside the image.

    Args:
        colour: (B, 3, H, W) colours in 0..255 units.
        offsets: list of K (dy, dx) offsets, centre excluded.
    Returns:
        kbar (K, B, H, W) (offset-major, so each offset's slice is contiguous) and
        s = sum_o kbar, (B, H, W).
    """
    batch, _, height, width = colour.shape
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    col_pad = F.pad(colour, (pad, pad, pad, pad))
    valid_pad = F.pad(torch.ones_like(colour[:, 0]), (pad, pad, pad, pad))
    weights = colour.new_empty((len(offsets), batch, height, width))
    inv_rgb = 1.0 / (2.0 * srgb * srgb)
    for o, (dy, dx) in enumerate(offsets):
        arg = (_shifted(col_pad, dy, dx, pad, height, width) - colour).square_().sum(1)
        arg.mul_(-inv_rgb).sub_((dy * dy + dx * dx) / (2.0 * sxy * sxy))
        # k' = exp(max(arg, -20)) - e^-20: exactly 0 for negligible weights, off by at most
        # 2e-9 elsewhere. exp(-88..-103) would give float32 subnormals, and arithmetic on
        # subnormals is ~100x slower on x86 CPUs (measured: 2 ms vs 20 us per 96x96x8
        # multiply-add); exp(-inf) is 4x slower than a clamped exp.
        arg.clamp_min_(-_MIN_LOG_WEIGHT).exp_().sub_(_WEIGHT_FLOOR)
        torch.mul(arg, _shifted(valid_pad, dy, dx, pad, height, width), out=weights[o])
    total = weights.sum(0)
    weights.div_(1.0 + total)
    return weights, total / (1.0 + total)


def gaussian_taps(sxy: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D taps g(d) = exp(-d^2 / (2 sxy^2)), d = -r..r, r = ceil(2 sxy); g(0) = 1."""
    r = max(1, math.ceil(2.0 * sxy))
    d = torch.arange(-r, r + 1, dtype=dtype, device=device)
    return torch.exp(-(d * d) / (2.0 * sxy * sxy))


def gaussian_filter_excluding_centre(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """sum_{j != i} exp(-|p_i - p_j|^2 / (2 sxy^2)) x_j over a (2r+1)^2 window, zero outside.

    The 2-D Gaussian is separable, g(dy) g(dx), so it runs as two 1-D convolutions (2(2r+1)
    instead of (2r+1)^2 taps); its centre weight is g(0)^2 = 1, removed by subtracting x.

    Args:
        x: (B, 1, H, W).  taps: (2r+1,) from ``gaussian_taps``.
    Returns:
        (B, 1, H, W).
    """
    r = taps.numel() // 2
    y = F.conv2d(x, taps.view(1, 1, 1, -1), padding=(0, r))
    y = F.conv2d(y, taps.view(1, 1, -1, 1), padding=(r, 0))
    return y - x


def _meanfield_chunk(
    colour: torch.Tensor,
    logit0: torch.Tensor,
    iters: int,
    sxy_gauss: float,
    compat_gauss: float,
    sxy_bilateral: float,
    srgb: float,
    compat_bilateral: float,
    offsets: list[tuple[int, int]],
) -> torch.Tensor:
    _, _, height, width = logit0.shape
    taps = gaussian_taps(sxy_gauss, logit0.dtype, logit0.device)
    # Zero padding + dividing by the in-image kernel mass: pixels outside the crop neither
    # vote nor dilute the votes of those inside.
    mass_g = gaussian_filter_excluding_centre(torch.ones_like(logit0[:1]), taps)
    norm_g = 1.0 + mass_g
    w_b, s_b = bilateral_weights(colour, offsets, sxy_bilateral, srgb)
    pad_b = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    # Constant part of the pairwise term: -w_g s_g - w_b s_b.
    base = logit0 - compat_gauss * (mass_g / norm_g) - compat_bilateral * s_b[:, None]
    gain_g = 2.0 * compat_gauss / norm_g
    q = torch.sigmoid(logit0)
    m_b = torch.empty_like(q[:, 0])
    for _ in range(int(iters)):
        m_g = gaussian_filter_excluding_centre(q, taps)
        q_pad = F.pad(q[:, 0], (pad_b, pad_b, pad_b, pad_b))
        m_b.zero_()
        for o, (dy, dx) in enumerate(offsets):
            m_b.addcmul_(w_b[o], _shifted(q_pad, dy, dx, pad_b, height, width))
        logit = base + gain_g * m_g + (2.0 * compat_bilateral) * m_b[:, None]
        q = torch.sigmoid(logit.clamp_(-_MAX_LOGIT, _MAX_LOGIT))
    return q


def meanfield_crf(
    image: torch.Tensor,
    prob: torch.Tensor,
    iters: int = int(DEFAULT_CRF_PARAMS["iters"]),
    sxy_gauss: float = DEFAULT_CRF_PARAMS["sxy_gauss"],
    compat_gauss: float = DEFAULT_CRF_PARAMS["compat_gauss"],
    sxy_bilateral: float = DEFAULT_CRF_PARAMS["sxy_bilateral"],
    srgb: float = DEFAULT_CRF_PARAMS["srgb"],
    compat_bilateral: float = DEFAULT_CRF_PARAMS["compat_bilateral"],
    clip: float = DEFAULT_CRF_PARAMS["clip"],
    window: int = DEFAULT_WINDOW,
    dilation: int = DEFAULT_DILATION,
    max_kernel_mib: float = DEFAULT_MAX_KERNEL_MIB,
    work_size: int | None = None,
) -> torch.Tensor:
    """Batched local-window mean-field CRF (see module docstring for the update).

    Args:
        image: (B, 3, H, W) uint8 in 0..255 or float in [0, 1].
        prob: (B, 1, H, W) float foreground probability; sets dtype and device.
        iters: mean-field steps.
        sxy_gauss, compat_gauss: spatial-kernel width (px) and weight.
        sxy_bilateral, srgb, compat_bilateral: bilateral widths (px, 0..255 colour units)
            and weight; the bilateral kernel is truncated to the window.
        clip: unary floor, U = -log max(q, clip) (as pydensecrf's ``unary_from_softmax``).
        window: odd bilateral window size k (k^2 - 1 neighbours per pixel).
        dilation: spacing of the window taps; reach = dilation * (k // 2) px.
        max_kernel_mib: memory budget of the bilateral kernel of one chunk of the batch.
        work_size: if set and max(H, W) > work_size, the CRF runs on a copy resized by
            r = work_size / max(H, W) (image and prob area-averaged), and Q is resized back
            bilinearly. Spatial parameters (sxy_*, dilation) are then in pixels of the
            resized copy. Why: a k x k window reaches dilation * (k // 2) px, so at 512 px
            the default window sees a small part of the object and ten steps move a wrong
            boundary only a few pixels (512 px disk scene, bench/bench_crf.py: IoU
            0.688 -> 0.715, dense CRF 0.782); at work_size 128 the same window covers 4x
            the reach for 1/16 of the pixels (0.867 at 10 steps, 0.978 at 20, ~10x faster).
    Returns:
        (B, 1, H, W) Q(fg) in [0, 1], dtype and device of ``prob``. Half precision inputs
        are computed in float32 (exp/normalisation underflow in fp16) and cast back.
    """
    check_crf_inputs(image, prob)
    height, width = prob.shape[-2:]
    if work_size is not None and max(height, width) > int(work_size):
        r = int(work_size) / max(height, width)
        size = (max(1, round(height * r)), max(1, round(width * r)))
        small_image = F.interpolate(image_to_255(image.detach(), torch.float32), size=size, mode="area") / 255.0
        small_prob = F.interpolate(prob.detach().float(), size=size, mode="area")
        q = meanfield_crf(small_image, small_prob, iters, sxy_gauss, compat_gauss, sxy_bilateral, srgb,
                          compat_bilateral, clip, window, dilation, max_kernel_mib, work_size=None)
        return F.interpolate(q, size=(height, width), mode="bilinear", align_corners=False).clamp_(0, 1).to(prob.dtype)
    # Configs may carry these as floats (e.g. a dict[str, float] of CRF params).
    if window != int(window) or dilation != int(dilation):
        raise ValueError(f"window and dilation must be integers, got {window}, {dilation}")
    window, dilation = int(window), int(dilation)
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 3, got {window}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    out_dtype = prob.dtype
    work_dtype = prob.dtype if prob.dtype in (torch.float32, torch.float64) else torch.float32
    p = prob.detach().to(work_dtype)
    colour = image_to_255(image.detach().to(p.device), work_dtype)
    p_fg = p.clamp_min(clip)
    p_bg = (1.0 - p).clamp_min(clip)
    logit0 = torch.log(p_fg) - torch.log(p_bg)

    offsets = _window_offsets(window, dilation)
    batch, _, height, width = p.shape
    bytes_per_image = len(offsets) * height * width * p.element_size()
    chunk = max(1, int(max_kernel_mib * 2**20 // bytes_per_image))
    outs = [
        _meanfield_chunk(
            colour[s : s + chunk], logit0[s : s + chunk], iters,
            sxy_gauss, compat_gauss, sxy_bilateral, srgb, compat_bilateral, offsets,
        )
        for s in range(0, batch, chunk)
    ]
    return torch.cat(outs, 0).to(out_dtype)
