"""Inputs, defaults and unaries shared by the two CRF implementations.

Both implementations refine a binary (background / foreground) labelling of one object
crop with the fully connected CRF energy of Krähenbühl & Koltun (2011):

    E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) sum_m w_m k_m(f_i, f_j),
    U_i(fg) = -log max(p_i, clip),  U_i(bg) = -log max(1 - p_i, clip),
    k_gauss(i, j)     = exp(-|p_i - p_j|^2 / (2 sxy_gauss^2)),
    k_bilateral(i, j) = exp(-|p_i - p_j|^2 / (2 sxy_bilateral^2) - |I_i - I_j|^2 / (2 srgb^2)),
    mu = Potts: mu(l, l') = [l != l'],  w_gauss = compat_gauss, w_bilateral = compat_bilateral,

with p_i pixel positions in pixels and I_i colours in 0..255 units (pydensecrf's
convention, so ``srgb`` means the same for uint8 and float images).
"""
from __future__ import annotations

import torch

# Tuned on crops of about 64..128 px (the generator's mask resolution) so that both
# implementations clearly improve a blurred, shifted, noisy mask of a two-colour object
# (see bench/bench_crf.py and tests/test_crf.py). Positions are in pixels of the crop.
# compat/srgb follow pydensecrf's classic example (srgb 13, bilateral weight 10, Gaussian
# 3/3); sxy_bilateral 20 px instead of 80 because crops are small. 10 iterations, not 5:
# the meanfield CRF's window (reach 10 px by default) moves a wrong boundary only a few
# pixels per step. For much larger crops scale sxy_bilateral and the meanfield dilation.
DEFAULT_CRF_PARAMS: dict[str, float | int] = {
    "iters": 10,
    "sxy_gauss": 3.0,
    "compat_gauss": 3.0,
    "sxy_bilateral": 20.0,
    "srgb": 13.0,
    "compat_bilateral": 10.0,
    "clip": 1e-5,
}


def check_crf_inputs(image: torch.Tensor, prob: torch.Tensor) -> None:
    """Validate (B, 3, H, W) image and (B, 1, H, W) probability shapes."""
    if prob.dim() != 4 or prob.shape[1] != 1:
        raise ValueError(f"prob must be (B, 1, H, W), got {tuple(prob.shape)}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if image.shape[0] != prob.shape[0] or image.shape[-2:] != prob.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and prob {tuple(prob.shape)} disagree on batch or size")
    if not prob.is_floating_point():
        raise ValueError(f"prob must be floating point, got {prob.dtype}")


def image_to_255(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Colours in 0..255 units: uint8 images as they are, float images (in [0, 1]) x 255."""
    if image.dtype == torch.uint8:
        return image.to(dtype)
    if not image.is_floating_point():
        raise ValueError(f"image must be uint8 or floating point in [0, 1], got {image.dtype}")
    return image.to(dtype) * 255.0


def image_to_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 image in 0..255 (float input in [0, 1] is scaled, rounded and clipped)."""
    if image.dtype == torch.uint8:
        return image
    return (image.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
