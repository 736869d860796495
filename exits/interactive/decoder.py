"""The light click decoder: cached ViT tokens + click maps + previous mask -> mask logits.

One decoder *pass* over a region R of the S x S crop (the whole crop, or a zoom RoI),
decoded at Z x Z pixels (features cached, see :mod:`exits.interactive.features`):

  1. F = GELU(GN(W_p tokens))  (B, D, h, w), resampled to R on a grid of min(``max_grid``,
     Z / 8) cells a side
  2. click embedding E = conv([avgpool(maps_R), maxpool(maps_R)]) on the token grid;
     X = F + E  (the "click-involved features"; maps = 2 disk + 5 state + previous mask)
  3. I-MSA blocks (optional): X <- X + I-MSA(X, F) + FFN  (InterFormer)
  4. SPM (optional): max/min cosine-similarity click vectors (similarity-constrained net)
  5. SGC + GPA (optional): prototypes of the current mask's / background's features (ASGNet);
     with no background label yet, the region's border cells, except crop sides on the image
     edge (:func:`exits.interactive.prototypes.border_background`; the object's ``at_edge``
     and ``object_box`` come with :class:`StaticInputs`)
  6. FDM (optional): click-conditioned non-local feature diffusion (CDNet)
  7. head: 2x (bilinear + conv) up to Z/2, then Z fused with a low-level branch on
     [RGB, maps_R] -> (B, 1, Z, Z) logits (:meth:`ClickDecoder._head_logits`); latent heads (CDNet diversified training) read
     the same features, in training only
  8. PDM (optional): colour-affinity pixel diffusion of the logits (CDNet)

Forward (IAM, similarity-constrained net Sec. 2.3 after IA-FPN): a *coarse* pass on the
whole crop at Z_c = min(S, ``coarse_size``); with ``use_zoom`` the RoI is the box of the
coarse foreground (p > 0.5) and of all clicks, grown by ``zoom_expand``
(:func:`exits.interactive.zoom.zoom_box`); a *refinement* pass of the same network on the
RoI at Z = min(S, ``decode_size``), whose previous-mask channel is the coarse probability
(the fine network edits the coarse result); its logits replace the coarse logits inside
the RoI (:func:`exits.interactive.zoom.paste_roi_logits`). Outside the RoI the coarse
logits stay, so a click can add an object part the previous mask did not cover (the
separated parts this project exists for). Training: loss on the coarse pass over the whole
crop + loss on the refinement restricted to the RoI (in RoI coordinates), see
:mod:`exits.interactive.train`.

Switching a part off removes it (and its weights) entirely, so ablations compare models
with the same training budget and nothing else changed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from exits.interactive.attention import InteractiveAttentionBlock
from exits.interactive.clicks import DEFINITE_BG, DEFINITE_FG, NUM_MAP_CHANNELS, POSSIBLE_BG, POSSIBLE_FG, PREV_CHANNEL
from exits.interactive.config import ClickModelConfig
from exits.interactive.diffusion import FeatureDiffusion, PixelDiffusion
from exits.interactive.prototypes import PrototypeGuidance, border_background
from exits.interactive.spm import SimilarityPropagation, sample_click_vectors
from exits.interactive.zoom import paste_roi_logits, roi_points, roi_resample, zoom_box

__all__ = ["ClickDecoder", "DecoderOutput", "PassOutput", "StaticInputs"]


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


def _block(ch_in: int, ch_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch_in, ch_out, k, padding=k // 2, bias=False), _norm(ch_out), nn.GELU())


def _state(maps: torch.Tensor, state: int) -> torch.Tensor:
    return maps[:, 2 + state]


@dataclass
class PassOutput:
    """One decoder pass: logits (B, 1, Z, Z) of the region ``boxes`` (B, 4) in crop pixel-edge
    coords; ``features`` (B, C, Z/2, Z/2) the head's last features (PEM reads them);
    ``latent`` (B, N, Z, Z) latent-head logits (training only, else None); ``disks``
    (B, 2, Z, Z) the click disks resampled to the region."""

    logits: torch.Tensor
    boxes: torch.Tensor
    features: torch.Tensor
    latent: torch.Tensor | None
    disks: torch.Tensor


@dataclass
class StaticInputs:
    """What the decoder derives from an object's tokens and crop alone, without its clicks:
    ``feat`` (B, D, h, w) the projected tokens, ``image_coarse`` (B, 3, Z_c, Z_c) the crop
    at the coarse pass's size and ``coarse_pdm`` PDM's colour affinities of it (None without
    PDM). The predictor keeps it per object with the cached features (at 512 px ~6 of ~40
    ms per click: the projection of 64 x 64 tokens, the crop's antialiased resize and 3
    affinity maps). ``at_edge`` (B, 4) bool: which crop sides (left, top, right, bottom) lie
    on the image edge (:func:`exits.interactive.prototypes.image_edge_sides` of the crop
    window and the image size; None: none does); ``object_box`` (B, 4) float the
    extreme-point box in crop pixel-edge coordinates, or None. Both only choose the
    background cells of the prototypes before any background label
    (:func:`exits.interactive.prototypes.border_background`)."""

    feat: torch.Tensor
    image_coarse: torch.Tensor
    coarse_pdm: dict[int, torch.Tensor] | None = None
    at_edge: torch.Tensor | None = None
    object_box: torch.Tensor | None = None


@dataclass
class DecoderOutput:
    """logits (B, 1, M, M) the final crop logits in the map frame (M = S for small crops);
    ``coarse`` the whole-crop pass; ``refine`` the zoomed pass (None with zoom off)."""

    logits: torch.Tensor
    coarse: PassOutput
    refine: PassOutput | None


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
        self.fdm = FeatureDiffusion(d) if config.use_fdm else None
        c2 = max(16, d // 4)
        self.head_channels = c2
        self.up1 = _block(d, d // 2)
        self.up2 = _block(d // 2, c2)
        self.low = _block(3 + NUM_MAP_CHANNELS, 8)
        self.fuse = nn.Sequential(nn.Conv2d(c2 + 8, 8, 1), nn.GELU(), nn.Conv2d(8, 1, 3, padding=1))
        self.latent_heads = nn.ModuleList(self._latent_head(i) for i in range(config.latent_heads)) \
            if config.latent_heads else None
        self.pdm = PixelDiffusion(config.pdm_iterations) if config.use_pdm else None
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    def _latent_head(self, i: int) -> nn.Module:
        """A copy of the main head with its own initialisation (CDNet: same structure,
        different initialisation methods), cycling through four schemes."""
        head = copy.deepcopy(self.fuse)
        inits = (nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.orthogonal_, nn.init.xavier_normal_)
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                inits[i % len(inits)](m.weight)
                nn.init.zeros_(m.bias)
        return head

    def grid_cells(self, maps: torch.Tensor, grid: tuple[int, int], regions: torch.Tensor | None = None,
                   crop_size: float | None = None, at_edge: torch.Tensor | None = None,
                   object_box: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, h, w) fg and bg cells of the current mask/clicks for the prototypes.

        fg: cells at least half DEFINITE/POSSIBLE_FG or touched by a positive disk; bg likewise;
        with no background information the region's border cells (the crop is the
        extreme-point box plus a margin, so its border is background), except on crop sides
        at the image edge (``at_edge``), where the crop window was clipped and its border can
        run through the object; with every side there, the cells outside ``object_box``
        (:func:`exits.interactive.prototypes.border_background`). ``regions`` (B, 4) the
        pass's regions in crop pixel-edge coordinates (None: the whole crop, ``crop_size``).
        """
        pool = lambda t: F.adaptive_avg_pool2d(t[:, None], grid)[:, 0]  # noqa: E731
        touch = lambda t: F.adaptive_max_pool2d(t[:, None], grid)[:, 0] > 0  # noqa: E731
        fg = (pool(_state(maps, DEFINITE_FG) + _state(maps, POSSIBLE_FG)) >= 0.5) | touch(maps[:, 0])
        bg = (pool(_state(maps, DEFINITE_BG) + _state(maps, POSSIBLE_BG)) >= 0.5) | touch(maps[:, 1])
        b = maps.shape[0]
        size = float(crop_size) if crop_size is not None else 1.0
        regions_np = np.tile([0.0, 0.0, size, size], (b, 1)) if regions is None else regions.detach().cpu().numpy()
        fallback = border_background(grid, regions_np, size,
                                     None if at_edge is None else at_edge.detach().cpu().numpy(),
                                     None if object_box is None else object_box.detach().cpu().numpy())
        bg_np = bg.cpu().numpy()
        bg_np = np.where(bg_np.reshape(b, -1).any(1)[:, None, None], bg_np, fallback)
        return fg.cpu().numpy(), bg_np

    def grid_cap(self, z: int) -> int:
        """Token cells a side for a pass decoded at z px: min(``max_grid``, z / 8), one cell
        per 8 decoded pixels (the demo ViT's patch size: a 96 crop keeps its 12 x 12 grid;
        a 512 crop decoded at 128 px is averaged onto 16 x 16)."""
        return max(1, min(self.config.max_grid, z // 8))

    def decode_pass(self, feat: torch.Tensor, image: torch.Tensor, maps: torch.Tensor, clicks: torch.Tensor,
                    valid: torch.Tensor, boxes: torch.Tensor | None, z: int,
                    image_z: torch.Tensor | None = None, pdm_weights: dict[int, torch.Tensor] | None = None,
                    at_edge: torch.Tensor | None = None, object_box: torch.Tensor | None = None
                    ) -> PassOutput:
        """One pass over the regions ``boxes`` (B, 4) (None = the whole crop) at z x z.

        feat (B, D, h, w) projected tokens of the crop; image (B, 3, S, S); maps (B, 8, M, M)
        in the map frame (M = S / k); clicks (B, K, 3) crop pixel coords; valid (B, K); the
        token grid is capped at :meth:`grid_cap` cells a side; ``image_z`` the whole crop
        already at z x z and ``pdm_weights`` PDM's affinities of it (whole-crop pass only);
        ``at_edge``, ``object_box`` as in :class:`StaticInputs` (the prototypes' background).
        """
        b, _, s, _ = image.shape
        cap = self.grid_cap(z)
        grid = (min(feat.shape[-2], cap), min(feat.shape[-1], cap))
        if boxes is None:
            boxes = torch.tensor([0.0, 0.0, float(s), float(s)], device=image.device).expand(b, 4).clone()
            feat_r = feat if tuple(feat.shape[-2:]) == grid else F.adaptive_avg_pool2d(feat, grid)
            resize = lambda t: t if t.shape[-1] == z else F.interpolate(  # noqa: E731
                t, size=(z, z), mode="bilinear", align_corners=False, antialias=True)
            image_r, maps_r = (resize(image) if image_z is None else image_z), resize(maps)
        else:
            feat_r = roi_resample(feat, boxes, s, grid)
            image_r = roi_resample(image, boxes, s, (z, z))
            maps_r = roi_resample(maps, boxes, s, (z, z))
        clicks_r = roi_points(clicks[..., :2], boxes, z)
        h, w = grid
        x = feat_r + self.click_embed(torch.cat([F.adaptive_avg_pool2d(maps_r, grid),
                                                 F.adaptive_max_pool2d(maps_r, grid)], dim=1))
        x = x.flatten(2).transpose(1, 2)  # (B, L, D)
        feat_tokens = feat_r.flatten(2).transpose(1, 2)
        if self.imsa is not None:
            for block in self.imsa:
                x = block(x, feat_r)
        if self.spm is not None:
            x_grid = x.transpose(1, 2).reshape(b, -1, h, w)
            x = self.spm(x, sample_click_vectors(x_grid, clicks_r, (z, z)), valid)
        if self.prototypes is not None:
            fg, bg = self.grid_cells(maps_r, grid, boxes, s, at_edge, object_box)
            x = self.prototypes(x, feat_tokens, grid, fg, bg)
        if self.fdm is not None:
            x = self.fdm(x, F.adaptive_max_pool2d(maps_r[:, :2], grid).flatten(2))
        x = x.transpose(1, 2).reshape(b, -1, h, w)

        half = (max(1, z // 2), max(1, z // 2))
        x = self.up1(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = self.up2(F.interpolate(x, size=half, mode="bilinear", align_corners=False))
        feats = x
        low = self.low(torch.cat([(image_r - self.pixel_mean) / self.pixel_std, maps_r], dim=1))
        logits = self._head_logits(self.fuse, feats, low, z)
        latent = None
        if self.training and self.latent_heads is not None:
            latent = torch.cat([self._head_logits(head, feats, low, z) for head in self.latent_heads], dim=1)
        disks = (maps_r[:, :2] > 0.5).to(logits.dtype)
        if self.pdm is not None:
            logits = self.pdm(logits, image_r, disks, pdm_weights)
        return PassOutput(logits=logits, boxes=boxes, features=feats, latent=latent, disks=disks)

    @staticmethod
    def _head_logits(head: nn.Sequential, feats: torch.Tensor, low: torch.Tensor, z: int) -> torch.Tensor:
        """head = [1x1 conv W, GELU, 3x3 conv] on [up(feats), low] (B, C2 + 8, Z, Z) -> (B, 1, Z, Z).

        W [up(f), low] + b = up(W_f f) + W_l low + b, since bilinear up-sampling is linear
        per channel: the 1x1 conv's feature half runs at Z/2 on 8 output channels instead of
        on C2 channels at Z (exact up to rounding; 1.8 -> ~0.6 ms at 128 px, 2 threads)."""
        conv1, act, conv3 = head
        c2 = feats.shape[1]
        hi = F.interpolate(F.conv2d(feats, conv1.weight[:, :c2]), size=(z, z), mode="bilinear", align_corners=False)
        return conv3(act(hi + F.conv2d(low, conv1.weight[:, c2:], conv1.bias)))

    def zoom_boxes(self, coarse_prob: torch.Tensor, clicks: torch.Tensor, valid: torch.Tensor, crop_size: int,
                   integral: bool = False) -> torch.Tensor:
        """(B, 4) RoIs in crop coords from the coarse foreground (B, M, M), map frame, and all
        clicks (B, K, 3) crop coords (IAM); found in the map frame (clicks mapped there,
        u_M = (u + 0.5) / k - 0.5) and scaled by k = S / M; ``integral`` rounds them outward
        to whole map pixels, so whole crop pixels too (see :mod:`exits.interactive.zoom`)."""
        m = coarse_prob.shape[-1]
        k = crop_size / m
        fg = (coarse_prob > 0.5).cpu().numpy()
        pts, ok = (clicks[..., :2].detach().cpu().numpy() + 0.5) / k - 0.5, valid.cpu().numpy()
        boxes = [zoom_box(fg[i], pts[i][ok[i]], m, self.config.zoom_expand, self.config.zoom_min_fraction, integral)
                 for i in range(len(fg))]
        return torch.as_tensor(np.stack(boxes) * k, dtype=torch.float32, device=coarse_prob.device)

    def static_inputs(self, tokens: torch.Tensor, grid: tuple[int, int], image: torch.Tensor,
                      at_edge: torch.Tensor | np.ndarray | list | None = None,
                      object_box: torch.Tensor | np.ndarray | list | None = None) -> StaticInputs:
        """The click-independent part of a call (:class:`StaticInputs`); tokens (B, h*w, C),
        image (B, 3, S, S); ``at_edge`` (B, 4) bool crop sides on the image edge and
        ``object_box`` (B, 4) the extreme-point box in crop pixel-edge coordinates, plain
        values (None: unknown; see :class:`StaticInputs`)."""
        b, n, c = tokens.shape
        h, w = grid
        if n != h * w or c != self.embed_dim:
            raise ValueError(f"tokens {tuple(tokens.shape)} do not fit grid {grid} x {self.embed_dim}")
        s = image.shape[-1]
        zc = min(s, self.config.coarse_size)
        image_c = image if zc == s else F.interpolate(image, size=(zc, zc), mode="bilinear", align_corners=False,
                                                      antialias=True)
        edge = None if at_edge is None else torch.as_tensor(np.asarray(at_edge, bool).reshape(b, 4))
        box = None if object_box is None else torch.as_tensor(np.asarray(object_box, np.float32).reshape(b, 4))
        return StaticInputs(feat=self.proj(tokens.transpose(1, 2).reshape(b, c, h, w)), image_coarse=image_c,
                            coarse_pdm=None if self.pdm is None else self.pdm.affinities(image_c),
                            at_edge=edge, object_box=box)

    def forward_all(self, tokens: torch.Tensor, grid: tuple[int, int], image: torch.Tensor, maps: torch.Tensor,
                    clicks: torch.Tensor, valid: torch.Tensor, static: StaticInputs | None = None) -> DecoderOutput:
        """Coarse pass, and with ``use_zoom`` the RoI refinement pasted into it (module doc).

        Args:
            tokens: (B, h*w, C) cached patch tokens of the S x S crop.
            grid: (h, w) token grid.
            image: (B, 3, S, S) crop in [0, 1].
            maps: (B, 8, M, M), M = S / k for an integer k (the map frame,
                :func:`exits.interactive.inference.build_inputs`; M = S for small crops).
            clicks: (B, K, 3) [u, v, +-1] in crop pixel coords; valid: (B, K) bool.
            static: :meth:`static_inputs` of these tokens and crops when the caller keeps it
                (None: computed here).
        Returns logits (B, 1, M, M) in the map frame.
        """
        s, m = image.shape[-1], maps.shape[-1]
        if m > s or s % m:
            raise ValueError(f"maps are {m} px a side, need S / k for an integer k (S = {s})")
        zc = min(s, self.config.coarse_size)
        if static is None:
            static = self.static_inputs(tokens, grid, image)
        elif static.image_coarse.shape[-1] != zc or static.feat.shape[0] != image.shape[0]:
            raise ValueError(f"static inputs are for {static.image_coarse.shape[-1]} px, batch {static.feat.shape[0]}; "
                             f"this call needs {zc} px, batch {image.shape[0]}")
        feat = static.feat
        coarse = self.decode_pass(feat, image, maps, clicks, valid, None, zc, image_z=static.image_coarse,
                                  pdm_weights=static.coarse_pdm, at_edge=static.at_edge, object_box=static.object_box)
        coarse_m = coarse.logits if zc == m else F.interpolate(coarse.logits, size=(m, m), mode="bilinear",
                                                               align_corners=False)
        if not self.config.use_zoom:
            return DecoderOutput(logits=coarse_m, coarse=coarse, refine=None)
        coarse_prob = torch.sigmoid(coarse_m.detach())
        z = min(s, self.config.decode_size)
        # A crop larger than the decode size is down-sampled: whole-pixel RoIs let the image
        # and maps be cut by slicing (roi_resample), the RoI growing by < 1 px.
        boxes = self.zoom_boxes(coarse_prob[:, 0], clicks, valid, s, integral=s > z)
        maps_fine = torch.cat([maps[:, :PREV_CHANNEL], coarse_prob], dim=1)
        refine = self.decode_pass(feat, image, maps_fine, clicks, valid, boxes, z, at_edge=static.at_edge,
                                  object_box=static.object_box)
        logits = paste_roi_logits(refine.logits, boxes * (m / s), m, coarse_m)
        return DecoderOutput(logits=logits, coarse=coarse, refine=refine)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], image: torch.Tensor, maps: torch.Tensor,
                clicks: torch.Tensor, valid: torch.Tensor, static: StaticInputs | None = None) -> torch.Tensor:
        """(B, 1, M, M) final logits in the map frame (see :meth:`forward_all`)."""
        return self.forward_all(tokens, grid, image, maps, clicks, valid, static).logits
