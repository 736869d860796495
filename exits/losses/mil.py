"""Multiple-instance-learning (box projection) loss: EXITS eq. 1, BoxInst's projection term.

Every row and every column crossing the box contains at least one object pixel (the box is
tight), and rows/columns outside the box contain none. Max-projecting the mask onto each
axis turns this into a 1-D segmentation problem with a known answer: the box's extent.
"""
from __future__ import annotations

import torch

from exits.losses.dice import dice_loss, reduce_loss


def as_bhw(x: torch.Tensor, name: str) -> torch.Tensor:
    """Accept (B, H, W) or (B, 1, H, W) masks; return (B, H, W)."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    return x


def mil_loss(
    mask_prob: torch.Tensor,
    box_mask: torch.Tensor,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Box MIL loss.

    L_mil = Dice(Proj_x(M), Proj_x(Y_box)) + Dice(Proj_y(M), Proj_y(Y_box)),
    Proj_x(M)[b, x] = max_y M[b, y, x]  (one value per column, (B, W)),
    Proj_y(M)[b, y] = max_x M[b, y, x]  (one value per row, (B, H)).

    It is 0 when the mask touches every row and column of the box with probability 1 and
    is 0 outside it (any such mask, not only the filled box: the tightness prior), and
    close to 2 for an empty mask.

    Args:
        mask_prob: (B, H, W) or (B, 1, H, W) foreground probabilities in [0, 1].
        box_mask: same shape, {0, 1} box region.
        eps: Dice smoothing (see ``dice_loss``).
        reduction: ``"none"`` -> (B,), ``"mean"`` / ``"sum"`` -> scalar.
    Returns:
        (B,) in [0, 2] or its reduction.
    """
    m = as_bhw(mask_prob, "mask_prob")
    y = as_bhw(box_mask, "box_mask").to(m.dtype)
    if m.shape != y.shape:
        raise ValueError(f"mask_prob {tuple(m.shape)} and box_mask {tuple(y.shape)} differ")
    loss_x = dice_loss(m.amax(dim=1), y.amax(dim=1), eps=eps, reduction="none")
    loss_y = dice_loss(m.amax(dim=2), y.amax(dim=2), eps=eps, reduction="none")
    return reduce_loss(loss_x + loss_y, reduction)
