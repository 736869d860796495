"""PEM, the prototype extraction module of the similarity-constrained click network (Sec. 2.2):
a training-only loss that pulls foreground features together. It has no weights and
nothing of it runs at inference.

On decoder features F (B, C, H, W) and the target mask G (B, 1, H, W) (resampled to H x W):

    MAP(F, G)   = sum_hw(F * G) / sum_hw(G)                       (B, C) masked average pooling
    P_pos       = mean_b MAP(F, G)                                (C,)   this batch's fg prototype
    P_pos      <- EMA(P_pos, P_pre) = beta * P_pos + (1 - beta) * P_pre,  beta = 0.01
    P_pre       = P_pos (kept, detached, for the next batch)
    P_neg       = MAP(F, 1 - G)                                   (B, C) per image, no EMA
    y           = [<P_neg, F>, <P_pos, F>] / tau                  (B, 2, H, W)
    L_PEM       = CE(y, G)

Deviation: the inner products are cosine similarities over a temperature tau = 0.1 (as in
PANet-style prototype losses): with raw dot products the logits scale with the feature norm
and the loss can be lowered by inflating features instead of clustering them. The EMA keeps
the gradient of the current batch's term (only P_pre is detached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrototypeLoss", "masked_average"]


def masked_average(feat: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAP: feat (B, C, H, W), mask (B, 1, H, W) in [0, 1] -> (B, C)."""
    return (feat * mask).sum((2, 3)) / (mask.sum((2, 3)) + eps)


class PrototypeLoss(nn.Module):
    """L_PEM with the EMA foreground prototype as a (non-persistent) buffer."""

    def __init__(self, channels: int, beta: float = 0.01, tau: float = 0.1) -> None:
        super().__init__()
        self.beta, self.tau = float(beta), float(tau)
        self.register_buffer("prototype", torch.zeros(channels), persistent=False)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool), persistent=False)

    def forward(self, feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """feat (B, C, H, W), target (B, H', W') bool/float -> scalar loss (updates the EMA)."""
        g = F.interpolate(target[:, None].float(), size=feat.shape[-2:], mode="area")
        has_fg = g.flatten(1).sum(1) > 0
        if not bool(has_fg.any()):
            return feat.sum() * 0.0
        p_pos = masked_average(feat[has_fg], g[has_fg]).mean(0)
        if bool(self.initialised):
            p_pos = self.beta * p_pos + (1 - self.beta) * self.prototype
        self.prototype.copy_(p_pos.detach())
        self.initialised.fill_(True)
        p_neg = masked_average(feat, 1 - g)  # (B, C)
        fn = F.normalize(feat, dim=1)
        pos = torch.einsum("bchw,c->bhw", fn, F.normalize(p_pos, dim=0))
        neg = torch.einsum("bchw,bc->bhw", fn, F.normalize(p_neg, dim=1))
        logits = torch.stack([neg, pos], dim=1) / self.tau
        return F.cross_entropy(logits, (g[:, 0] >= 0.5).long())
