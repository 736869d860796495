"""Low-level appearance affinity between patches, an optional second term of S.

EXITS builds S from the attention of an ImageNet-pretrained ViT fine-tuned with MIL; such
attention links patches of similar appearance. A ViT trained from random init on a few
hundred objects (the CPU demo) does not get there: its MIL-trained attention ranks the box
patches only weakly (AUC ~0.75 against GT on the demo data, and no patch passes the
thresholds). When no pretrained weights are at hand, S can be mixed with a Gaussian
kernel on patch colour statistics, which restores the appearance signal:

    S = (1 - beta) * S_attn + beta * S_app,
    S_app(i, j) = exp(-||f_i - f_j||^2 / (2 sigma^2)) / sum_j' exp(-||f_i - f_j'||^2 / (2 sigma^2)),
    f_i = [mean RGB, std RGB] of patch i (pixels in [0, 1]).

Both terms are row-stochastic, so S is too; Sinkhorn and the random walk are unchanged.
beta = 0 (the paper's S) is the default; configs/demo.yaml sets beta = 0.5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_colour_features(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, grid*grid, 6): per-patch mean and std of RGB."""
    mu = F.adaptive_avg_pool2d(images, grid)
    sq = F.adaptive_avg_pool2d(images * images, grid)
    std = (sq - mu * mu).clamp_min(0).sqrt()
    return torch.cat([mu, std], dim=1).flatten(2).transpose(1, 2)


def appearance_similarity(images: torch.Tensor, grid: int, sigma: float) -> torch.Tensor:
    """Row-stochastic S_app (B, n, n), n = grid*grid (formula in the module docstring)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    f = patch_colour_features(images.float(), grid)
    d2 = torch.cdist(f, f).pow(2)
    return torch.softmax(-d2 / (2.0 * sigma * sigma), dim=-1)


def mix_similarity(s_attn: torch.Tensor, images: torch.Tensor, grid: int, beta: float, sigma: float) -> torch.Tensor:
    """S = (1 - beta) S_attn + beta S_app; returns ``s_attn`` unchanged when beta == 0."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return s_attn
    return (1.0 - beta) * s_attn + beta * appearance_similarity(images, grid, sigma)
