# The Sinkhorn of exits/propagation/sinkhorn.py before issue 12 (column-vector products, no
# over-relaxation), kept verbatim as the "before" column of bench/bench_retrieval.py.
"""Sinkhorn-Knopp normalisation of a similarity matrix and the EXITS transition matrix.

EXITS (stage 1b) turns the head-averaged self-attention S of the similarity extractor into a
symmetric, doubly stochastic transition matrix for the random walk:

    A = Sinkhorn(S),    T = (A + A^T) / 2.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Scaling vectors are folded into the log potentials once any entry leaves
# [1/_ABSORB_AT, _ABSORB_AT]; far inside float32 range, so u_i K_ij v_j never overflows.
_ABSORB_AT = 1e4


def _check_similarity(S: Tensor) -> None:
    if S.dim() != 3 or S.shape[-1] != S.shape[-2]:
        raise ValueError(f"S must be (n, n) or (B, n, n), got shape {tuple(S.shape)}")
    if not torch.is_floating_point(S):
        raise TypeError(f"S must be a floating-point tensor, got {S.dtype}")
    # amin/amax propagate NaN, so two reductions catch NaN, +-inf and negatives.
    lo, hi = S.detach().amin(), S.detach().amax()
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and float(lo) >= 0.0):
        raise ValueError("S must be finite and non-negative")


def sinkhorn(S: Tensor, iters: int = 50, eps: float = 1e-6, tol: float | None = None) -> Tensor:
    """Doubly stochastic matrix A = diag(u) K diag(v) closest to S (Sinkhorn-Knopp).

    Sinkhorn-Knopp alternates row and column normalisation of K = max(S, floor):

        u <- 1 / (K v),    v <- 1 / (K^T u),    A = diag(u) K diag(v),

    so that A 1 = 1 and A^T 1 = 1 at convergence. ``floor = max(eps * mean(S), tiny)`` per
    matrix makes K strictly positive, which guarantees that the scaling exists and is unique
    (an attention matrix with exact zeros may lack total support, and then Sinkhorn never
    converges); eps=0 keeps S as is up to float32's smallest normal number.

    Numerics (why not the textbook loop): attention holds values down to ~1e-30 and the
    scalings needed to balance such a matrix can exceed float32's range, so the scalings
    are kept in the log domain. The iteration is "log-stabilised" (Schmitzer 2019): K is
    stored as exp(log S + a_i + b_j) with log potentials a, b; the cheap linear-domain
    updates above run on it, and whenever u or v leaves [1e-4, 1e4] they are absorbed
    (a += log u, b += log v, u = v = 1, K recomputed). This is exactly the log-domain
    Sinkhorn, but an iteration costs two batched mat-vecs instead of two n^2 logsumexps.
    A is invariant to scaling S by a constant; S with entries near float max is rescaled.

    Args:
        S: (n, n) or (B, n, n) non-negative similarity (e.g. attention, rows summing to 1).
        iters: maximal number of (row, column) normalisation pairs.
        eps: relative floor on S (fraction of the mean entry), see above.
        tol: if given, a matrix stops once all its row sums are within tol of 1 (checked
            before each row update); the call returns when every matrix has stopped.
    Returns:
        A with the shape of S: columns sum to 1 (to float rounding), rows to within the
        convergence error. With self-attention well below 1 that is < 1e-4 after 50
        iterations; near one-hot rows converge slowly (~1e-2 after 50, 1e-4 after a few
        hundred). Computed in at least float32 and returned in S's dtype. Each matrix's
        result is independent of the rest of the batch. One host sync per iteration.
    """
    if S.dim() == 2:
        return sinkhorn(S.unsqueeze(0), iters=iters, eps=eps, tol=tol).squeeze(0)
    _check_similarity(S)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    out_dtype = S.dtype
    work = S if S.dtype in (torch.float32, torch.float64) else S.float()
    n = work.shape[-1]
    total = work.sum(dim=(-2, -1))
    if not bool(torch.isfinite(total).all()):
        # Entries near float max: A is invariant to scaling S, so bring it to max 1 first.
        work = work / work.amax(dim=(-2, -1), keepdim=True)
        total = work.sum(dim=(-2, -1))
    tiny = torch.finfo(work.dtype).tiny
    floor = (total * (eps / (n * n))).clamp_min(tiny)[:, None, None]
    K = torch.maximum(work, floor)
    # K == exp(log S' + a_i + b_j) throughout, S' = max(S, floor), a and b the row and
    # column log potentials. The first row normalisation is done in the linear domain;
    # log S' is only formed if scalings ever need absorbing (saves passes over B n^2).
    row_sum = K.sum(dim=-1)
    K = K / row_sum.unsqueeze(-1)
    log_a = -row_sum.log()
    log_s: Tensor | None = None
    log_b = torch.zeros_like(log_a)
    u = torch.ones_like(log_a)
    v = torch.ones_like(log_a)
    # Per-matrix bookkeeping (stopping, absorbing) so that a matrix's result does not
    # depend on what else is in the batch.
    active = torch.ones(log_a.shape[0], dtype=torch.bool, device=K.device)
    log_limit = math.log(_ABSORB_AT)
    for it in range(iters):
        Kv = torch.matmul(K, v.unsqueeze(-1)).squeeze(-1)  # row sums of K diag(v)
        if tol is not None and it > 0:
            active = active & ((u * Kv - 1.0).abs().amax(dim=-1) > tol)
        u = torch.where(active.unsqueeze(-1), 1.0 / Kv, u)
        Ktu = torch.matmul(u.unsqueeze(-2), K).squeeze(-2)  # K^T u
        v = torch.where(active.unsqueeze(-1), 1.0 / Ktu, v)
        spread = torch.maximum(u.log().abs().amax(dim=-1), v.log().abs().amax(dim=-1))
        absorb = active & (spread > log_limit)
        any_active, any_absorb = torch.stack([active.any(), absorb.any()]).tolist()
        if any_absorb:
            if log_s is None:
                log_s = torch.maximum(work, floor).log()
            # Out-of-place updates keep the function differentiable through absorption.
            idx = absorb.nonzero().squeeze(-1)
            sel = absorb.unsqueeze(-1)
            log_a = torch.where(sel, log_a + u.log(), log_a)
            log_b = torch.where(sel, log_b + v.log(), log_b)
            # Recomputed from log S rather than K * u * v: entries that underflowed on the
            # way keep their exact value and can come back if later scalings need them.
            K = K.index_put((idx,), torch.exp(log_s[idx] + log_a[idx].unsqueeze(-1) + log_b[idx].unsqueeze(-2)))
            u = torch.where(sel, torch.ones_like(u), u)
            v = torch.where(sel, torch.ones_like(v), v)
        if not any_active:
            break
    A = K * u.unsqueeze(-1) * v.unsqueeze(-2)
    return A.to(out_dtype)


def transition_matrix(A: Tensor) -> Tensor:
    """Symmetric transition matrix T = (A + A^T) / 2 of shape (..., n, n).

    If A is doubly stochastic, T is too (its rows are the mean of A's rows and columns),
    and T = T^T means a row-vector walk v T equals the column walk T v.
    """
    return 0.5 * (A + A.transpose(-1, -2))


def marginal_error(A: Tensor) -> Tensor:
    """Largest deviation of any row or column sum from 1, per matrix: (..., n, n) -> (...)."""
    rows = (A.sum(dim=-1) - 1.0).abs().amax(dim=-1)
    cols = (A.sum(dim=-2) - 1.0).abs().amax(dim=-1)
    return torch.maximum(rows, cols)
