"""Dice, MIL, point and CRF losses: values at known points, masking, gradients."""
from __future__ import annotations

import pytest
import torch

from exits.losses import crf_loss, crf_target, dice_loss, downsample_to_grid, mil_loss, point_loss


def box(b: int, h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(b, h, w)
    m[:, y0:y1, x0:x1] = 1.0
    return m


# ---------------------------------------------------------------- dice


def test_dice_identical_is_zero_and_disjoint_is_one():
    t = box(2, 16, 16, 2, 9, 3, 12)
    assert dice_loss(t, t, reduction="none").abs().max().item() < 1e-6
    disjoint = box(2, 16, 16, 10, 16, 0, 16)
    assert torch.allclose(dice_loss(disjoint, t, reduction="none"), torch.ones(2), atol=1e-6)


def test_dice_soft_target_is_minimised_at_the_target():
    torch.manual_seed(0)
    t = torch.rand(3, 8, 8)
    assert dice_loss(t, t).item() < 1e-6
    for delta in (0.05, -0.05):
        assert dice_loss((t + delta).clamp(0, 1), t).item() > 1e-4


def test_dice_reductions_and_shapes():
    p, t = torch.rand(4, 2, 5, 5), (torch.rand(4, 2, 5, 5) > 0.5).float()
    per = dice_loss(p, t, reduction="none")
    assert per.shape == (4,)
    assert torch.isclose(dice_loss(p, t), per.mean())
    assert torch.isclose(dice_loss(p, t, reduction="sum"), per.sum())
    assert ((per >= 0) & (per <= 1)).all()
    with pytest.raises(ValueError):
        dice_loss(p, t, reduction="max")
    with pytest.raises(ValueError):
        dice_loss(p, t[:, :1])


def test_dice_empty_prediction_against_empty_target_is_zero():
    z = torch.zeros(2, 4, 4)
    assert dice_loss(z, z).item() == pytest.approx(0.0)
    assert dice_loss(torch.full((2, 4, 4), 0.5), z).item() == pytest.approx(1.0, abs=1e-5)


def test_dice_gradient_raises_target_pixels_and_lowers_others():
    t = box(1, 8, 8, 2, 6, 2, 6)
    p = torch.full((1, 8, 8), 0.5, requires_grad=True)
    dice_loss(p, t).backward()
    g = p.grad[0]
    assert (g[t[0] > 0] < 0).all()  # gradient descent increases p on the object
    assert (g[t[0] == 0] > 0).all()  # and decreases it elsewhere


def test_dice_weight_equals_masking_both_arguments():
    torch.manual_seed(1)
    p, t = torch.rand(3, 6, 6), (torch.rand(3, 6, 6) > 0.5).float()
    k = (torch.rand(3, 6, 6) > 0.4).float()
    assert torch.allclose(dice_loss(p, t, weight=k, reduction="none"), dice_loss(p * k, t * k, reduction="none"))
    # Elements with weight 0 do not matter.
    p2 = torch.where(k > 0, p, torch.rand(3, 6, 6))
    assert torch.allclose(dice_loss(p2, t, weight=k, reduction="none"), dice_loss(p, t, weight=k, reduction="none"))


# ---------------------------------------------------------------- MIL


def test_mil_zero_for_box_and_large_for_empty():
    b = box(2, 20, 24, 4, 15, 6, 18)
    assert mil_loss(b, b, reduction="none").abs().max().item() < 1e-6
    empty = mil_loss(torch.zeros_like(b), b, reduction="none")
    assert torch.all(empty > 1.99)


def test_mil_small_for_any_mask_touching_every_row_and_column_of_the_box():
    b = box(1, 20, 24, 4, 15, 6, 18)
    # An "X" made of the two diagonals of the box touches every row and column.
    cross = torch.zeros_like(b)
    rows = torch.arange(4, 15)
    cols = torch.linspace(6, 17, rows.numel()).round().long()
    cross[0, rows, cols] = 1.0
    cross[0, rows, cols.flip(0)] = 1.0
    cross[0, 4, 6:18] = 1.0  # make sure all columns are hit despite rounding
    assert mil_loss(cross, b).item() < 1e-6
    # Half the box leaves half the columns empty: clearly penalised.
    half = box(1, 20, 24, 4, 15, 6, 12)
    assert mil_loss(half, b).item() > 0.2
    # Spilling outside the box is penalised too.
    spill = box(1, 20, 24, 0, 20, 0, 24)
    assert mil_loss(spill, b).item() > 0.2


def test_mil_accepts_channel_dim_and_projects_on_the_right_axes():
    b = box(1, 10, 30, 2, 8, 5, 25)
    assert torch.isclose(mil_loss(b[:, None], b[:, None]), mil_loss(b, b))
    # A single full column touches all rows of the box but only one of 20 columns.
    col = torch.zeros_like(b)
    col[0, 2:8, 10] = 1.0
    loss_x = 1 - 2 * 1 / (1 + 20)  # Proj_x: per column
    assert mil_loss(col, b).item() == pytest.approx(loss_x, abs=1e-4)


# ---------------------------------------------------------------- point loss


def make_point_inputs(b: int = 2, n: int = 8, size: int = 32):
    target = torch.zeros(b, n, n)
    labelled = torch.zeros(b, n, n, dtype=torch.bool)
    # FG seeds inside the object, BG patches outside.
    for y, x in [(2, 4), (4, 2), (5, 4), (4, 5)]:
        target[:, y, x] = 1
        labelled[:, y, x] = True
    labelled[:, 0, :] = True
    labelled[:, :, 0] = True
    box_mask = box(b, size, size, 8, 28, 8, 28)
    return target, labelled, box_mask


def test_downsample_is_patch_mean():
    m = torch.rand(2, 32, 32)
    g = downsample_to_grid(m, 8)
    assert g.shape == (2, 8, 8)
    assert torch.isclose(g[1, 3, 5], m[1, 12:16, 20:24].mean())
    assert downsample_to_grid(g, 8) is g


def test_point_loss_ignores_unlabelled_pixels():
    torch.manual_seed(0)
    target, labelled, box_mask = make_point_inputs()
    has = torch.tensor([True, True])
    m = torch.rand(2, 32, 32)
    k_pix = labelled.repeat_interleave(4, 1).repeat_interleave(4, 2)
    m2 = torch.where(k_pix, m, torch.rand(2, 32, 32))
    l1 = point_loss(m, target, labelled, has, box_mask, reduction="none")
    l2 = point_loss(m2, target, labelled, has, box_mask, reduction="none")
    assert torch.allclose(l1, l2)
    # Changing a labelled patch does change it.
    m3 = m.clone()
    m3[:, 8:12, 16:20] = 1.0 - m3[:, 8:12, 16:20]
    assert not torch.allclose(l1, point_loss(m3, target, labelled, has, box_mask, reduction="none"))
    # Perfect on the labelled cells = 0, whatever happens elsewhere.
    perfect = torch.where(k_pix, target.repeat_interleave(4, 1).repeat_interleave(4, 2), torch.rand(2, 32, 32))
    assert point_loss(perfect, target, labelled, has, box_mask).item() < 1e-6


def test_point_loss_adds_mil_only_without_retrieved_points():
    torch.manual_seed(0)
    target, labelled, box_mask = make_point_inputs()
    m = torch.rand(2, 32, 32)
    both = point_loss(m, target, labelled, torch.tensor([True, True]), box_mask, lambda_mil=0.7, reduction="none")
    mixed = point_loss(m, target, labelled, torch.tensor([True, False]), box_mask, lambda_mil=0.7, reduction="none")
    mil = mil_loss(m, box_mask, reduction="none")
    assert torch.isclose(mixed[0], both[0])
    assert torch.isclose(mixed[1], both[1] + 0.7 * mil[1])
    # Grid-resolution box mask: MIL on the downsampled mask.
    box_grid = downsample_to_grid(box_mask, 8)
    grid = point_loss(m, target, labelled, torch.tensor([False, False]), box_grid, reduction="none")
    expected = both + mil_loss(downsample_to_grid(m, 8), box_grid, reduction="none")
    assert torch.allclose(grid, expected)
    with pytest.raises(ValueError):
        point_loss(m, target, labelled, torch.tensor([True, False]), None)
    # No box needed when every object has points.
    assert torch.isclose(point_loss(m, target, labelled, torch.tensor([True, True]), None), both.mean())


def test_point_loss_still_uses_seeds_and_background_when_nothing_retrieved():
    target, labelled, box_mask = make_point_inputs(b=1)
    no = torch.tensor([False])
    # Prediction = the box: MIL is 0, seeds are foreground, BG patches background: loss 0.
    assert point_loss(box_mask, target, labelled, no, box_mask).item() < 1e-6
    # Prediction = everything: MIL and the BG cells both complain.
    full = torch.ones(1, 32, 32)
    assert point_loss(full, target, labelled, no, box_mask).item() > 0.5


def test_point_loss_gradient_only_on_labelled_patches():
    target, labelled, box_mask = make_point_inputs(b=1)
    m = torch.full((1, 32, 32), 0.5, requires_grad=True)
    point_loss(m, target, labelled, torch.tensor([True]), box_mask).backward()
    k_pix = labelled.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert (m.grad[~k_pix] == 0).all()
    fg_pix = target.bool().repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert (m.grad[fg_pix] < 0).all() and (m.grad[k_pix & ~fg_pix] > 0).all()


# ---------------------------------------------------------------- CRF loss


def test_crf_loss_has_no_gradient_through_the_target():
    from exits.crf.synthetic import make_disk_scene

    scene = make_disk_scene(32)
    image = scene.image[None]
    student_logit = torch.logit(scene.prob[None]).clone().requires_grad_(True)
    teacher = scene.mask[None, None].float().requires_grad_(True)
    student = torch.sigmoid(student_logit)
    loss = crf_loss(student, teacher, image, iters=3)
    loss.backward()
    assert teacher.grad is None
    # Same gradient as a Dice against the constant target.
    target = crf_target(student.detach(), teacher.detach(), image, iters=3)
    assert not target.requires_grad
    logit2 = student_logit.detach().clone().requires_grad_(True)
    dice_loss(torch.sigmoid(logit2), target).backward()
    assert torch.allclose(student_logit.grad, logit2.grad, atol=1e-7)
    assert student_logit.grad.abs().sum() > 0


def test_crf_loss_values_and_impls():
    from exits.crf.synthetic import make_disk_scene

    scene = make_disk_scene(32)
    image, truth = scene.image[None], scene.mask[None, None].float()
    good = 0.02 + 0.96 * truth
    # Student and teacher agree with the image: the CRF keeps the mask, loss near 0.
    for impl in ("meanfield", "dense"):
        assert crf_loss(good, good, image, impl=impl).item() < 0.01
        per = crf_loss(scene.prob[None].repeat(2, 1, 1, 1), scene.prob[None].repeat(2, 1, 1, 1),
                       image.repeat(2, 1, 1, 1), impl=impl, reduction="none")
        assert per.shape == (2,) and (per > 0.05).all()
