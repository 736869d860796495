"""Interactive multi-head self attention (I-MSA, InterFormer Sec. 3.2) with P2T pooling.

InterFormer re-poses self attention for clicks: the click-involved features X (the cached
image features fused with the click maps) are the queries, the preprocessed image
features F the keys and values:

    I-MSA(X, F) = softmax( (X W_q)(P(F) W_k)^T / sqrt(d) ) (P(F) W_v)      per head

P (P2T pooling) shortens the key sequence: F is average-pooled to s x s for each s in
``pool_sizes``, each pyramid level gets a depth-wise 3x3 convolution (residual), and the
levels are flattened and concatenated: L' = sum s^2 keys instead of H W, so a block costs
O(H W L' d) rather than O((H W)^2 d). Each block is pre-norm: X <- X + I-MSA(LN X, LN P(F));
X <- X + FFN(LN X).

Shapes: X (B, L, D) with L = H W, F (B, D, H, W) -> (B, L, D).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PyramidPool", "InteractiveAttentionBlock"]


class PyramidPool(nn.Module):
    """(B, D, H, W) -> (B, sum s^2, D): adaptive average pools + depth-wise conv per level."""

    def __init__(self, dim: int, pool_sizes: Sequence[int]) -> None:
        super().__init__()
        self.pool_sizes = tuple(int(s) for s in pool_sizes)
        self.dw = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in self.pool_sizes)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        levels = []
        for size, conv in zip(self.pool_sizes, self.dw):
            pooled = F.adaptive_avg_pool2d(feat, size)
            levels.append((pooled + conv(pooled)).flatten(2))
        return torch.cat(levels, dim=2).transpose(1, 2)


class InteractiveAttentionBlock(nn.Module):
    """One pre-norm I-MSA block + FFN (hidden 2D)."""

    def __init__(self, dim: int, heads: int, pool_sizes: Sequence[int]) -> None:
        super().__init__()
        self.heads = heads
        self.pool = PyramidPool(dim, pool_sizes)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attention(self, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """The attention term alone: (B, L, D) queries over pooled ``feat`` -> (B, L, D)."""
        b, n, d = x.shape
        kv = self.kv(self.norm_kv(self.pool(feat)))
        k, v = kv.chunk(2, dim=-1)
        q = self.q(self.norm_q(x))
        split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.out(o.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x, feat)
        return x + self.ffn(self.norm_ffn(x))
