"""Random-walk propagation scores of EXITS point retrieval.

For a symmetric, doubly stochastic transition matrix T (n x n, n = N^2 patches) and a
seed set P, the propagation score of patch i is the probability of reaching i in alpha
steps from a seed drawn uniformly from P:

    pi(i) = 1/|P| * sum_{j in P} T^alpha(j, i) = (s^T T^alpha)_i,    s = 1_P / |P|.

T^alpha is never formed: s^T T^alpha is alpha vector-matrix products, O(alpha n^2) instead
of O(log(alpha) n^3) for matrix_power, and the FG and BG walks share one batched matmul.
"""
from __future__ import annotations

import torch
from torch import Tensor

from exits.propagation.sinkhorn import SinkhornScaling, batched_matvec


def seed_distribution(seeds: Tensor, dtype: torch.dtype) -> Tensor:
    """Normalise seed sets to start distributions s = w / sum(w), shape (..., n).

    ``seeds`` is a bool mask or non-negative weights over the n patches; an empty set (all
    zero) gives the zero vector, so its walk scores are zeros rather than NaN.
    """
    w = seeds.to(dtype)
    total = w.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(w))


def random_walk_scores(T: Tensor, seeds: Tensor, alpha: int) -> Tensor:
    """Propagation scores pi = s^T T^alpha of one or several seed sets per matrix.

    pi(i) = 1/|P| sum_{j in P} T^alpha(j, i), computed as alpha products v <- v T starting
    from v = s (the normalised seed vector). T must be symmetric for this to equal the
    paper's T^alpha(j, i) read along rows *and* columns (true for T = (A + A^T)/2); for a
    non-symmetric T it is the row-vector walk s^T T^alpha.

    Args:
        T: (n, n) or (B, n, n) transition matrix.
        seeds: bool mask or non-negative weights, (B, n) for one seed set per matrix or
            (B, K, n) for K sets walked together (e.g. K=2: FG and BG in one matmul);
            without batch dim for an unbatched T: (n,) or (K, n).
        alpha: number of walk steps, >= 0 (alpha = 0 returns the seed distribution).
    Returns:
        Scores with the shape of ``seeds``, dtype of T; each non-empty set's scores sum to
        1 when T is doubly stochastic; an empty seed set gives zeros.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if T.shape[-1] != T.shape[-2] or T.dim() not in (2, 3):
        raise ValueError(f"T must be (n, n) or (B, n, n), got shape {tuple(T.shape)}")
    single_set = seeds.dim() == T.dim() - 1
    if not single_set and seeds.dim() != T.dim():
        raise ValueError(f"seeds shape {tuple(seeds.shape)} does not fit T shape {tuple(T.shape)}")
    if seeds.shape[-1] != T.shape[-1]:
        raise ValueError(f"seeds have {seeds.shape[-1]} patches, T has {T.shape[-1]}")
    v = seed_distribution(seeds.to(T.device), T.dtype)
    if single_set:
        v = v.unsqueeze(-2)  # (..., 1, n)
    for _ in range(alpha):
        v = torch.matmul(v, T)  # (..., K, n) @ (..., n, n): one batched matmul for all sets
    return v.squeeze(-2) if single_set else v


def factored_walk_scores(scaling: SinkhornScaling, seeds: Tensor, alpha: int) -> Tensor:
    """:func:`random_walk_scores` on T = (A + A^T) / 2, A = diag(u) K diag(v), without forming T.

    One step of the row-vector walk, for each seed set x (1, n):

        x T = ( ((x * u) K) * v  +  (K (x * v))^T * u ) / 2

    i.e. one row-vector product with K and one matrix-vector product per set and step, in
    place of the ~5 passes over (B, n, n) that forming T costs (2 scalings of K, a
    transposed read of A, the sum) plus one product per step. For alpha <= ~5 (the
    defaults: 5, demo 2) that is fewer reads of B n^2 floats, and no (B, n, n) allocation.

    Args:
        scaling: K (B, n, n), u, v (B, n) from ``exits.propagation.sinkhorn.sinkhorn_scaling``.
        seeds: (B, n) or (B, k, n) bool masks / non-negative weights.
        alpha: walk steps, >= 0.
    Returns:
        Scores with the shape of ``seeds``, K's dtype (equal to
        ``random_walk_scores(transition_matrix(scaling.matrix()), seeds, alpha)`` to rounding).
    """
    K, u, v = scaling.K, scaling.u, scaling.v
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    single_set = seeds.dim() == 2
    if seeds.dim() not in (2, 3) or seeds.shape[0] != K.shape[0] or seeds.shape[-1] != K.shape[-1]:
        raise ValueError(f"seeds shape {tuple(seeds.shape)} does not fit K shape {tuple(K.shape)}")
    x = seed_distribution(seeds.to(K.device), K.dtype)
    if single_set:
        x = x.unsqueeze(-2)  # (B, 1, n)
    u_row, v_row = u.unsqueeze(-2), v.unsqueeze(-2)
    for _ in range(alpha):
        # Per set: the (B, 1, n) @ (B, n, n) row-vector product is the fast CPU path; two
        # rows in one bmm ran ~20% slower than two one-row products (profiled at N = 32, B = 16).
        rows = torch.cat([torch.matmul(x[:, j:j + 1] * u_row, K) for j in range(x.shape[1])], dim=1)
        # K (x * v) for all sets in one (B, n, n) @ (B, n, k) product: for k = 2 it reads K
        # once and costs ~1.35 gemvs (vs 2); for k = 1 the gemv is faster (~0.45x).
        if x.shape[1] == 1:
            cols = batched_matvec(K, x[:, 0] * v).unsqueeze(1)
        else:
            cols = torch.matmul(K, (x * v_row).transpose(-1, -2).contiguous()).transpose(-1, -2)
        x = 0.5 * (rows * v_row + cols * u_row)
    return x.squeeze(-2) if single_set else x


def random_walk_scores_reference(T: Tensor, seeds: Tensor, alpha: int) -> Tensor:
    """Brute-force reference: pi(i) = mean_{j in P} T^alpha(j, i) with T^alpha formed.

    Uses torch.linalg.matrix_power and indexes rows of T^alpha directly (no symmetry
    assumption). Same shapes as :func:`random_walk_scores`. For tests and benchmarks only:
    O(log(alpha) n^3) per matrix.
    """
    T_alpha = torch.linalg.matrix_power(T, alpha)
    w = seeds.to(device=T.device, dtype=T.dtype)
    single_set = w.dim() == T.dim() - 1
    if single_set:
        w = w.unsqueeze(-2)
    count = w.sum(dim=-1, keepdim=True)
    summed = torch.matmul(w, T_alpha)  # sum_j w_j T^alpha(j, i)
    pi = torch.where(count > 0, summed / count.clamp_min(torch.finfo(T.dtype).tiny), torch.zeros_like(summed))
    return pi.squeeze(-2) if single_set else pi
