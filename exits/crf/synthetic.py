"""Synthetic two-colour scene with a corrupted mask: the CRF's test and benchmark case.

A disk of one colour on a background of another (plus pixel noise), and a foreground
probability that is shifted, too large, blurred and noisy: what a coarse network mask
looks like. A CRF that follows colour edges should move it back onto the disk.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DiskScene(NamedTuple):
    image: torch.Tensor  # (3, H, W) float in [0, 1]
    mask: torch.Tensor  # (H, W) bool, the true disk
    prob: torch.Tensor  # (1, H, W) float corrupted foreground probability


def _disk(size: int, cy: float, cx: float, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma))
    d = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(d**2) / (2 * sigma**2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x[None, None], (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    return x[0, 0]


def make_disk_scene(
    size: int = 64,
    seed: int = 0,
    image_noise: float = 0.04,
    shift: tuple[float, float] = (4.0, -3.0),
    grow: float = 3.0,
    blur_sigma: float = 3.0,
    prob_noise: float = 0.1,
) -> DiskScene:
    """Disk (radius 0.3 size) on background; prob = blur(disk shifted by ``shift`` (dy, dx)
    and ``grow`` px larger), squeezed into [0.15, 0.85], plus Gaussian noise, clipped to
    [0.02, 0.98]. Coordinates scale with ``size`` (shift, grow, blur are given at 64 px)."""
    gen = torch.Generator().manual_seed(seed)
    scale = size / 64.0
    c, radius = size / 2.0, 0.3 * size
    mask = _disk(size, c, c, radius)
    fg = torch.tensor([0.85, 0.35, 0.25]).view(3, 1, 1)
    bg = torch.tensor([0.25, 0.45, 0.70]).view(3, 1, 1)
    image = torch.where(mask[None], fg, bg) + image_noise * torch.randn((3, size, size), generator=gen)
    coarse = _disk(size, c + shift[0] * scale, c + shift[1] * scale, radius + grow * scale).float()
    prob = 0.15 + 0.7 * _blur(coarse, blur_sigma * scale)
    prob = prob + prob_noise * torch.randn((size, size), generator=gen)
    return DiskScene(image.clamp(0, 1), mask, prob.clamp(0.02, 0.98)[None])


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of two same-shape boolean masks (1.0 when both are empty)."""
    pred, target = pred.bool(), target.bool()
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union
