"""Click-training losses on mask logits (B, 1, S, S) against targets (B, S, S) in {0, 1}.

Normalized focal loss (RITM, Sofiiuk et al. 2021), alpha = 0.5:

    p_t = p if y = 1 else 1 - p,        beta = (1 - p_t)^gamma
    NFL = mean_b  sum_px  - alpha * (beta / sum_px beta) * log p_t

(the focal weights of each image are normalised to sum to one, the normaliser detached),
so the loss keeps its scale late in training when most pixels are easy.

BCE + Dice:  mean BCE + (1 - 2 sum(p y) / (sum p + sum y)) per image, averaged.

``reduction="none"`` returns the (B,) per-image losses (CDNet's diversified training picks
the best head per image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["normalized_focal_loss", "bce_dice_loss", "click_loss"]


def normalized_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5,
                          eps: float = 1e-8, reduction: str = "mean") -> torch.Tensor:
    logits = logits.flatten(1).float()
    y = targets.flatten(1).float()
    p = torch.sigmoid(logits)
    pt = torch.where(y > 0.5, p, 1 - p)
    beta = (1 - pt).pow(gamma)
    beta = beta / (beta.sum(dim=1, keepdim=True).detach() + eps)
    log_pt = torch.where(y > 0.5, F.logsigmoid(logits), F.logsigmoid(-logits))
    per_image = (-alpha * beta * log_pt).sum(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    logits = logits.flatten(1).float()
    y = targets.flatten(1).float()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
    dice = 1 - (2 * (p * y).sum(1) + eps) / (p.sum(1) + y.sum(1) + eps)
    per_image = bce + dice
    return per_image if reduction == "none" else per_image.mean()


def click_loss(name: str, logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               reduction: str = "mean") -> torch.Tensor:
    """The configured loss ("nfl" | "bce_dice"); logits (B, 1, H, W), targets (B, H, W)."""
    if name == "nfl":
        return normalized_focal_loss(logits, targets, gamma=gamma, reduction=reduction)
    if name == "bce_dice":
        return bce_dice_loss(logits, targets, reduction=reduction)
    raise ValueError(f"unknown loss {name!r}")
