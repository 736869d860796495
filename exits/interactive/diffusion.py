"""CDNet's two diffusion modules: feature diffusion (FDM) on the token grid and pixel
diffusion (PDM) on the output logits.

FDM (non-local attention with conditional re-weighting). On the click-involved tokens
X (B, L, D) of an h x w grid:

    A    = softmax_j(q_i . k_j / sqrt(D))            (B, L, L) affinity, q = W_q X, k = W_k X
    S^c  = source weight of token j: the click disks of class c (pos / neg), max-pooled
           onto the grid (B, L) -- CDNet uses a Gaussian of the clicks; the disks are already
           an input map, and max-pooling them onto 8-px cells is their support
    D^c  = sigmoid(W_d^c X) (B, L) learned destination weight (where class-c information
           may go; CDNet's "preliminary prediction" of the fg/bg range)
    Y^c_i = D^c_i * sum_j A_ij S^c_j v_j / (sum_j A_ij S^c_j + eps),   v = W_v X
    X <- X + W_o [Y^pos, Y^neg]

The normalisation by sum_j A_ij S^c_j (a deviation: CDNet multiplies only) makes Y^c a
weighted mean of the clicked tokens' values, so its scale does not depend on how many
cells the disks cover; without clicks of a class Y^c = 0. It also makes the global softmax
denominator cancel:

    A_ij S_j / sum_j' A_ij' S_j' = softmax over {j : S_j > 0} of (q_i . k_j / sqrt(D) + log S_j)

so only the M source tokens are keys: O(L M D) instead of O(L^2 D) (M = the cells the
click disks touch, a few dozen; L = 1024 on a 32 x 32 grid).

PDM (local colour-affinity propagation, "local solve + N iterations", N = 10). On logits
l (B, 1, Z, Z) with the crop image I (B, 3, Z, Z) and the click disks (B, 2, Z, Z):

    l_0  = l + a * (pos - neg)                         reinforce the sources (a > 0 learned)
    w_ij = softmax_{j in N(i)} (-||I_i - I_j||^2 / sigma^2)   3x3 neighbourhood, dilation d_t
    l_{t+1} = (1 - g) * l_t + g * sum_j w_ij l_{t,j}   g = sigmoid(learned), t = 0..N-1
    and at click pixels l_{t+1} keeps l_0 (the sources stay sources)

The dilation cycles through (1, 2, 4) so 10 iterations reach ~24 px (CDNet: a few
neighbouring pixels, iterated). The colour affinities are computed once per call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureDiffusion", "PixelDiffusion", "neighbour_affinity"]

_LOGIT_FLOOR = -60.0  # exp(-60) ~ 9e-27: its products stay normal float32 (see neighbour_affinity)


class FeatureDiffusion(nn.Module):
    """FDM over a token grid (see module doc)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.dest = nn.Linear(dim, 2)
        self.out = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.out.weight)  # starts as the identity, like a residual branch
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) tokens, sources (B, 2, L) in [0, 1] (pos, neg click support) -> (B, L, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        dest = torch.sigmoid(self.dest(x))  # (B, L, 2)
        ys = []
        for c in range(2):
            src = sources[:, c]  # (B, L)
            m = int((src > 0).sum(1).max())
            if m == 0:
                ys.append(torch.zeros_like(x))
                continue
            w, idx = src.topk(m, dim=1)  # the M source tokens (padding entries have w = 0)
            gather = lambda t: torch.gather(t, 1, idx[..., None].expand(-1, -1, d))  # noqa: E731
            logits = q @ gather(k).transpose(1, 2) / math.sqrt(d) + torch.log(w.clamp_min(1e-12))[:, None, :]
            logits = logits.masked_fill((w <= 0)[:, None, :], float("-inf"))
            has = (w > 0).any(1)
            attn = torch.softmax(torch.where(has[:, None, None], logits, torch.zeros_like(logits)), dim=-1)
            y = (attn @ gather(v)) * has[:, None, None].to(x.dtype)
            ys.append(y * dest[..., c:c + 1])
        return x + self.out(torch.cat(ys, dim=-1))


def _shift_views(t: torch.Tensor, d: int) -> list[torch.Tensor]:
    """The 9 neighbour views (each (B, C, H, W)) of ``t`` at dilation d, borders replicated;
    views into one padded copy, so nothing is stacked."""
    h, w = t.shape[-2:]
    p = F.pad(t, (d,) * 4, mode="replicate")
    return [p[..., i * d:i * d + h, j * d:j * d + w] for i in range(3) for j in range(3)]


def neighbour_affinity(image: torch.Tensor, dilation: int, sigma: torch.Tensor) -> torch.Tensor:
    """(B, 9, Z, Z) weights w_ij of the 3 x 3 neighbours (dilation d) of each pixel:
    softmax over the 9 of max(-||I_i - I_j||^2 / sigma^2, -60) (borders replicate).

    The floor at -60 (a weight of e^-60 ~ 9e-27 relative to the pixel itself, which always
    has logit 0) keeps the weights and their products with the logits normal float32s:
    across a strong edge the logit reaches -300 at sigma = 0.1, and the denormal weights
    that gave made every later multiply-add slow on x86 (PDM at 256 px on one thread: 38.5
    ms, 16.4 ms with the floor, the same as with flush-to-zero; the values change by < 1e-25).
    """
    inv = 1.0 / (sigma * sigma)
    logits = torch.cat([-((v - image) ** 2).sum(1, keepdim=True) * inv for v in _shift_views(image, dilation)], 1)
    return torch.softmax(logits.clamp_min(_LOGIT_FLOOR), dim=1)


def _neighbour_mix(weights: torch.Tensor, l: torch.Tensor, d: int) -> torch.Tensor:
    """sum_j w_ij l_j over the 9 neighbours: weights (B, 9, H, W), l (B, 1, H, W)."""
    views = _shift_views(l, d)
    out = weights[:, :1] * views[0]
    for k in range(1, 9):
        out = out.addcmul(weights[:, k:k + 1], views[k])  # one fused op instead of mul + add
    return out


class PixelDiffusion(nn.Module):
    """PDM on output logits (see module doc)."""

    DILATIONS = (1, 2, 4)

    def __init__(self, iterations: int = 10) -> None:
        super().__init__()
        self.iterations = int(iterations)
        self.source_gain = nn.Parameter(torch.tensor(2.0))
        self.gate = nn.Parameter(torch.tensor(0.0))  # g = 0.5 at the start
        self.log_sigma = nn.Parameter(torch.tensor(math.log(0.1)))  # colour scale in [0, 1] RGB units

    def affinities(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """Dilation -> (B, 9, Z, Z) colour affinities of ``image`` (B, 3, Z, Z): they depend on
        the image alone, so a caller may keep them per object (the decoder's coarse pass)."""
        sigma = self.log_sigma.exp()
        return {d: neighbour_affinity(image, d, sigma) for d in self.DILATIONS}

    def forward(self, logits: torch.Tensor, image: torch.Tensor, disks: torch.Tensor,
                weights: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """logits (B, 1, Z, Z), image (B, 3, Z, Z) in [0, 1], disks (B, 2, Z, Z) -> (B, 1, Z, Z);
        ``weights`` this image's :meth:`affinities`, when kept."""
        g = torch.sigmoid(self.gate)
        sources = disks[:, :1] - disks[:, 1:2]
        clicked = disks.sum(1, keepdim=True) > 0
        l0 = logits + F.softplus(self.source_gain) * sources
        weights = self.affinities(image) if weights is None else weights
        l = l0
        for t in range(self.iterations):
            d = self.DILATIONS[t % len(self.DILATIONS)]
            mixed = _neighbour_mix(weights[d], l, d)
            l = torch.where(clicked, l0, torch.lerp(l, mixed, g))  # (1 - g) l + g mixed; sources keep l0
        return l
