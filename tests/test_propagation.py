"""EXITS point retrieval math: Sinkhorn, random walk, seed sets, retrieval."""
from __future__ import annotations

import pytest
import torch

from exits.propagation import (
    SeedMasks,
    SinkhornScaling,
    factored_walk_scores,
    marginal_error,
    move_points_inwards,
    random_walk_scores,
    random_walk_scores_reference,
    retrieval_score,
    retrieve_points,
    seed_masks,
    sinkhorn,
    sinkhorn_scaling,
    transition_matrix,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _softmax_attention(B: int, n: int, sharpness: float, g: torch.Generator) -> torch.Tensor:
    q = torch.randn(B, n, 16, generator=g)
    k = torch.randn(B, n, 16, generator=g)
    return torch.softmax(q @ k.transpose(1, 2) * sharpness / 4.0, dim=-1)


# ----------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_random_marginals(dtype: torch.dtype) -> None:
    S = torch.rand(3, 60, 60, generator=_gen(1), dtype=dtype)
    A = sinkhorn(S)
    assert A.shape == S.shape and A.dtype == dtype
    assert (A >= 0).all()
    assert marginal_error(A).max() < 1e-4


def test_sinkhorn_tiny_entries_and_zeros() -> None:
    g = _gen(2)
    S = torch.rand(4, 80, 80, generator=g)
    S = torch.where(S < 0.6, torch.full_like(S, 1e-30), S)
    S = S / S.sum(-1, keepdim=True)
    for eps in (1e-6, 0.0):
        A = sinkhorn(S, eps=eps)
        assert torch.isfinite(A).all()
        assert marginal_error(A).max() < 1e-4
    # Exact zeros with no floor: still finite and balanced (zeros become float32 tiny).
    Z = torch.where(S < 1e-20, torch.zeros_like(S), S)
    A = sinkhorn(Z, eps=0.0)
    assert torch.isfinite(A).all() and marginal_error(A).max() < 1e-4


def test_sinkhorn_peaked_softmax_attention() -> None:
    S = _softmax_attention(3, 144, sharpness=2.0, g=_gen(3))
    assert S.max() > 0.99 and S.min() < 1e-8  # some rows nearly one-hot
    A = sinkhorn(S)  # default 50 iterations
    assert torch.isfinite(A).all()
    assert marginal_error(A).max() < 1e-4
    # Much sharper (rows one-hot to float precision, entries down to 1e-27): Sinkhorn
    # converges slowly on such matrices but gets there with more iterations.
    S = _softmax_attention(3, 144, sharpness=6.0, g=_gen(3))
    assert S.min() < 1e-25
    A = sinkhorn(S, iters=200)
    assert torch.isfinite(A).all()
    assert marginal_error(A).max() < 1e-4


def test_sinkhorn_recovers_doubly_stochastic_from_extreme_scalings() -> None:
    # The DS scaling of a positive matrix is unique: diag(r) P diag(c) -> P. Scalings of
    # 1e+-15 need more than float32's range in the linear domain (exercises absorption).
    g = _gen(4)
    n = 40
    P = sinkhorn(torch.rand(2, n, n, generator=g, dtype=torch.float64), iters=500)
    r = 10 ** (torch.rand(2, n, generator=g, dtype=torch.float64) * 30 - 15)
    c = 10 ** (torch.rand(2, n, generator=g, dtype=torch.float64) * 30 - 15)
    S = r[:, :, None] * P * c[:, None, :]
    A64 = sinkhorn(S, iters=300, eps=0.0)
    torch.testing.assert_close(A64, P, atol=1e-12, rtol=0)
    A32 = sinkhorn(S.float(), iters=300, eps=0.0)
    torch.testing.assert_close(A32.double(), P, atol=1e-6, rtol=0)
    # Differentiable through the absorption steps.
    S_req = S.clone().requires_grad_()
    sinkhorn(S_req, iters=300, eps=0.0)[:, 0, 1].sum().backward()
    assert S_req.grad is not None and torch.isfinite(S_req.grad).all()


def test_sinkhorn_scale_invariant_unbatched_and_validates() -> None:
    S = torch.rand(50, 50, generator=_gen(5))
    A = sinkhorn(S)
    assert A.shape == (50, 50)
    torch.testing.assert_close(sinkhorn(S * 3e37), A, atol=1e-6, rtol=0)  # row sums overflow
    torch.testing.assert_close(sinkhorn(S[None])[0], A)
    with pytest.raises(ValueError):
        sinkhorn(-S)
    bad = S.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError):
        sinkhorn(bad)


def test_sinkhorn_tol_stops_early_within_tol() -> None:
    S = _softmax_attention(2, 100, sharpness=1.0, g=_gen(6))
    A = sinkhorn(S, iters=1000, tol=1e-5)
    assert marginal_error(A).max() < 1e-5


def test_transition_matrix_symmetric_doubly_stochastic() -> None:
    S = _softmax_attention(3, 64, sharpness=2.0, g=_gen(7))
    A = sinkhorn(S)
    assert (A - A.transpose(1, 2)).abs().max() > 1e-3  # A itself is not symmetric
    T = transition_matrix(A)
    assert torch.equal(T, T.transpose(1, 2))
    assert marginal_error(T).max() < 1e-4


# -------------------------------------------------------------------------- random walk


def _random_T(B: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    S = _softmax_attention(B, n, sharpness=2.0, g=_gen(seed)).to(dtype)
    return transition_matrix(sinkhorn(S, iters=200))


@pytest.mark.parametrize("alpha", [0, 1, 2, 5, 13])
def test_random_walk_matches_matrix_power_float64(alpha: int) -> None:
    T = _random_T(3, 50, torch.float64, seed=8)
    seeds = torch.rand(3, 50, generator=_gen(9)) < 0.2
    got = random_walk_scores(T, seeds, alpha)
    ref = random_walk_scores_reference(T, seeds, alpha)
    torch.testing.assert_close(got, ref, atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("alpha", [1, 3, 10])
def test_random_walk_matches_matrix_power_float32(alpha: int) -> None:
    T = _random_T(2, 144, torch.float32, seed=10)
    seeds = torch.rand(2, 144, generator=_gen(11)) < 0.1
    got = random_walk_scores(T, seeds, alpha)
    ref = random_walk_scores_reference(T, seeds, alpha)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    # alpha = 1 is the mean of the seed rows of T, by definition.
    if alpha == 1:
        manual = torch.stack([T[b][seeds[b]].mean(0) for b in range(2)])
        torch.testing.assert_close(got, manual, atol=1e-7, rtol=1e-5)


def test_random_walk_stacked_sets_weights_and_empty() -> None:
    T = _random_T(2, 36, torch.float64, seed=12)
    fg = torch.zeros(2, 36, dtype=torch.bool)
    fg[0, [3, 7]] = True
    fg[1, 20] = True
    bg = torch.zeros(2, 36, dtype=torch.bool)
    bg[0, 30:] = True  # object 1 has an empty BG set
    both = random_walk_scores(T, torch.stack([fg, bg], 1), alpha=4)
    assert both.shape == (2, 2, 36)
    torch.testing.assert_close(both[:, 0], random_walk_scores(T, fg, 4))
    torch.testing.assert_close(both[:, 1], random_walk_scores(T, bg, 4))
    assert torch.isfinite(both).all()
    assert torch.equal(both[1, 1], torch.zeros(36, dtype=torch.float64))
    torch.testing.assert_close(random_walk_scores_reference(T, bg, 4)[1], torch.zeros(36, dtype=torch.float64))
    # Weights: a 3:1 weighting of two seeds equals the weighted mix of single-seed walks.
    w = torch.zeros(2, 36, dtype=torch.float64)
    w[:, 3], w[:, 9] = 3.0, 1.0
    one = torch.zeros(2, 36, dtype=torch.bool)
    one[:, 3] = True
    other = torch.zeros(2, 36, dtype=torch.bool)
    other[:, 9] = True
    mix = 0.75 * random_walk_scores(T, one, 4) + 0.25 * random_walk_scores(T, other, 4)
    torch.testing.assert_close(random_walk_scores(T, w, 4), mix)
    # Unbatched.
    torch.testing.assert_close(random_walk_scores(T[0], fg[0], 4), both[0, 0])


@pytest.mark.parametrize("alpha", [0, 1, 2, 5, 9])
def test_factored_walk_equals_walk_on_formed_T(alpha: int) -> None:
    # Retrieval walks on K, u, v without forming T = (A + A^T)/2: the result must be the
    # walk on the formed T, also for u, v far from 1 (a non-symmetric A) and K far from S.
    g = _gen(21)
    K = torch.rand(3, 40, 40, generator=g, dtype=torch.float64) + 0.01
    u = torch.exp(torch.randn(3, 40, generator=g, dtype=torch.float64))
    v = torch.exp(torch.randn(3, 40, generator=g, dtype=torch.float64))
    scaling = SinkhornScaling(K, u, v)
    A = scaling.matrix()
    torch.testing.assert_close(A, K * u[:, :, None] * v[:, None, :])
    T = transition_matrix(A)
    fg = torch.rand(3, 40, generator=g) < 0.2
    bg = torch.rand(3, 40, generator=g) < 0.3
    bg[2] = False  # an empty set walks to zeros on both paths
    seeds = torch.stack([fg, bg], 1)
    got = factored_walk_scores(scaling, seeds, alpha)
    assert got.shape == (3, 2, 40)
    torch.testing.assert_close(got, random_walk_scores(T, seeds, alpha), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(factored_walk_scores(scaling, fg, alpha), random_walk_scores(T, fg, alpha),
                               atol=1e-12, rtol=1e-10)
    assert torch.equal(got[2, 1], torch.zeros(40, dtype=torch.float64))


def test_factored_walk_on_sinkhorn_scaling_matches_sinkhorn_transition() -> None:
    S = _softmax_attention(2, 64, sharpness=3.0, g=_gen(22))
    scaling = sinkhorn_scaling(S, iters=200)
    T = transition_matrix(sinkhorn(S, iters=200))
    seeds = torch.rand(2, 64, generator=_gen(23)) < 0.15
    got = factored_walk_scores(scaling, seeds, 5)
    torch.testing.assert_close(got, random_walk_scores(T, seeds, 5), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.ones(2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="alpha"):
        factored_walk_scores(scaling, seeds, -1)
    with pytest.raises(ValueError, match="does not fit"):
        factored_walk_scores(scaling, seeds[:, :10], 2)


# --------------------------------------------------------------------------- seed sets


def test_seed_masks_hand_made_example() -> None:
    # crop 96, N = 12 -> patches of 8 px. Object 0: box x [20, 70), y [10, 60).
    # Object 1: box exactly on patch edges, x, y in [16, 48), delta 0.
    points = torch.tensor(
        [
            [[40.0, 10.0], [20.0, 35.0], [50.0, 59.0], [69.0, 30.0]],
            [[30.0, 16.0], [16.0, 30.0], [33.0, 47.0], [47.0, 20.0]],
        ]
    )
    box = torch.tensor([[20.0, 10.0, 70.0, 60.0], [16.0, 16.0, 48.0, 48.0]])
    # delta only applies per call, so run the objects separately with their deltas.
    s0 = seed_masks(points[:1], box[:1], crop_size=96, grid=12, delta=8.0)
    s1 = seed_masks(points[1:], box[1:], crop_size=96, grid=12, delta=0.0)
    # Moved points: top (40, 18) -> r2 c5; left (28, 35) -> r4 c3;
    # bottom (50, 51) -> r6 c6; right (61, 30) -> r3 c7.
    torch.testing.assert_close(
        s0.fg_points[0], torch.tensor([[40.0, 18.0], [28.0, 35.0], [50.0, 51.0], [61.0, 30.0]])
    )
    assert set(s0.fg[0].nonzero().flatten().tolist()) == {2 * 12 + 5, 4 * 12 + 3, 6 * 12 + 6, 3 * 12 + 7}
    box0 = {r * 12 + c for r in range(1, 8) for c in range(2, 9)}  # rows 1..7, cols 2..8
    assert set(s0.box[0].nonzero().flatten().tolist()) == box0 - {29, 51, 78, 43}
    assert set(s0.bg[0].nonzero().flatten().tolist()) == set(range(144)) - box0
    # Object 1: edges at 16 and 48 touch, but do not overlap, columns/rows 1 and 6.
    box1 = {r * 12 + c for r in range(2, 6) for c in range(2, 6)}
    fg1 = {2 * 12 + 3, 3 * 12 + 2, 5 * 12 + 4, 2 * 12 + 5}
    assert set(s1.fg[0].nonzero().flatten().tolist()) == fg1
    assert set(s1.box[0].nonzero().flatten().tolist()) == box1 - fg1
    assert set(s1.bg[0].nonzero().flatten().tolist()) == set(range(144)) - box1
    # Batched call with a common delta agrees with per-object calls, and sets are disjoint.
    both = seed_masks(points, box, crop_size=96, grid=12, delta=8.0)
    assert torch.equal(both.fg[0], s0.fg[0]) and torch.equal(both.box[0], s0.box[0])
    assert not (both.fg & both.bg).any() and not (both.fg & both.box).any() and not (both.bg & both.box).any()
    assert (both.fg | both.bg | both.box).all()


def test_move_points_inwards_stops_at_centre_and_clamps_to_grid() -> None:
    # Thin object: box y in [40, 44); delta 10 would swap top and bottom.
    points = torch.tensor([[[30.0, 40.0], [10.0, 42.0], [30.0, 43.0], [95.9, 41.0]]])
    box = torch.tensor([[10.0, 40.0, 96.0, 44.0]])
    moved = move_points_inwards(points, box, 10.0)
    assert moved[0, 0, 1] == 42.0 and moved[0, 2, 1] == 42.0  # both stop at cy = 42
    assert moved[0, 1, 0] == 20.0 and moved[0, 3, 0] == pytest.approx(85.9)
    # A point on the crop's far edge lands in the last patch, not outside the grid.
    s = seed_masks(points, box, crop_size=96, grid=12, delta=0.0)
    assert s.fg[0, 5 * 12 + 11]


# --------------------------------------------------------------------------- retrieval

N8, CROP8 = 8, 64  # 8 x 8 grid of 8-px patches


def _idx(cells: list[tuple[int, int]]) -> list[int]:
    return [r * N8 + c for r, c in cells]


# Separated object A inside box rows/cols 1..6:
#   part 1: a "J" = columns 1-2 of rows 1-6 plus row 6 to column 6 (holds all 4 seeds),
#   part 2: rows 2-3 x cols 4-5, not touching part 1 and holding no seed.
PART1 = _idx([(r, c) for r in range(1, 7) for c in (1, 2)] + [(6, c) for c in range(3, 7)])
PART2 = _idx([(r, c) for r in (2, 3) for c in (4, 5)])
POINTS8 = torch.tensor([[[12.0, 8.0], [8.0, 28.0], [28.0, 55.0], [55.0, 52.0]]])  # t, l, b, r
BOX8 = torch.tensor([[8.0, 8.0, 56.0, 56.0]])


def _block_similarity(object_cells: list[int], link_parts: bool = True) -> torch.Tensor:
    """Attention-like S: strong within the object, strong within background, weak across,
    plus a spatial-locality term (which ties part 2 to its background neighbours)."""
    n = N8 * N8
    obj = torch.zeros(n, dtype=torch.bool)
    obj[object_cells] = True
    same = obj[:, None] == obj[None, :]
    S = torch.where(same, 1.0, 0.01)
    if not link_parts:  # part 2 looks like background, not like part 1
        p2 = torch.zeros(n, dtype=torch.bool)
        p2[PART2] = True
        S = torch.where(p2[:, None] ^ p2[None, :], 0.01, S)
        S = torch.where(p2[:, None] & ~obj[None, :], 1.0, S)
        S = torch.where(~obj[:, None] & p2[None, :], 1.0, S)
    rc = torch.stack(torch.meshgrid(torch.arange(N8), torch.arange(N8), indexing="ij"), -1).reshape(-1, 2).float()
    S = S + 0.5 * torch.exp(-torch.cdist(rc, rc) ** 2 / 2.0)
    return (S / S.sum(-1, keepdim=True))[None]


def test_retrieval_block_structured_separated_object() -> None:
    seeds = seed_masks(POINTS8, BOX8, crop_size=CROP8, grid=N8, delta=0.0)
    fg_seed = set(seeds.fg[0].nonzero().flatten().tolist())
    assert fg_seed <= set(PART1) and not fg_seed & set(PART2)  # part 2 has no seed
    S = _block_similarity(PART1 + PART2)
    obj = torch.zeros(N8 * N8, dtype=torch.bool)
    obj[PART1 + PART2] = True
    in_box = seeds.box[0]
    for normalize, tau_fg, tau_bg in ((True, 0.5, -0.5), (False, 0.25 / 64, -0.25 / 64)):
        res = retrieve_points(S, seeds, alpha=5, tau_fg=tau_fg, tau_bg=tau_bg, normalize=normalize)
        assert torch.equal(res.pseudo_fg[0], in_box & obj), normalize
        assert torch.equal(res.pseudo_bg[0], in_box & ~obj), normalize
        assert res.pseudo_fg[0, PART2].all()  # reached through similarity alone
        assert res.num_fg.tolist() == [int((in_box & obj).sum())]
        assert res.num_bg.tolist() == [int((in_box & ~obj).sum())]
        assert res.valid.tolist() == [True]
    res = retrieve_points(S, seeds)  # defaults
    assert torch.equal(res.pseudo_fg[0], in_box & obj) and torch.equal(res.pseudo_bg[0], in_box & ~obj)
    assert res.score.min() >= -1.0 and res.score.max() <= 1.0
    torch.testing.assert_close(res.score, retrieval_score(res.pi_f, res.pi_b))
    # Sinkhorn stops at row sums within DEFAULT_SINKHORN_TOL (1e-3) of 1: alpha = 5 steps keep the walk's
    # mass within alpha * tol of 1.
    torch.testing.assert_close(res.pi_f.sum(-1), torch.ones(1), atol=5e-3, rtol=0)


def test_retrieval_follows_similarity_not_geometry() -> None:
    # Same seeds, but S says part 2 belongs to the background: it must not become FG.
    seeds = seed_masks(POINTS8, BOX8, crop_size=CROP8, grid=N8, delta=0.0)
    res = retrieve_points(_block_similarity(PART1, link_parts=False), seeds)
    assert not res.pseudo_fg[0, PART2].any()
    assert res.pseudo_bg[0, PART2].all()
    assert res.pseudo_fg[0, [i for i in PART1 if seeds.box[0, i]]].all()


def test_retrieval_empty_bg_set_retrieves_nothing_and_taus_validated() -> None:
    seeds = seed_masks(POINTS8, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), crop_size=CROP8, grid=N8, delta=0.0)
    assert not seeds.bg.any()
    res = retrieve_points(_block_similarity(PART1 + PART2), seeds)
    assert res.valid.tolist() == [False]
    assert res.num_fg.tolist() == [0] and res.num_bg.tolist() == [0]
    assert torch.isfinite(res.score).all() and torch.equal(res.pi_b, torch.zeros_like(res.pi_b))
    with pytest.raises(ValueError):
        retrieve_points(_block_similarity(PART1), seeds, tau_fg=-0.5, tau_bg=0.5)


def test_batched_retrieval_equals_one_by_one() -> None:
    g = _gen(13)
    B, N, crop = 5, 12, 96
    x0 = torch.randint(4, 40, (B,), generator=g).float()
    y0 = torch.randint(4, 40, (B,), generator=g).float()
    x1 = x0 + torch.randint(20, 50, (B,), generator=g).float()
    y1 = y0 + torch.randint(20, 50, (B,), generator=g).float()
    box = torch.stack([x0, y0, x1, y1], 1)
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    points = torch.stack(
        [torch.stack([xm, y0], 1), torch.stack([x0, ym], 1), torch.stack([xm, y1 - 1], 1), torch.stack([x1 - 1, ym], 1)], 1
    )
    seeds = seed_masks(points, box, crop_size=crop, grid=N, delta=6.0)
    # Noisy attention in which the patches of the ellipse inscribed in the box (the
    # object; the extreme points lie on it) look alike, and the rest looks alike.
    centre = (torch.arange(N).float() + 0.5) * (crop / N)
    ex = ((centre - xm[:, None]) / ((x1 - x0)[:, None] / 2)) ** 2  # (B, N) over columns
    ey = ((centre - ym[:, None]) / ((y1 - y0)[:, None] / 2)) ** 2  # (B, N) over rows
    obj = ((ey[:, :, None] + ex[:, None, :]) <= 1).flatten(1).long()  # (B, n)
    feats = torch.randn(2, 16, generator=g)[obj] + 0.8 * torch.randn(B, N * N, 16, generator=g)
    S = torch.softmax(feats @ feats.transpose(1, 2) / 4.0, dim=-1)
    kw: dict = {}
    batched = retrieve_points(S, seeds, **kw)
    for b in range(B):
        one = SeedMasks(seeds.fg[b : b + 1], seeds.bg[b : b + 1], seeds.box[b : b + 1], seeds.fg_points[b : b + 1])
        single = retrieve_points(S[b : b + 1], one, **kw)
        torch.testing.assert_close(single.pi_f[0], batched.pi_f[b], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(single.pi_b[0], batched.pi_b[b], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(single.score[0], batched.score[b], atol=1e-5, rtol=0)
        assert torch.equal(single.pseudo_fg[0], batched.pseudo_fg[b])
        assert torch.equal(single.pseudo_bg[0], batched.pseudo_bg[b])
    assert (batched.num_fg > 0).sum() >= 2 and (batched.num_bg > 0).sum() >= 2
