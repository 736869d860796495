"""Prototypes of the current mask: superpixel-guided clustering (SGC) and guided prototype
allocation (GPA), after ASGNet (Sec. 3.1-3.2), applied to the object's own mask.

SGC. The masked features F' (N_m, D) (L2-normalised) with their cell coordinates p are
clustered around k seeds. Seeds follow MaskSLIC: repeatedly take the cell of the mask
farthest from the mask boundary (distance transform), then mark it as outside so the
next seed lands elsewhere. With

    D(p, i)^2 = |F'_p - S_i|^2 + |p - c_i|^2 / r^2,      r = sqrt(N_m / k)   (SLIC's step)

each iteration computes Q_pi = exp(-D(p, i)^2) and S_i = sum_p Q_pi F'_p / sum_p Q_pi
(and the centres c_i likewise). k = clamp(ceil(N_m / cells_per_prototype), 1, max_k), so
large objects get more prototypes (ASGNet's adaptive count). A batch is clustered at once
(cells outside a sample's mask get Q = 0, missing prototypes are masked): one op sequence
per batch instead of per object, which matters on a busy 2-core CPU.

GPA. For every pixel feature f (of the whole crop) the cosine similarity to each
prototype C_i = cos(f, S_i); the guide feature is the most similar prototype
G = S_{argmax_i C_i} and the probability map P = mean_i C_i (ASGNet sums; the mean keeps
the scale independent of the adaptive k). Refined features: X + W [X, G_fg, P_fg, G_bg, P_bg]
(1x1 convolution W), with prototypes of the foreground and of the background.

Background cells without background labels (:func:`border_background`). Before any negative
click or previous mask the decoder knows no background pixel; the crop is the extreme-point
box plus a margin, so its border is background -- except on a side where the crop window is
clipped by the image edge: an object touching the image's left edge has its crop start at
x = 0 and the crop's left border runs through the object. The border cells of such sides are
left out (the window's position and the image size decide, :func:`image_edge_sides`); when
every side is at the image edge, the cells entirely outside the extreme-point box are the
background; without a box, none (no background prototype rather than a wrong one).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = ["maskslic_seeds", "sgc_prototypes", "prototype_count", "gpa", "PrototypeGuidance", "image_edge_sides",
           "border_background"]


def image_edge_sides(x0: int, y0: int, width: int, height: int, *, image_width: int, image_height: int
                     ) -> tuple[bool, bool, bool, bool]:
    """Which sides (left, top, right, bottom) of the crop window (x0, y0, width, height) lie
    on the edge of an image_width x image_height image (the window was clipped there)."""
    return (int(x0) <= 0, int(y0) <= 0, int(x0) + int(width) >= int(image_width),
            int(y0) + int(height) >= int(image_height))


def border_background(grid: tuple[int, int], regions: np.ndarray, crop_size: float, at_edge: np.ndarray | None = None,
                      boxes: np.ndarray | None = None) -> np.ndarray:
    """(B, h, w) bool: the cells of each region's h x w token grid taken as background when
    nothing else says where the background is (module docstring).

    Args:
        grid: (h, w) cells of the region.
        regions: (B, 4) [x0, y0, x1, y1] the decoded region in crop pixel-edge coordinates
            (the whole crop [0, 0, S, S], or a zoom RoI).
        crop_size: S.
        at_edge: (B, 4) bool crop sides (left, top, right, bottom) on the image edge
            (:func:`image_edge_sides`); None: none is.
        boxes: (B, 4) the extreme-point box in crop pixel-edge coordinates, or None.
    Rule: the border cells of every region side, except a side lying on a crop side that is on
    the image edge (a zoom RoI's inner sides are borders of the grown foreground, background);
    with every side left out, the cells entirely outside the box; with no box, none.
    """
    h, w = grid
    regions = np.asarray(regions, np.float64).reshape(-1, 4)
    b = len(regions)
    edge = np.zeros((b, 4), bool) if at_edge is None else np.asarray(at_edge, bool).reshape(b, 4)
    tol = 1e-3 * float(crop_size)
    on_crop_side = np.stack([regions[:, 0] <= tol, regions[:, 1] <= tol, regions[:, 2] >= crop_size - tol,
                             regions[:, 3] >= crop_size - tol], axis=1)
    usable = ~(on_crop_side & edge)  # (B, 4)
    out = np.zeros((b, h, w), bool)
    for i in range(b):
        left, top, right, bottom = usable[i]
        if left:
            out[i, :, 0] = True
        if top:
            out[i, 0, :] = True
        if right:
            out[i, :, -1] = True
        if bottom:
            out[i, -1, :] = True
        if usable[i].any() or boxes is None:
            continue
        x0, y0, x1, y1 = regions[i]
        bx0, by0, bx1, by1 = np.asarray(boxes, np.float64).reshape(b, 4)[i]
        xs = x0 + (x1 - x0) * np.arange(w + 1) / w  # cell edges
        ys = y0 + (y1 - y0) * np.arange(h + 1) / h
        out_x = (xs[1:] <= bx0) | (xs[:-1] >= bx1)
        out_y = (ys[1:] <= by0) | (ys[:-1] >= by1)
        out[i] = out_y[:, None] | out_x[None, :]
    return out


def prototype_count(cells: int, cells_per_prototype: int, max_prototypes: int) -> int:
    """k = clamp(ceil(cells / cells_per_prototype), 1, max_prototypes)."""
    return int(min(max_prototypes, max(1, math.ceil(cells / cells_per_prototype))))


def maskslic_seeds(mask: np.ndarray, k: int) -> np.ndarray:
    """(k', 2) [row, col] seed cells (k' <= k, fewer only when the mask has fewer cells).

    One distance transform: marking a seed as outside adds one background cell p, so the
    new transform is min(D, |x - p|), the same values as recomputing it (tested)."""
    mask = np.asarray(mask, bool)
    seeds = []
    n = min(k, int(mask.sum()))
    if n == 0:
        return np.zeros((0, 2), np.int64)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rows, cols = np.indices(mask.shape)
    for _ in range(n):
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        seeds.append((r, c))
        dist = np.minimum(dist, np.sqrt((rows - r) ** 2 + (cols - c) ** 2))
    return np.asarray(seeds, dtype=np.int64).reshape(-1, 2)


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_p - b_i|^2 (B, P, I) by expansion (cdist stalls on busy 2-core machines for tiny inputs)."""
    return ((a * a).sum(-1, keepdim=True) + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)).clamp_min(0)


def sgc_prototypes(tokens: torch.Tensor, grid: tuple[int, int], masks: np.ndarray, cells_per_prototype: int,
                   max_prototypes: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched SGC.

    Args:
        tokens: (B, h*w, D) features; grid: (h, w); masks: (B, h, w) bool cells to cluster.
    Returns:
        prototypes (B, k_max, D) and their validity (B, k_max) bool (no valid one for an
        empty mask).
    """
    b, n, d = tokens.shape
    h, w = grid
    masks = np.asarray(masks, bool).reshape(b, h, w)
    seeds = [maskslic_seeds(m, prototype_count(int(m.sum()), cells_per_prototype, max_prototypes)) for m in masks]
    k_max = max(1, max(len(s) for s in seeds))
    valid = torch.zeros((b, k_max), dtype=torch.bool, device=tokens.device)
    seed_idx = torch.zeros((b, k_max), dtype=torch.long)
    for i, s in enumerate(seeds):
        valid[i, :len(s)] = True
        seed_idx[i, :len(s)] = torch.as_tensor(s[:, 0] * w + s[:, 1], dtype=torch.long)
    seed_idx = seed_idx.to(tokens.device)
    feats = F.normalize(tokens, dim=-1, eps=1e-6)
    rows, cols = torch.meshgrid(torch.arange(h, device=tokens.device), torch.arange(w, device=tokens.device), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).to(tokens.dtype)[None].expand(b, -1, -1)
    member = torch.as_tensor(masks.reshape(b, n), device=tokens.device).to(tokens.dtype)
    gather = lambda t: torch.gather(t, 1, seed_idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    protos, centres = gather(feats), gather(coords)
    counts = torch.as_tensor([max(1, len(s)) for s in seeds], dtype=tokens.dtype, device=tokens.device)
    radius2 = (member.sum(1) / counts).clamp_min(1.0)[:, None, None]
    for _ in range(iters):
        d2 = _sq_dist(feats, protos) + _sq_dist(coords, centres) / radius2
        q = torch.exp(-d2) * member[..., None]  # (B, L, k)
        weights = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
        protos = weights.transpose(1, 2) @ feats
        centres = weights.transpose(1, 2) @ coords
    return protos * valid[..., None].to(protos.dtype), valid


def gpa(tokens: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Guide features (B, L, D) = most similar valid prototype per pixel, and P (B, L, 1) =
    mean cosine similarity over valid prototypes; zeros for samples without prototypes."""
    sim = F.normalize(tokens, dim=-1, eps=1e-6) @ F.normalize(prototypes, dim=-1, eps=1e-6).transpose(1, 2)
    vmask = valid[:, None, :]
    best = sim.masked_fill(~vmask, -2.0).argmax(dim=-1)
    guide = torch.gather(prototypes, 1, best[..., None].expand(-1, -1, prototypes.shape[-1]))
    count = valid.sum(1).clamp_min(1).to(sim.dtype)[:, None, None]
    prob = (sim * vmask.to(sim.dtype)).sum(-1, keepdim=True) / count
    has = valid.any(1).to(sim.dtype)[:, None, None]
    return guide * has, prob * has


class PrototypeGuidance(nn.Module):
    """X (B, L, D) + W [X, G_fg, P_fg, G_bg, P_bg] with prototypes from F (B, L, D)."""

    def __init__(self, dim: int, max_prototypes: int, cells_per_prototype: int, iters: int) -> None:
        super().__init__()
        self.max_prototypes = max_prototypes
        self.cells_per_prototype = cells_per_prototype
        self.iters = iters
        self.fuse = nn.Linear(3 * dim + 2, dim)

    def forward(self, x: torch.Tensor, feat_tokens: torch.Tensor, grid: tuple[int, int],
                fg_cells: np.ndarray, bg_cells: np.ndarray) -> torch.Tensor:
        """fg_cells, bg_cells: (B, h, w) bool masks on the token grid."""
        b = x.shape[0]
        # fg and bg clustered as one batch of 2B: each prototype's updates read only its own
        # assignment column, so this equals two calls with half the op dispatches.
        protos, valid = sgc_prototypes(torch.cat([feat_tokens, feat_tokens]), grid,
                                       np.concatenate([np.asarray(fg_cells, bool), np.asarray(bg_cells, bool)]),
                                       self.cells_per_prototype, self.max_prototypes, self.iters)
        parts = [x]
        for half in (slice(0, b), slice(b, 2 * b)):
            parts.extend(gpa(feat_tokens, protos[half], valid[half]))
        return x + self.fuse(torch.cat(parts, dim=-1))
