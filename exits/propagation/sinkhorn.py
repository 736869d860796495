"""Sinkhorn-Knopp normalisation of a similarity matrix and the EXITS transition matrix.

EXITS (stage 1b) turns the head-averaged self-attention S of the similarity extractor into a
symmetric, doubly stochastic transition matrix for the random walk:

    A = Sinkhorn(S),    T = (A + A^T) / 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Scaling vectors are folded into the log potentials once any entry leaves
# [1/_ABSORB_AT, _ABSORB_AT]; far inside float32 range, so u_i K_ij v_j never overflows.
_ABSORB_AT = 1e4
# From this size on, K v runs as one gemv per matrix on CPU (see batched_matvec).
_MATVEC_LOOP_MIN_N = 256


def _check_similarity(S: Tensor) -> None:
    if S.dim() != 3 or S.shape[-1] != S.shape[-2]:
        raise ValueError(f"S must be (n, n) or (B, n, n), got shape {tuple(S.shape)}")
    if not torch.is_floating_point(S):
        raise TypeError(f"S must be a floating-point tensor, got {S.dtype}")
    # amin/amax propagate NaN, so the two reductions (one pass) catch NaN, +-inf and negatives.
    lo, hi = torch.aminmax(S.detach())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and float(lo) >= 0.0):
        raise ValueError("S must be finite and non-negative")


def sinkhorn(S: Tensor, iters: int = 50, eps: float = 1e-6, tol: float | None = None,
             omega: float = 1.0) -> Tensor:
    """Doubly stochastic matrix A = diag(u) K diag(v) closest to S (Sinkhorn-Knopp).

    Sinkhorn-Knopp alternates row and column normalisation of K = max(S, floor):

        u <- 1 / (K v),    v <- 1 / (K^T u),    A = diag(u) K diag(v),

    so that A 1 = 1 and A^T 1 = 1 at convergence. ``floor = max(eps * mean(S), tiny)`` per
    matrix makes K strictly positive, which guarantees that the scaling exists and is unique
    (an attention matrix with exact zeros may lack total support, and then Sinkhorn never
    converges); eps=0 keeps S as is up to float32's smallest normal number.

    Over-relaxation (``omega`` > 1, Thibault et al. 2017, "Overrelaxed Sinkhorn-Knopp"):

        u <- u^(1 - omega) (1 / (K v))^omega,    v <- v^(1 - omega) (1 / (K^T u))^omega,

    the same fixed point, reached in fewer iterations for omega in (1, 2) (on head-averaged
    attention at n = 1024, omega = 1.5 reaches in 20 iterations the marginal error plain
    Sinkhorn has after 50). Safeguard: a matrix whose row-marginal error grows above twice
    the smallest it has had falls back to omega = 1 for the rest of the call (plain
    Sinkhorn, which always converges on a positive K).

    Numerics (why not the textbook loop): attention holds values down to ~1e-30 and the
    scalings needed to balance such a matrix can exceed float32's range, so the scalings
    are kept in the log domain. The iteration is "log-stabilised" (Schmitzer 2019): K is
    stored as exp(log S + a_i + b_j) with log potentials a, b; the cheap linear-domain
    updates above run on it, and whenever u or v leaves [1e-4, 1e4] they are absorbed
    (a += log u, b += log v, u = v = 1, K recomputed). This is exactly the log-domain
    Sinkhorn, but an iteration costs two batched vector-matrix products instead of two n^2
    logsumexps. On CPU K^T u is the row-vector product u^T K, (B, 1, n) @ (B, n, n), and K v
    one gemv per matrix (:func:`batched_matvec`): the batched column-vector product
    (B, n, n) @ (B, n, 1) runs ~2x slower there, and a contiguous copy of K^T (the earlier
    way to put K v on the row-vector path) cost ~15 products' time (a strided transpose of
    B n^2 floats). The loop is memory-bound: one iteration reads K twice (2 x 4 n^2 bytes in
    float32), and K is the only (B, n, n) tensor it allocates. With
    ``tol``, a matrix that has stopped costs no more products on the per-matrix CPU path
    (:func:`batched_matvec`, :func:`batched_vecmat` with ``only``), and the loop ends before
    the column update once every matrix has stopped.
    A is invariant to scaling S by a constant; S with entries near float max is rescaled.

    Args:
        S: (n, n) or (B, n, n) non-negative similarity (e.g. attention, rows summing to 1).
        iters: maximal number of (row, column) normalisation pairs.
        eps: relative floor on S (fraction of the mean entry), see above.
        tol: if given, a matrix stops once all its row sums are within tol of 1 (checked
            before each row update; its column sums are exactly 1 after every plain column
            update; with over-relaxation the column error, known exactly from the same
            products, must be within tol too); the call returns when every matrix has stopped.
        omega: over-relaxation factor in [1, 2); 1 = plain Sinkhorn-Knopp.
    Returns:
        A with the shape of S: columns sum to 1 (to float rounding), rows to within the
        convergence error. With self-attention well below 1 that is < 1e-4 after 50
        iterations; near one-hot rows converge slowly (~1e-2 after 50, 1e-4 after a few
        hundred). Computed in at least float32 and returned in S's dtype. Each matrix's
        result is independent of the rest of the batch. One host sync per iteration.
    """
    if S.dim() == 2:
        return sinkhorn(S.unsqueeze(0), iters=iters, eps=eps, tol=tol, omega=omega).squeeze(0)
    sc = sinkhorn_scaling(S, iters=iters, eps=eps, tol=tol, omega=omega)
    return sc.matrix().to(S.dtype)


def sinkhorn_transition(S: Tensor, iters: int = 50, eps: float = 1e-6, tol: float | None = None,
                        omega: float = 1.0) -> Tensor:
    """T = (A + A^T) / 2 with A = Sinkhorn(S) (:func:`sinkhorn`, same arguments), formed.

    Point retrieval never forms T (``exits.propagation.random_walk.factored_walk_scores``
    walks on K, u, v); this is the reference and the API for callers that need T itself.
    Shapes: S (n, n) or (B, n, n) -> T of the same shape and dtype.
    """
    if S.dim() == 2:
        return sinkhorn_transition(S.unsqueeze(0), iters=iters, eps=eps, tol=tol, omega=omega).squeeze(0)
    return transition_matrix(sinkhorn_scaling(S, iters=iters, eps=eps, tol=tol, omega=omega).matrix()).to(S.dtype)


@dataclass(frozen=True)
class SinkhornScaling:
    """The doubly stochastic A = diag(u) K diag(v) as its factors (A itself never formed).

    K: (B, n, n) positive (S floored and rescaled by the log potentials, see :func:`sinkhorn`);
    u, v: (B, n) row and column scalings; all float32 or float64.
    """

    K: Tensor
    u: Tensor
    v: Tensor

    def matrix(self) -> Tensor:
        """A = diag(u) K diag(v), (B, n, n)."""
        return self.K * self.u.unsqueeze(-1) * self.v.unsqueeze(-2)


def batched_matvec(K: Tensor, x: Tensor, only: list[int] | None = None) -> Tensor:
    """K x per matrix: K (B, n, n), x (B, n) -> (B, n).

    On CPU, for n >= 256, one ``torch.mv`` (BLAS gemv) per matrix: ~1.4-2x faster there
    than the batched (B, n, n) @ (B, n, 1) product, which goes through a generic bmm path;
    below that (the demo grid, n = 144) the per-call overhead of B gemvs costs more than it
    saves (0.89 vs 0.72 ms per object at B = 16, bench/bench_retrieval.py's synthetic S).
    Elsewhere the batched product (one kernel launch instead of B).

    ``only``: on the per-matrix path, compute only these matrices (the rest of the result is
    1): Sinkhorn skips the matrices that have stopped.
    """
    if K.device.type == "cpu" and K.shape[-1] >= _MATVEC_LOOP_MIN_N:
        if only is None:
            return torch.stack([torch.mv(K[b], x[b]) for b in range(K.shape[0])]) if K.shape[0] else x.clone()
        out = torch.ones_like(x)
        for b in only:
            out[b] = torch.mv(K[b], x[b])
        return out
    return torch.matmul(K, x.unsqueeze(-1)).squeeze(-1)


def batched_vecmat(x: Tensor, K: Tensor, only: list[int] | None = None) -> Tensor:
    """x^T K per matrix (K^T x without transposing K): x (B, n), K (B, n, n) -> (B, n).

    One batched row-vector product; with ``only`` (CPU, n >= 256) one product per listed
    matrix and 1 for the rest, as :func:`batched_matvec`.
    """
    if only is not None and K.device.type == "cpu" and K.shape[-1] >= _MATVEC_LOOP_MIN_N:
        out = torch.ones_like(x)
        for b in only:
            out[b] = torch.matmul(x[b:b + 1], K[b])[0]
        return out
    return torch.matmul(x.unsqueeze(-2), K).squeeze(-2)


def sinkhorn_scaling(S: Tensor, iters: int = 50, eps: float = 1e-6, tol: float | None = None,
                     omega: float = 1.0) -> SinkhornScaling:
    """The iteration of :func:`sinkhorn` (same arguments), S (B, n, n): its factors K, u, v."""
    if S.dim() != 3:
        raise ValueError(f"S must be (B, n, n), got shape {tuple(S.shape)}")
    K, u, v = _sinkhorn_scalings(S, iters, eps, tol, omega)
    return SinkhornScaling(K, u, v)


def _sinkhorn_scalings(S: Tensor, iters: int, eps: float, tol: float | None,
                       omega: float) -> tuple[Tensor, Tensor, Tensor]:
    """(K, u, v) with A = diag(u) K diag(v); see :func:`sinkhorn`."""
    _check_similarity(S)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not 1.0 <= omega < 2.0:
        raise ValueError(f"omega must be in [1, 2), got {omega}")
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
    # column log potentials (0 until scalings are absorbed). log S' is only formed if
    # scalings ever need absorbing (saves passes over B n^2). The first row update is
    # plain (u = 1 / row sums, omega not applied): the row normalisation of S, kept in u
    # instead of a pass that rewrites K.
    log_a = torch.zeros(work.shape[:2], dtype=work.dtype, device=work.device)
    log_s: Tensor | None = None
    log_b = torch.zeros_like(log_a)
    u = torch.ones_like(log_a)
    v = torch.ones_like(log_a)
    # Per-matrix bookkeeping (stopping, absorbing, relaxation) so that a matrix's result
    # does not depend on what else is in the batch.
    active = torch.ones(log_a.shape[0], dtype=torch.bool, device=K.device)
    relaxed = omega != 1.0
    w = torch.full_like(log_a[:, :1], omega)  # (B, 1) per-matrix relaxation factor
    best_err = torch.full_like(log_a[:, 0], float("inf"))
    col_err = torch.zeros_like(best_err)
    log_limit = math.log(_ABSORB_AT)
    # Matrices still iterating, as a list for the per-matrix products (None = all): a stopped
    # matrix costs no more products (on CPU, n >= 256; elsewhere batched products run on all).
    only: list[int] | None = None
    for it in range(iters):
        Kv = batched_matvec(K, v, only)  # row sums of K diag(v)
        if (tol is not None or relaxed) and it > 0:
            # current row error (exact: u K v); relaxed, the columns are not exact either
            err = (u * Kv - 1.0).abs().amax(dim=-1)
            if relaxed:
                err = torch.maximum(err, col_err)
            if tol is not None:
                active = active & (err > tol)
                n_active = int(active.sum())
                if n_active == 0:
                    break  # every matrix met tol: no more products
                if n_active < active.shape[0]:
                    only = active.nonzero().squeeze(-1).tolist()
            if relaxed:
                w = torch.where((err > 2.0 * best_err).unsqueeze(-1), torch.ones_like(w), w)
                best_err = torch.minimum(best_err, err)
        if relaxed and it > 0:
            u_new = u * (u * Kv).reciprocal().pow(w)
        else:
            u_new = 1.0 / Kv
        u = torch.where(active.unsqueeze(-1), u_new, u)
        Ktu = batched_vecmat(u, K, only)  # K^T u, row-vector product
        v_new = v * (v * Ktu).reciprocal().pow(w) if relaxed else 1.0 / Ktu
        v = torch.where(active.unsqueeze(-1), v_new, v)
        if relaxed:  # column sums of the current A are v * K^T u (u unchanged since Ktu)
            col_err = (v * Ktu - 1.0).abs().amax(dim=-1)
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
    return K, u, v


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
