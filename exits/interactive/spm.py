"""Similarity-constrained propagation (SPM, similarity-constrained click network Sec. 2.1).

Click vectors F_u (B, M, D) are the click-involved features bilinearly sampled at the M
clicks. Each pixel feature f_n (of F, (B, L, D)) is compared with every click vector by
cosine similarity

    A[n, m] = <f_n, F_u[m]> / (|f_n| |F_u[m]|)                       (B, L, M)

and, instead of attending to all clicks (FPM), takes only the most and the least similar
one: one_hot(argmax_m A[n]) F_u and one_hot(argmin_m A[n]) F_u. Each is concatenated
with F and reduced by a 1x1 convolution (F_pos, F_neg); then

    F_hat = FFN(F + F_pos + F_neg),  output F + F_hat      (FFN = 1x1 conv, ReLU, 1x1 conv)

Padding clicks (``valid`` False) are never selected. Without any valid click the module is
the identity on F.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sample_click_vectors", "cosine_similarity_map", "max_min_click_vectors", "SimilarityPropagation"]


def sample_click_vectors(feat: torch.Tensor, clicks_uv: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear samples of ``feat`` (B, D, H, W) at clicks (B, M, 2) given in pixel coords
    of an ``image_size`` (h, w) image that ``feat`` covers -> (B, M, D).

    With ``align_corners=False`` pixel coordinate u maps to normalised 2 (u + 0.5) / w - 1,
    the same continuous frame at every resolution.
    """
    h, w = image_size
    grid = torch.stack([2 * (clicks_uv[..., 0] + 0.5) / w - 1, 2 * (clicks_uv[..., 1] + 0.5) / h - 1], dim=-1)
    out = F.grid_sample(feat, grid[:, :, None, :].to(feat.dtype), mode="bilinear", align_corners=False,
                        padding_mode="border")
    return out[..., 0].transpose(1, 2)


def cosine_similarity_map(tokens: torch.Tensor, click_vectors: torch.Tensor) -> torch.Tensor:
    """A = cos(tokens (B, L, D), click_vectors (B, M, D)) -> (B, L, M)."""
    return F.normalize(tokens, dim=-1, eps=1e-6) @ F.normalize(click_vectors, dim=-1, eps=1e-6).transpose(1, 2)


def max_min_click_vectors(similarity: torch.Tensor, click_vectors: torch.Tensor, valid: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the click vector of highest and of lowest similarity among valid clicks.

    similarity (B, L, M), click_vectors (B, M, D), valid (B, M) -> two (B, L, D).
    """
    big = torch.finfo(similarity.dtype).max
    hi = similarity.masked_fill(~valid[:, None, :], -big).argmax(dim=-1)
    lo = similarity.masked_fill(~valid[:, None, :], big).argmin(dim=-1)
    gather = lambda idx: torch.gather(click_vectors, 1, idx[..., None].expand(-1, -1, click_vectors.shape[-1]))  # noqa: E731
    return gather(hi), gather(lo)


class SimilarityPropagation(nn.Module):
    """SPM on tokens (B, L, D) with click vectors (B, M, D) -> (B, L, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduce_pos = nn.Linear(2 * dim, dim)
        self.reduce_neg = nn.Linear(2 * dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor, click_vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        has_click = valid.any(dim=1)
        if not bool(has_click.any()):
            return tokens
        sim = cosine_similarity_map(tokens, click_vectors)
        f_max, f_min = max_min_click_vectors(sim, click_vectors, valid)
        f_pos = self.reduce_pos(torch.cat([tokens, f_max], dim=-1))
        f_neg = self.reduce_neg(torch.cat([tokens, f_min], dim=-1))
        update = self.ffn(tokens + f_pos + f_neg)
        return tokens + update * has_click[:, None, None].to(tokens.dtype)
