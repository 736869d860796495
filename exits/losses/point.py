"""EXITS point loss: Dice on the N x N patch grid, restricted to labelled points.

Grid convention: ``target[b, y, x]`` / ``labelled[b, y, x]`` index patch row y (downward)
and column x, the same cells the ViT's N x N patches cover.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from exits.losses.dice import dice_loss, reduce_loss
from exits.losses.mil import as_bhw, mil_loss


def downsample_to_grid(mask_prob: torch.Tensor, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """M~ = adaptive average pooling of M onto the patch grid.

    M~[b, r, c] = mean of M over the pixels of patch cell (r, c): (B, H, W) -> (B, N, N).

    Why average pooling: a (pseudo) point label is the label of a whole patch, and the
    mean is the fraction of that patch predicted as foreground. Every pixel of a labelled
    patch gets gradient, so no pixel inside a labelled patch can drift unsupervised (with
    nearest or bilinear sampling only one or four pixels per cell would be seen). When
    H, W are multiples of N the cells are exactly the ViT's patches.
    """
    m = as_bhw(mask_prob, "mask_prob")
    size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if tuple(m.shape[-2:]) == size:
        return m
    return F.adaptive_avg_pool2d(m[:, None], size)[:, 0]


def point_loss(
    mask_prob: torch.Tensor,
    target: torch.Tensor,
    labelled: torch.Tensor,
    has_retrieved: torch.Tensor,
    box_mask: torch.Tensor | None = None,
    lambda_mil: float = 1.0,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Point loss of EXITS (eq. 10).

    L_point = Dice(M~ ⊙ K, Y^) + 1[|P^_FG ∪ P^_BG| = 0] · λ_mil · L_mil(M, Y_box)

    Y^ (``target``) is 1 on P_FG ∪ P^_FG (the 4 extreme-point seeds moved inwards and the
    retrieved foreground points) and 0 elsewhere; K (``labelled``) is 1 on
    P_FG ∪ P^_FG ∪ P_BG ∪ P^_BG. K always holds the seeds and P_BG (patches outside the
    box), also for objects where retrieval found nothing: the caller builds K that way,
    this function never drops them. Y^ is multiplied by K, so a target outside K is
    ignored rather than made unreachable.

    Args:
        mask_prob: (B, H, W) or (B, 1, H, W) predicted foreground probability M.
        target: (B, N, N) {0, 1} sparse point mask Y^.
        labelled: (B, N, N) bool (or {0, 1}) K.
        has_retrieved: (B,) bool, True when retrieval (after point dropout) kept at least
            one pseudo point for the object; False switches the MIL term on.
        box_mask: (B, H, W) / (B, 1, H, W) box region at mask resolution (MIL on M), or
            (B, N, N) on the grid (MIL on M~). May be None only if every object has
            retrieved points.
        lambda_mil: λ_mil, weight of the fallback MIL term.
        eps: Dice smoothing.
        reduction: ``"none"`` -> (B,), ``"mean"`` / ``"sum"`` -> scalar.
    Returns:
        (B,) per-object losses or their reduction.
    """
    if target.dim() != 3 or labelled.shape != target.shape:
        raise ValueError(f"target/labelled must both be (B, N, N), got {tuple(target.shape)}, {tuple(labelled.shape)}")
    m = as_bhw(mask_prob, "mask_prob")
    m_grid = downsample_to_grid(m, tuple(target.shape[-2:]))
    k = labelled.to(m.dtype)
    y_hat = target.to(m.dtype) * k
    loss = dice_loss(m_grid * k, y_hat, eps=eps, reduction="none")

    no_points = ~has_retrieved.to(torch.bool).reshape(-1)
    if no_points.shape[0] != m.shape[0]:
        raise ValueError(f"has_retrieved must be (B,) with B={m.shape[0]}, got {tuple(has_retrieved.shape)}")
    if box_mask is None:
        if bool(no_points.any()):
            raise ValueError("box_mask is required when some object has no retrieved points")
        return reduce_loss(loss, reduction)
    # MIL is computed for every object and masked, not gathered: no host sync on CUDA.
    box = as_bhw(box_mask, "box_mask")
    if box.shape == m.shape:
        mil = mil_loss(m, box, eps=eps, reduction="none")
    elif box.shape == m_grid.shape:
        mil = mil_loss(m_grid, box, eps=eps, reduction="none")
    else:
        raise ValueError(f"box_mask {tuple(box.shape)} matches neither M {tuple(m.shape)} nor the grid {tuple(m_grid.shape)}")
    loss = loss + lambda_mil * no_points.to(device=m.device, dtype=m.dtype) * mil
    return reduce_loss(loss, reduction)
