"""Early-stopped, over-relaxed Sinkhorn (the retrieval default) against 50 plain iterations:
marginals within the tolerance, and the same retrieved points on the demo objects."""
from __future__ import annotations

import pytest
import torch

from exits.propagation import label_points, marginal_error, random_walk_scores, retrieval_score, retrieve_points
from exits.propagation import sinkhorn, sinkhorn_transition, transition_matrix
from exits.propagation.retrieval import DEFAULT_SINKHORN_OMEGA, DEFAULT_SINKHORN_TOL


def _attention(B: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, 16, generator=g)
    return torch.softmax(0.5 * x @ x.transpose(1, 2), dim=-1)


@pytest.mark.parametrize("omega", [1.0, 1.5])
def test_early_stop_meets_the_marginals_within_tol(omega):
    S = _attention(4, 144, 0)
    for tol in (1e-2, 1e-3, 1e-4):
        A = sinkhorn(S, iters=5000, tol=tol, omega=omega)
        assert float(marginal_error(A).max()) <= tol * 1.01
        if omega == 1.0:
            assert (A.sum(-2) - 1).abs().max() < 1e-5  # columns exact after the last column update
    # it stops early: a loose tolerance is not as close as 500 iterations
    assert marginal_error(sinkhorn(S, iters=500, tol=1e-2, omega=omega)).max() > 1e-4


def test_over_relaxation_converges_faster_to_the_same_matrix():
    S = _attention(3, 256, 1)
    plain = sinkhorn(S, iters=2000, tol=1e-7)
    for iters in (15, 20, 30):
        assert marginal_error(sinkhorn(S, iters=iters, omega=1.5)).max() < marginal_error(sinkhorn(S, iters=iters)).max()
    torch.testing.assert_close(sinkhorn(S, iters=2000, tol=1e-7, omega=1.5), plain, atol=1e-6, rtol=0)


def test_over_relaxation_falls_back_when_it_diverges():
    # omega close to 2 oscillates on peaked matrices: the safeguard turns it off per matrix
    S = torch.softmax(3 * _attention(2, 64, 2).log(), dim=-1)
    A = sinkhorn(S, iters=400, omega=1.95)
    plain = sinkhorn(S, iters=400)
    assert torch.isfinite(A).all()
    assert float(marginal_error(A).max()) <= 2 * float(marginal_error(plain).max()) + 1e-6


def test_transition_in_one_go_equals_transition_of_sinkhorn():
    S = _attention(3, 100, 3)
    for omega, tol in ((1.0, None), (1.5, 1e-3)):
        T = sinkhorn_transition(S, iters=50, tol=tol, omega=omega)
        torch.testing.assert_close(T, transition_matrix(sinkhorn(S, iters=50, tol=tol, omega=omega)), atol=1e-7, rtol=0)
        torch.testing.assert_close(T, T.transpose(-1, -2), atol=1e-7, rtol=0)
    S_req = S.clone().requires_grad_(True)
    sinkhorn_transition(S_req, iters=10)[:, 0, 1].sum().backward()
    assert S_req.grad is not None and torch.isfinite(S_req.grad).all()


@pytest.fixture(scope="module")
def demo_similarity(tmp_path_factory):
    """S (B, 144, 144) and seeds of demo objects the way the demo config builds them: a
    random-init extractor's attention mixed with the patch-colour kernel."""
    from exits.config import load_config
    from exits.data.instances_table import build_instances_table
    from exits.data.reader import load_point_dataset
    from exits.demo import generate_demo_dataset
    from exits.models import similarity_matrix
    from exits.propagation import seed_masks
    from exits.propagation.appearance import mix_similarity
    from exits.stages.common import model_from_config
    from exits.stages.object_crops import ObjectCropDataset

    out = tmp_path_factory.mktemp("demo_sk")
    generate_demo_dataset(out, n_train=16, n_val=1, seed=2)
    cfg = load_config("demo", ["device=cpu"])
    ds = load_point_dataset(out / "instances.json", out / "images")
    table = build_instances_table(ds, margin=cfg.data.crop_margin, min_margin_px=cfg.data.crop_min_margin_px,
                                  crop_size=cfg.data.crop_size)
    crops = ObjectCropDataset(table, out / "images", cfg.data.crop_size)
    torch.manual_seed(0)
    model = model_from_config(cfg.backbone).eval()
    items = [crops[i] for i in range(len(crops))]
    images = torch.stack([it["image"] for it in items])
    with torch.no_grad():
        S = similarity_matrix(model, images, layers=tuple(cfg.retrieval.layers)).float()
        S = mix_similarity(S, images, cfg.backbone.grid, cfg.retrieval.appearance_weight, cfg.retrieval.appearance_sigma)
    seeds = seed_masks(torch.stack([it["points"] for it in items]), torch.stack([it["box"] for it in items]),
                       cfg.data.crop_size, cfg.backbone.grid, cfg.retrieval.delta_px)
    return S, seeds, cfg.retrieval


def test_default_retrieval_retrieves_the_points_of_fifty_plain_iterations_on_demo_objects(demo_similarity):
    S, seeds, r = demo_similarity
    assert S.shape[0] >= 30
    T = transition_matrix(sinkhorn(S, iters=50))  # the pre-early-stop computation
    pi = random_walk_scores(T, torch.stack([seeds.fg, seeds.bg], 1), r.alpha)
    for normalize, raw_scale, tau_fg, tau_bg in ((True, "probability", 0.1, -0.1), (False, "uniform", r.tau_fg, r.tau_bg)):
        score = retrieval_score(pi[:, 0], pi[:, 1], normalize, raw_scale)
        valid = seeds.fg.any(-1) & seeds.bg.any(-1)
        ref_fg, ref_bg = label_points(score, seeds.box, tau_fg, tau_bg, valid)
        res = retrieve_points(S, seeds, alpha=r.alpha, tau_fg=tau_fg, tau_bg=tau_bg, normalize=normalize,
                              raw_scale=raw_scale)
        differ = int(((res.pseudo_fg != ref_fg) | (res.pseudo_bg != ref_bg)).sum())
        box = int(seeds.box.sum())
        assert ref_fg.sum() + ref_bg.sum() > 0.05 * box  # something is retrieved at all
        assert differ <= 0.001 * box, (differ, box)  # stated agreement: >= 99.9 % of box patches
        assert (res.score - score).abs().max() < 2e-2
    A = sinkhorn(S, iters=50, tol=DEFAULT_SINKHORN_TOL, omega=DEFAULT_SINKHORN_OMEGA)
    assert float(marginal_error(A).max()) <= DEFAULT_SINKHORN_TOL * 1.01


def test_stopped_matrices_cost_no_products_and_keep_their_result():
    # n >= 256 takes the per-matrix CPU path, where a stopped matrix is skipped: a batch of a
    # fast (flat) and slow (peaked) matrix must give each one's result alone (to float
    # rounding: batched and single row-vector products round differently).
    from exits.propagation.sinkhorn import batched_matvec, batched_vecmat, sinkhorn_scaling

    flat = _attention(1, 256, 5) * 0.1 + 0.9 / 256
    peaked = torch.softmax(2 * _attention(1, 256, 6).log(), dim=-1)
    S = torch.cat([flat, peaked, flat.flip(-1)])
    both = sinkhorn_scaling(S, iters=200, tol=1e-4, omega=1.5)
    for b in range(3):
        alone = sinkhorn_scaling(S[b:b + 1], iters=200, tol=1e-4, omega=1.5)
        torch.testing.assert_close(both.u[b], alone.u[0], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(both.v[b], alone.v[0], atol=1e-6, rtol=1e-4)
        err = float(marginal_error(alone.matrix()).max())
        # the flat ones stop early; the peaked one runs all 200 iterations beside them
        assert err <= 1e-4 * 1.01 if b != 1 else err > 1e-4
    K, x = torch.rand(3, 256, 256), torch.rand(3, 256)
    full_mv, full_vm = batched_matvec(K, x), batched_vecmat(x, K)
    part_mv, part_vm = batched_matvec(K, x, [0, 2]), batched_vecmat(x, K, [2])
    torch.testing.assert_close(full_mv, torch.einsum("bij,bj->bi", K, x))
    torch.testing.assert_close(full_vm, torch.einsum("bij,bi->bj", K, x))
    assert torch.equal(part_mv[[0, 2]], full_mv[[0, 2]]) and torch.equal(part_mv[1], torch.ones(256))
    torch.testing.assert_close(part_vm[2], full_vm[2])
    assert torch.equal(part_vm[:2], torch.ones(2, 256))
