"""Issue 13: BG seeds for an object whose box fills its crop, and the raw retrieval rule."""
from __future__ import annotations

import numpy as np
import torch

from exits.data.crops import crop_window
from exits.propagation import retrieve_points, seed_masks
from exits.propagation.neighbours import neighbour_bg_seeds
from exits.propagation.retrieval import retrieval_score
from exits.stages.object_crops import box_in_crop

W = H = 64
S_CROP, GRID = 32, 8  # 4 px patches


def _objects() -> tuple[list, np.ndarray, np.ndarray]:
    """Object 0 spans the whole 64x64 image; object 1 is a small object inside it."""
    big = np.array([[30, 0], [0, 30], [30, 63], [63, 30]], float)      # top, left, bottom, right
    small = np.array([[40, 40], [34, 46], [40, 52], [46, 46]], float)
    windows = [crop_window(p, W, H, margin=0.15, min_margin_px=4, size=S_CROP) for p in (big, small)]
    pts = np.stack([w.image_to_crop(p) for w, p in zip(windows, (big, small))]).astype(np.float32)
    boxes = np.stack([box_in_crop(p, w) for w, p in zip(windows, (big, small))])
    return windows, pts, boxes


def test_image_spanning_object_gets_bg_seeds_from_the_other_objects() -> None:
    windows, pts, boxes = _objects()
    assert windows[0].as_list() == [0, 0, 64, 64]  # clipped: the box fills the crop
    plain = seed_masks(torch.from_numpy(pts), torch.from_numpy(boxes), S_CROP, GRID, delta=2.0)
    assert plain.bg[0].sum() == 0  # the old behaviour: no BG seed, retrieval invalid
    extra = neighbour_bg_seeds(["a.jpg", "a.jpg"], windows, pts, boxes, GRID, delta=2.0)
    seeds = seed_masks(torch.from_numpy(pts), torch.from_numpy(boxes), S_CROP, GRID, delta=2.0, extra_bg=extra)
    assert seeds.bg[0].sum() > 0
    # The small object's moved-in extreme points (image ~ (40,42), (36,46), (40,50), (44,46))
    # land in the big crop's patches (row, col) = (y // 8, x // 8) of the 64 px image.
    expected = {r * GRID + c for r, c in {(5, 5), (4, 4), (6, 5), (5, 5), (5, 4), (5, 5)}}
    got = set(torch.nonzero(seeds.bg[0]).flatten().tolist())
    assert got and got <= {r * GRID + c for r in range(4, 7) for c in range(4, 7)}
    assert got & expected
    # Seeds, not candidates: they leave P_Box; FG seeds of the big object are untouched.
    assert not (seeds.bg[0] & seeds.box[0]).any() and not (seeds.bg[0] & seeds.fg[0]).any()
    assert torch.equal(seeds.fg, plain.fg)
    # Fallback mode leaves an object that already has outside-box BG seeds alone.
    assert torch.equal(seeds.bg[1], plain.bg[1])
    # The retrieval is now valid for the spanning object.
    n = GRID * GRID
    S = torch.full((2, n, n), 1.0 / n)
    assert bool(retrieve_points(S, seeds, alpha=1).valid[0]) and not bool(retrieve_points(S, plain, alpha=1).valid[0])


def test_objects_in_other_images_give_no_seeds() -> None:
    windows, pts, boxes = _objects()
    extra = neighbour_bg_seeds(["a.jpg", "b.jpg"], windows, pts, boxes, GRID, delta=2.0)
    assert not extra.any()


def _hand_made_similarity(eps: float = 0.01) -> tuple[torch.Tensor, object]:
    """n = 9: FG block {0..3}, BG block {4..7} (uniform 1/4 inside each block), patch 8
    linked to FG patch 3 by eps only. Symmetric and doubly stochastic, so T = S."""
    n = 9
    S = torch.zeros(n, n, dtype=torch.float64)
    S[:4, :4] = 0.25
    S[4:8, 4:8] = 0.25
    S[3, 3] -= eps
    S[8, 8] = 1 - eps
    S[3, 8] = S[8, 3] = eps
    fg = torch.zeros(1, n, dtype=torch.bool)
    bg = torch.zeros(1, n, dtype=torch.bool)
    fg[0, 0], bg[0, 4] = True, True
    box = ~(fg | bg)

    class Seeds:
        pass

    seeds = Seeds()
    seeds.fg, seeds.bg, seeds.box = fg, bg, box
    return S[None], seeds


def test_raw_rule_on_a_hand_made_matrix() -> None:
    S, seeds = _hand_made_similarity()
    common = dict(alpha=2, sinkhorn_iters=50)
    raw = retrieve_points(S, seeds, tau_fg=1.0, tau_bg=-1.0, normalize=False, raw_scale="uniform", **common)
    # pi_f on FG patches ~ 1/4, so n (pi_f - pi_b) ~ 9/4 >= 1; BG patches ~ -9/4; patch 8 ~ 9 * eps / 4 < 1.
    assert raw.pseudo_fg[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert raw.pseudo_bg[0].nonzero().flatten().tolist() == [5, 6, 7]
    assert torch.allclose(raw.score[0, 1], torch.tensor(9 * (raw.pi_f[0, 1] - raw.pi_b[0, 1]).item(), dtype=torch.float64))
    # The paper's unscaled difference with the same tau retrieves nothing (|pi_f - pi_b| <= 1/4).
    unscaled = retrieve_points(S, seeds, tau_fg=1.0, tau_bg=-1.0, normalize=False, raw_scale="probability", **common)
    assert unscaled.num_fg.item() == 0 and unscaled.num_bg.item() == 0
    # The ratio labels the barely reached patch 8 as FG; the minimum-mass check removes it.
    ratio = retrieve_points(S, seeds, tau_fg=0.5, tau_bg=-0.5, **common)
    assert bool(ratio.pseudo_fg[0, 8])
    massed = retrieve_points(S, seeds, tau_fg=0.5, tau_bg=-0.5, min_mass=0.5, **common)
    assert not bool(massed.pseudo_fg[0, 8])
    assert massed.pseudo_fg[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert massed.pseudo_bg[0].nonzero().flatten().tolist() == [5, 6, 7]


def test_raw_scale_is_checked() -> None:
    import pytest

    with pytest.raises(ValueError):
        retrieval_score(torch.zeros(1, 4), torch.zeros(1, 4), normalize=False, raw_scale="bogus")
