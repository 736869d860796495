"""Initial seed sets of EXITS point retrieval on the ViT patch grid.

Coordinate convention (crop pixels, y grows downward, continuous positions):
  * The crop is ``crop_size`` x ``crop_size`` pixels split into an N x N grid of square
    patches of side p = crop_size / N. Patch (r, c) covers x in [c p, (c+1) p) and
    y in [r p, (r+1) p); its flattened index is r * N + c (row-major, as a ViT's tokens).
  * A point [x, y] lies in patch (floor(y / p), floor(x / p)), clamped to the grid.
    (An integer pixel index x covers [x, x+1), which lies in the same patch when p is an
    integer.)
  * The box (x0, y0, x1, y1) is in pixel-edge coordinates with x1, y1 exclusive; for
    extreme points given as pixel indices that is x0 = x_left, x1 = x_right + 1 (as
    ``exits.data.extreme_points.box_from_extreme_points``).

Seed sets (paper: P_FG, P_BG, P_Box):
  * P_FG: patches holding the four extreme points moved inwards by delta pixels:
    top (x_t, y_t + d), left (x_l + d, y_l), bottom (x_b, y_b - d), right (x_r - d, y_r).
    A move never crosses the box's centre line (d is cut to reach at most the centre), so
    a delta larger than a thin object cannot push a seed past the object's far side.
  * P_BG: patches with no overlap with the box (zero-area contact, i.e. sharing an edge,
    is no overlap).
  * P_Box: patches overlapping the box, minus P_FG; these get pseudo labels.
  * Extra BG seeds (optional, ``extra_bg``): patches known to be background from elsewhere
    than the box, e.g. the FG seeds of the other objects of the same image (visible masks
    do not overlap, so another object's interior is not this object). They join P_BG and
    leave P_Box (they are seeds, not retrieval candidates); FG seeds win a conflict. With
    ``extra_bg_only_if_empty`` they are used only for objects whose box leaves no patch
    outside it (a box filling the clipped crop: an object spanning the image), which
    otherwise have no BG seed, no valid retrieval and train on MIL alone.
  The three masks are disjoint; without extra BG seeds P_FG and P_Box together are the
  complement of P_BG.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TOP, LEFT, BOTTOM, RIGHT = 0, 1, 2, 3


@dataclass(frozen=True)
class SeedMasks:
    """Seed sets over the flattened N*N patch grid, each (B, N*N) bool.

    ``fg_points`` (B, 4, 2) are the moved-in extreme points [x, y] that define ``fg``.
    """

    fg: Tensor
    bg: Tensor
    box: Tensor
    fg_points: Tensor

    def to(self, device: torch.device | str) -> "SeedMasks":
        return SeedMasks(*(t.to(device) for t in (self.fg, self.bg, self.box, self.fg_points)))


def move_points_inwards(points: Tensor, box: Tensor, delta: float) -> Tensor:
    """Extreme points moved delta pixels towards the object, (B, 4, 2) -> (B, 4, 2).

    top y + d, left x + d, bottom y - d, right x - d, each stopped at the box centre line
    (cx = (x0 + x1) / 2, cy = (y0 + y1) / 2) if it would cross it.
    """
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    p = points.clone()
    cx = 0.5 * (box[:, 0] + box[:, 2])
    cy = 0.5 * (box[:, 1] + box[:, 3])
    # max(centre, start) keeps a point that already lies past the centre where it is.
    p[:, TOP, 1] = torch.minimum(p[:, TOP, 1] + delta, torch.maximum(cy, p[:, TOP, 1]))
    p[:, LEFT, 0] = torch.minimum(p[:, LEFT, 0] + delta, torch.maximum(cx, p[:, LEFT, 0]))
    p[:, BOTTOM, 1] = torch.maximum(p[:, BOTTOM, 1] - delta, torch.minimum(cy, p[:, BOTTOM, 1]))
    p[:, RIGHT, 0] = torch.maximum(p[:, RIGHT, 0] - delta, torch.minimum(cx, p[:, RIGHT, 0]))
    return p


def patch_index_of_points(points: Tensor, crop_size: int, grid: int) -> Tensor:
    """Flattened patch index r * N + c of each point, (..., 2) [x, y] -> (...) long."""
    p = crop_size / grid
    col = torch.floor(points[..., 0] / p).long().clamp(0, grid - 1)
    row = torch.floor(points[..., 1] / p).long().clamp(0, grid - 1)
    return row * grid + col


def box_overlap_mask(box: Tensor, crop_size: int, grid: int) -> Tensor:
    """Patches whose area overlaps the box, (B, 4) -> (B, N*N) bool.

    Patch column c overlaps [x0, x1) iff c p < x1 and (c + 1) p > x0 (positive-length
    intersection); likewise for rows.
    """
    p = crop_size / grid
    edges = torch.arange(grid, device=box.device, dtype=box.dtype) * p  # left/top edges
    cols = (edges < box[:, 2:3]) & (edges + p > box[:, 0:1])  # (B, N)
    rows = (edges < box[:, 3:4]) & (edges + p > box[:, 1:2])  # (B, N)
    return (rows.unsqueeze(-1) & cols.unsqueeze(-2)).flatten(1)


def seed_masks(points: Tensor, box: Tensor, crop_size: int, grid: int, delta: float,
               extra_bg: Tensor | None = None, extra_bg_only_if_empty: bool = True) -> SeedMasks:
    """P_FG, P_BG and P_Box of B objects on the N x N patch grid (see module docstring).

    Args:
        points: (B, 4, 2) float extreme points [x, y] in crop pixels, rows top, left,
            bottom, right.
        box: (B, 4) extreme-point box x0, y0, x1, y1 in crop pixels (x1, y1 exclusive).
        crop_size: side of the square crop in pixels.
        grid: N, patches per side.
        delta: inward move of the extreme points, pixels.
        extra_bg: optional (B, N*N) bool, more BG seeds (see module docstring).
        extra_bg_only_if_empty: use ``extra_bg`` only in rows whose P_BG is otherwise empty.
    Returns:
        SeedMasks with fg, bg, box each (B, N*N) bool, on the device of ``points``.
    """
    if points.dim() != 3 or points.shape[1:] != (4, 2):
        raise ValueError(f"points must be (B, 4, 2), got {tuple(points.shape)}")
    if box.shape != (points.shape[0], 4):
        raise ValueError(f"box must be (B, 4) with B={points.shape[0]}, got {tuple(box.shape)}")
    points = points.float() if not torch.is_floating_point(points) else points
    box = box.to(device=points.device, dtype=points.dtype)
    inner = move_points_inwards(points, box, delta)
    idx = patch_index_of_points(inner, crop_size, grid)  # (B, 4)
    B, n = points.shape[0], grid * grid
    fg = torch.zeros(B, n, dtype=torch.bool, device=points.device)
    fg.scatter_(1, idx, True)
    overlap = box_overlap_mask(box, crop_size, grid)
    # A point outside its own box (inconsistent input) must not be both FG and BG seed.
    bg = ~overlap & ~fg
    in_box = overlap & ~fg
    if extra_bg is not None:
        if extra_bg.shape != (B, n):
            raise ValueError(f"extra_bg must be (B, N*N) = {(B, n)}, got {tuple(extra_bg.shape)}")
        extra = extra_bg.to(device=points.device, dtype=torch.bool) & ~fg
        if extra_bg_only_if_empty:
            extra = extra & ~bg.any(dim=1, keepdim=True)
        bg = bg | extra
        in_box = in_box & ~extra
    return SeedMasks(fg=fg, bg=bg, box=in_box, fg_points=inner)
