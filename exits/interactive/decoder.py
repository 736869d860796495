"""The light click decoder: cached ViT tokens + click maps + previous mask -> mask logits.

Per click (features cached, see :mod:`exits.interactive.features`):

  1. F = GELU(GN(W_p tokens))                   tokens (B, h*w, C) -> F (B, D, h, w)
  2. zoom-in (IAM, optional; the grid is also capped at ``max_grid`` cells a side): RoI from the previous mask and all clicks; F, the crop and the
     maps are resampled to the RoI (:mod:`exits.interactive.zoom`)
  3. click embedding E = conv([avgpool(maps), maxpool(maps)]) on the token grid;
     X = F + E  (the "click-involved features"; maps = 2 disk + 5 state channels)
  4. I-MSA blocks (optional): X <- X + I-MSA(X, F) + FFN  (clicks' features as queries
     over P2T-pooled image features)
  5. SPM (optional): X <- X + FFN(X + W[X, F_u(argmax cos)] + W'[X, F_u(argmin cos)])
  6. SGC + GPA (optional): X <- X + W[X, G_fg, P_fg, G_bg, P_bg] with prototypes of the
     current mask's (and background's) features
  7. head: 2x (bilinear + conv) stages up to half resolution, then full resolution fused
     with a low-level branch on [RGB, maps] -> (B, 1, Z, Z) logits, pasted back to S x S.

Switching a part off removes it (and its weights) entirely, so ablations compare models
with the same training budget and nothing else changed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from exits.interactive.attention import InteractiveAttentionBlock
from exits.interactive.clicks import DEFINITE_BG, DEFINITE_FG, NUM_MAP_CHANNELS, POSSIBLE_BG, POSSIBLE_FG
from exits.interactive.config import ClickModelConfig
from exits.interactive.prototypes import PrototypeGuidance
from exits.interactive.spm import SimilarityPropagation, sample_click_vectors
from exits.interactive.zoom import paste_roi_logits, roi_points, roi_resample, zoom_box

__all__ = ["ClickDecoder", "OUTSIDE_LOGIT"]

OUTSIDE_LOGIT = 8.0  # logit standing for "keep the previous mask" outside the zoom RoI


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


def _block(ch_in: int, ch_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch_in, ch_out, k, padding=k // 2, bias=False), _norm(ch_out), nn.GELU())


def _state(maps: torch.Tensor, state: int) -> torch.Tensor:
    return maps[:, 2 + state]


class ClickDecoder(nn.Module):
    """Click-conditioned decoder over cached patch tokens.

    Args:
        config: architecture switches and sizes.
        embed_dim: token width C of the encoder.
    """

    def __init__(self, config: ClickModelConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim
        d = config.dim
        self.proj = nn.Sequential(nn.Conv2d(embed_dim, d, 1, bias=False), _norm(d), nn.GELU())
        self.click_embed = nn.Sequential(_block(2 * NUM_MAP_CHANNELS, d), nn.Conv2d(d, d, 1))
        self.imsa = nn.ModuleList(
            InteractiveAttentionBlock(d, config.heads, config.pool_sizes) for _ in range(config.imsa_depth)
        ) if config.use_imsa else None
        self.spm = SimilarityPropagation(d) if config.use_spm else None
        self.prototypes = PrototypeGuidance(d, config.max_prototypes, config.cells_per_prototype, config.sgc_iters) \
            if config.use_prototypes else None
        self.up1 = _block(d, d // 2)
        self.up2 = _block(d // 2, max(16, d // 4))
        self.low = _block(3 + NUM_MAP_CHANNELS, 8)
        self.fuse = nn.Sequential(nn.Conv2d(max(16, d // 4) + 8, 8, 1), nn.GELU(), nn.Conv2d(8, 1, 3, padding=1))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    def zoom_boxes(self, maps: torch.Tensor, clicks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, 4) RoIs; the whole crop for samples without a previous mask or with zoom off."""
        b, _, s, _ = maps.shape
        full = torch.tensor([0.0, 0.0, float(s), float(s)], device=maps.device).expand(b, 4).clone()
        if not self.config.use_zoom:
            return full
        has_prior = (_state(maps, POSSIBLE_FG) + _state(maps, POSSIBLE_BG)).flatten(1).amax(1) > 0
        prev_fg = ((_state(maps, POSSIBLE_FG) + _state(maps, DEFINITE_FG)) > 0.5).cpu().numpy()
        pts, ok = clicks[..., :2].detach().cpu().numpy(), valid.cpu().numpy()
        for i in range(b):
            if bool(has_prior[i]):
                box = zoom_box(prev_fg[i], pts[i][ok[i]], s, self.config.zoom_expand, self.config.zoom_min_fraction)
                full[i] = torch.as_tensor(box, dtype=full.dtype)
        return full

    def grid_cells(self, maps: torch.Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(B, h, w) fg and bg cells of the current mask/clicks for the prototypes.

        fg: cells at least half DEFINITE/POSSIBLE_FG or touched by a positive disk; bg likewise;
        with no background information the crop's border cells (the crop is the
        extreme-point box plus a margin, so its border is background).
        """
        pool = lambda t: F.adaptive_avg_pool2d(t[:, None], grid)[:, 0]  # noqa: E731
        touch = lambda t: F.adaptive_max_pool2d(t[:, None], grid)[:, 0] > 0  # noqa: E731
        fg = (pool(_state(maps, DEFINITE_FG) + _state(maps, POSSIBLE_FG)) >= 0.5) | touch(maps[:, 0])
        bg = (pool(_state(maps, DEFINITE_BG) + _state(maps, POSSIBLE_BG)) >= 0.5) | touch(maps[:, 1])
        border = torch.ones(grid, dtype=torch.bool, device=maps.device)
        border[1:-1, 1:-1] = False
        bg = torch.where(bg.flatten(1).any(1)[:, None, None], bg, border[None])
        return fg.cpu().numpy(), bg.cpu().numpy()

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], image: torch.Tensor, maps: torch.Tensor,
                clicks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mask logits for the crop.

        Args:
            tokens: (B, h*w, C) cached patch tokens of the S x S crop.
            grid: (h, w) token grid.
            image: (B, 3, S, S) crop in [0, 1].
            maps: (B, 7, S, S) from :func:`exits.interactive.clicks.encode_click_maps`.
            clicks: (B, K, 3) [u, v, +-1] in crop pixel coords; valid: (B, K) bool.
        Returns:
            (B, 1, S, S) logits.
        """
        b, n, c = tokens.shape
        h, w = grid
        s = image.shape[-1]
        if n != h * w or c != self.embed_dim:
            raise ValueError(f"tokens {tuple(tokens.shape)} do not fit grid {grid} x {self.embed_dim}")
        z = min(s, self.config.decode_size)
        feat = self.proj(tokens.transpose(1, 2).reshape(b, c, h, w))
        boxes = self.zoom_boxes(maps, clicks, valid)
        h, w = grid = (min(h, self.config.max_grid), min(w, self.config.max_grid))
        feat = roi_resample(feat, boxes, s, grid)
        image_z = roi_resample(image, boxes, s, (z, z)) if z != s or self.config.use_zoom else image
        maps_z = roi_resample(maps, boxes, s, (z, z)) if z != s or self.config.use_zoom else maps
        clicks_z = roi_points(clicks[..., :2], boxes, z)

        x = feat + self.click_embed(torch.cat([F.adaptive_avg_pool2d(maps_z, grid),
                                               F.adaptive_max_pool2d(maps_z, grid)], dim=1))
        x = x.flatten(2).transpose(1, 2)  # (B, L, D)
        feat_tokens = feat.flatten(2).transpose(1, 2)
        if self.imsa is not None:
            for block in self.imsa:
                x = block(x, feat)
        if self.spm is not None:
            x_grid = x.transpose(1, 2).reshape(b, -1, h, w)
            x = self.spm(x, sample_click_vectors(x_grid, clicks_z, (z, z)), valid)
        if self.prototypes is not None:
            fg, bg = self.grid_cells(maps_z, grid)
            x = self.prototypes(x, feat_tokens, grid, fg, bg)
        x = x.transpose(1, 2).reshape(b, -1, h, w)

        half = (max(1, z // 2), max(1, z // 2))
        x = self.up1(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = self.up2(F.interpolate(x, size=half, mode="bilinear", align_corners=False))
        x = F.interpolate(x, size=(z, z), mode="bilinear", align_corners=False)
        low = self.low(torch.cat([(image_z - self.pixel_mean) / self.pixel_std, maps_z], dim=1))
        logits = self.fuse(torch.cat([x, low], dim=1))
        if not self.config.use_zoom and z == s:
            return logits
        prev_fg = (_state(maps, POSSIBLE_FG) + _state(maps, DEFINITE_FG)) > 0.5
        outside = torch.where(prev_fg, OUTSIDE_LOGIT, -OUTSIDE_LOGIT)[:, None].to(logits.dtype)
        return paste_roi_logits(logits, boxes, s, outside)
