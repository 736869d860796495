"""EXITS point retrieval: pseudo FG/BG patches inside the extreme-point box.

    A = Sinkhorn(S),  T = (A + A^T) / 2,
    pi_f = s_FG^T T^alpha,  pi_b = s_BG^T T^alpha     (s = uniform over the seed set)
    pseudo FG = {i in P_Box : score_i >= tau_FG},  pseudo BG = {i in P_Box : score_i <= tau_BG}

Score scale. The paper thresholds the raw difference pi_f - pi_b. Each pi sums to 1 over
the n = N^2 patches, so on an object of m patches pi_f is about 1/m: the raw difference (and
any tau in its units) scales with 1/n and with the object's size. The default score is
the normalised difference

    score = (pi_f - pi_b) / (pi_f + pi_b)  in [-1, 1]   (0 where both are 0),

i.e. "how much more likely is it to be reached from FG than from BG": +1 = only from FG,
-1 = only from BG, tau_FG = 0.5 means pi_f >= 3 pi_b. It is invariant to the grid size and
to the object's area, so one pair of taus serves every crop. ``normalize=False`` gives the
paper's raw rule pi_f - pi_b >= tau; with ``raw_scale="uniform"`` (the config default) the
difference is multiplied by n,

    score_raw = n (pi_f - pi_b),

so tau is in multiples of the uniform walk probability 1/n and one tau serves every grid
(tau = 1: the FG walk reaches the patch with one uniform share more than the BG walk);
the paper's tau in probability units is tau / n. ``raw_scale="probability"`` keeps the
unscaled difference (taus ~1/n: a tau like 0.2 retrieves nothing).

Minimum mass. ``min_mass`` > 0 labels only patches the two walks actually reach:

    mass_i = n (pi_f(i) + pi_b(i)) / 2 >= min_mass       (1 = the uniform share)

which removes the ratio's instability on patches both walks barely reach.
Caveat: the ratio ignores how much mass reaches a patch. If T is close to the identity
(attention almost all on itself), a patch that neither walk reaches (pi_f + pi_b << 1/n)
gets a ratio decided by tiny leaks, which is unstable; the raw difference stays near 0
there. With attention-like S (self-attention well below 1) this does not arise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from exits.propagation.random_walk import factored_walk_scores
from exits.propagation.seeds import SeedMasks
from exits.propagation.sinkhorn import sinkhorn_scaling

# Defaults (see docs in retrieve_points).
DEFAULT_ALPHA = 5
DEFAULT_TAU_FG = 0.5
DEFAULT_TAU_BG = -0.5
DEFAULT_SINKHORN_ITERS = 50
# Early stop once every row sum is within 1e-3 of 1 (columns are exact after each update),
# with over-relaxation 1.5: on attention-like S at n = 1024 that is ~20 iterations and a
# smaller marginal error than 50 plain iterations had (bench/bench_retrieval.py).
DEFAULT_SINKHORN_TOL = 1e-3
DEFAULT_SINKHORN_OMEGA = 1.5
# CPU block size for propagation_scores (see _cache_block).
_CACHE_BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Retrieval:
    """Result of point retrieval for B objects over n = N*N patches.

    pseudo_fg, pseudo_bg: (B, n) bool, disjoint, subsets of P_Box.
    score: (B, n) float, normalised or raw pi_f - pi_b (see module docstring).
    pi_f, pi_b: (B, n) float propagation scores (each row sums to 1 unless its seed set is
        empty, then it is all zeros).
    num_fg, num_bg: (B,) long, number of pseudo FG / BG patches per object.
    valid: (B,) bool, both seed sets non-empty; invalid objects retrieve nothing (the
        paper then falls back to the MIL loss, as for any object with no retrieved point).
    """

    pseudo_fg: Tensor
    pseudo_bg: Tensor
    score: Tensor
    pi_f: Tensor
    pi_b: Tensor
    num_fg: Tensor
    num_bg: Tensor
    valid: Tensor


def propagation_scores(
    S: Tensor,
    fg: Tensor,
    bg: Tensor,
    alpha: int = DEFAULT_ALPHA,
    sinkhorn_iters: int = DEFAULT_SINKHORN_ITERS,
    sinkhorn_eps: float = 1e-6,
    sinkhorn_tol: float | None = DEFAULT_SINKHORN_TOL,
) -> tuple[Tensor, Tensor]:
    """pi_f, pi_b (each (B, n)) from similarity S (B, n, n) and seed masks fg, bg (B, n).

    T = (A + A^T)/2 with A = Sinkhorn(S) = diag(u) K diag(v); the walks run on K, u, v
    (``factored_walk_scores``), T is never formed.
    """
    if S.dim() != 3:
        raise ValueError(f"S must be (B, n, n), got shape {tuple(S.shape)}")
    if fg.shape != S.shape[:2] or bg.shape != S.shape[:2]:
        raise ValueError(f"seed masks {tuple(fg.shape)}, {tuple(bg.shape)} do not fit S {tuple(S.shape)}")
    seeds = torch.stack([fg, bg], dim=1).to(S.device)
    chunk = _cache_block(S)
    parts = []
    for a in range(0, S.shape[0], chunk):
        scaling = sinkhorn_scaling(S[a:a + chunk], iters=sinkhorn_iters, eps=sinkhorn_eps, tol=sinkhorn_tol,
                                   omega=DEFAULT_SINKHORN_OMEGA)
        parts.append(factored_walk_scores(scaling, seeds[a:a + chunk], alpha))  # (b, 2, n)
    pi = torch.cat(parts) if len(parts) > 1 else parts[0]
    return pi[:, 0], pi[:, 1]


def _cache_block(S: Tensor) -> int:
    """Matrices per Sinkhorn + walk call: on CPU as many as keep K within ~32 MB.

    Each Sinkhorn iteration and walk step reads all of K (memory-bound, ~2 reads per
    iteration); a block of K that stays in the last-level cache between the passes makes them
    cache reads. At n = 1024 (4 MB per matrix, float32), batch 32, ms per object for blocks
    of 4 / 8 / 16 / 32 / 64 / 128 MB: 10.1 / 7.6 / 7.4 / 6.6 / 9.2 / 8.4 (2 cores, 105 MB
    L3; tiny blocks pay the per-call overhead, large ones fall out of cache). Each
    matrix's result does not depend on the batch, so blocking changes no value.
    On GPU the whole batch goes in one call.
    """
    if S.device.type != "cpu" or S.shape[0] == 0:
        return max(1, S.shape[0])
    per_matrix = S.shape[-1] * S.shape[-1] * 4
    return max(1, min(S.shape[0], _CACHE_BLOCK_BYTES // per_matrix))


def retrieval_score(pi_f: Tensor, pi_b: Tensor, normalize: bool = True, raw_scale: str = "probability") -> Tensor:
    """score = (pi_f - pi_b) / (pi_f + pi_b) (0 where both are 0), or the raw difference:
    pi_f - pi_b (``raw_scale="probability"``) or n (pi_f - pi_b) (``"uniform"``), (B, n) -> (B, n)."""
    diff = pi_f - pi_b
    if not normalize:
        if raw_scale == "uniform":
            return diff * pi_f.shape[-1]
        if raw_scale != "probability":
            raise ValueError(f"raw_scale must be 'uniform' or 'probability', got {raw_scale!r}")
        return diff
    total = pi_f + pi_b
    return torch.where(total > 0, diff / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(diff))


def label_points(
    score: Tensor, box: Tensor, tau_fg: float, tau_bg: float, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pseudo FG = box & score >= tau_fg; pseudo BG = box & score <= tau_bg & not FG.

    Args:
        score: (B, n); box: (B, n) bool P_Box; valid: optional (B,) bool, objects whose
            row is False get no pseudo points.
    Raises:
        ValueError: if tau_bg > tau_fg (a patch would be both). With tau_bg == tau_fg a
            patch scoring exactly tau goes to FG.
    """
    if tau_bg > tau_fg:
        raise ValueError(f"tau_bg ({tau_bg}) must not exceed tau_fg ({tau_fg})")
    usable = box.to(score.device)
    if valid is not None:
        usable = usable & valid.to(score.device).unsqueeze(-1)
    pseudo_fg = usable & (score >= tau_fg)
    pseudo_bg = usable & (score <= tau_bg) & ~pseudo_fg
    return pseudo_fg, pseudo_bg


def retrieve_points(
    S: Tensor,
    seeds: SeedMasks,
    alpha: int = DEFAULT_ALPHA,
    tau_fg: float = DEFAULT_TAU_FG,
    tau_bg: float = DEFAULT_TAU_BG,
    sinkhorn_iters: int = DEFAULT_SINKHORN_ITERS,
    normalize: bool = True,
    sinkhorn_eps: float = 1e-6,
    sinkhorn_tol: float | None = DEFAULT_SINKHORN_TOL,
    raw_scale: str = "probability",
    min_mass: float = 0.0,
) -> Retrieval:
    """Pseudo FG/BG patches of B objects from their similarity matrices and seed sets.

    Args:
        S: (B, n, n) similarity (head-averaged attention), n = N*N patches.
        seeds: SeedMasks with fg, bg, box each (B, n) bool (from ``seed_masks``).
        alpha: random-walk steps. Default 5: T is dense, so one step already links
            every pair of patches (separated parts included), and a few more spread the 4
            FG seeds' mass over an object whose attention is mostly local. Each step also
            leaks mass across the object boundary and pulls both walks towards the uniform
            distribution, where the score goes to 0 and nothing passes the taus. On
            synthetic attention (blob + separated part, N = 12 and 32, local and broad
            attention) alpha 3..10 was best; broad attention lost most BG recall by
            alpha = 10-30, local noisy attention gained FG recall up to ~10.
        tau_fg, tau_bg: thresholds on the score; defaults +-0.5 (normalised: the patch
            is >= 3x more likely to be reached from one seed set than from the other).
            Patches in between stay unlabelled, which the point loss ignores; in the same
            sweep +-0.5 kept precision >= 0.96 where +-0.3 dropped to ~0.8 on noisy
            attention, and +-0.8 lost a third of the BG recall.
        sinkhorn_iters, sinkhorn_eps, sinkhorn_tol: see ``sinkhorn``. The walk only
            needs T roughly doubly stochastic: on attention-like S, scores after 50
            iterations were within 0.002 of those after 400 (labels differing on <0.1% of
            box patches); easy matrices stop earlier (tol 1e-5). Peaked attention (near
            one-hot rows) converges slowly; there 50 iterations leave ~1% marginal error.
        normalize: score = (pi_f - pi_b) / (pi_f + pi_b) if True (grid-size independent
            taus), the paper's raw pi_f - pi_b if False.
        raw_scale: "probability" (pi_f - pi_b) or "uniform" (n (pi_f - pi_b)) for the raw
            rule; see the module docstring.
        min_mass: label only patches with n (pi_f + pi_b) / 2 >= min_mass (0 = off).
    Returns:
        Retrieval (all tensors on S's device).
    """
    fg, bg, box = (m.to(S.device) for m in (seeds.fg, seeds.bg, seeds.box))
    pi_f, pi_b = propagation_scores(S, fg, bg, alpha, sinkhorn_iters, sinkhorn_eps, sinkhorn_tol)
    score = retrieval_score(pi_f, pi_b, normalize, raw_scale)
    valid = fg.any(dim=-1) & bg.any(dim=-1)
    if min_mass > 0:
        box = box & (0.5 * pi_f.shape[-1] * (pi_f + pi_b) >= min_mass)
    pseudo_fg, pseudo_bg = label_points(score, box, tau_fg, tau_bg, valid)
    return Retrieval(
        pseudo_fg=pseudo_fg,
        pseudo_bg=pseudo_bg,
        score=score,
        pi_f=pi_f,
        pi_b=pi_b,
        num_fg=pseudo_fg.sum(dim=-1),
        num_bg=pseudo_bg.sum(dim=-1),
        valid=valid,
    )
