"""SimMIM masked-image modelling: a self-supervised warm start for a timm ViT backbone.

SimMIM (Xie et al., "SimMIM: a Simple Framework for Masked Image Modeling", CVPR 2022):
random blocks of patches are masked, their tokens replaced by a learnable mask token
before the position embedding, and a one-layer linear head predicts the masked patches'
pixels from the encoder's output with an L1 loss counted on masked patches only.

Used here to warm-start the similarity extractor on the run's own crops when no pretrained
weights exist (issue 13 item 5). Deviations from the paper, and why:

* The paper masks 32 px blocks of 192 px images (a 6x6 block grid) at ratio 0.6. Here a
  block is ``block`` x ``block`` patches (default 2 x 2 = 16 px of a 96 px crop, the same
  6 x 6 block grid), so the ratio and the share of context per block match.
* With the conv stem (``exits.models.vit.ConvStemPatchEmbed``) a visible token's receptive
  field reaches a few pixels into its masked neighbours; those pixels would be copied rather
  than predicted. The masked patches' pixels are therefore also set to 0 (the mean, after
  normalisation) before the stem, besides replacing their tokens. For a linear patch
  embedding this changes nothing.
* Targets are the normalised pixels the encoder sees (the paper: raw RGB after the same
  normalisation; equal up to the per-channel affine map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from exits.models.vit import grid_size

__all__ = ["SimMIM", "block_mask", "patchify", "masked_l1_loss"]


def block_mask(batch: int, grid: tuple[int, int], ratio: float, block: int, *,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random SimMIM masks: (B, N_h*N_w) bool, True = masked, row-major token order.

    The grid is cut into ceil(N_h/block) x ceil(N_w/block) blocks (the last row/column of
    blocks may be smaller); each image masks exactly ``round(ratio * n_blocks)`` of them
    (at least 1, at most n_blocks - 1, so there is always something to predict from and to
    predict).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if block < 1:
        raise ValueError(f"mask block must be >= 1 patch, got {block}")
    gh, gw = grid
    bh, bw = -(-gh // block), -(-gw // block)
    n_blocks = bh * bw
    if n_blocks < 2:
        raise ValueError(f"a {gh}x{gw} grid has {n_blocks} block(s) of {block} patches: nothing to mask against")
    k = min(n_blocks - 1, max(1, round(ratio * n_blocks)))
    order = torch.rand(batch, n_blocks, generator=generator).argsort(dim=1)
    blocks = torch.zeros(batch, n_blocks, dtype=torch.bool)
    blocks.scatter_(1, order[:, :k], True)
    grid_mask = blocks.view(batch, bh, bw).repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :gh, :gw]
    return grid_mask.reshape(batch, gh * gw).to(device)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C): patch t = row * (W/p) + col, pixels (y, x, c)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of patch {patch}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L = sum_{b,t: mask} |pred - target|_1 / (n_masked * D), a mean over masked values.

    pred, target: (B, N, D); mask: (B, N) bool. Every image has masked patches
    (``block_mask``), so the mean is per value, pooled over the batch as in SimMIM.
    """
    m = mask.unsqueeze(-1).to(pred.dtype)
    return ((pred - target).abs() * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1.0)


class SimMIM(nn.Module):
    """A timm ViT plus a mask token and a linear pixel head; ``forward`` returns the loss.

    Args:
        backbone: the ``VisionTransformer`` to pre-train (trained in place: after training,
            the same module object holds the warm-started weights).
        pixel_mean, pixel_std: (1, 3, 1, 1) normalisation the backbone's owner applies.
        mask_ratio, block: see :func:`block_mask`.
    """

    def __init__(self, backbone: VisionTransformer, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, *,
                 mask_ratio: float = 0.6, block: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_ratio = float(mask_ratio)
        self.block = int(block)
        dim = backbone.embed_dim
        self.patch = int(backbone.patch_embed.patch_size[0])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(dim, self.patch * self.patch * 3)
        self.register_buffer("pixel_mean", pixel_mean.detach().clone().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", pixel_std.detach().clone().view(1, 3, 1, 1), persistent=False)

    def encode_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, C) of normalised images ``x`` with ``mask`` (B, N) tokens
        replaced by the mask token (timm's ``forward_features`` with the swap inserted
        between patch embedding and position embedding)."""
        vit = self.backbone
        tokens = vit.patch_embed(x)
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - w) + self.mask_token.to(tokens.dtype) * w
        tokens = vit._pos_embed(tokens)
        tokens = vit.patch_drop(tokens)
        tokens = vit.norm_pre(tokens)
        tokens = vit.blocks(tokens)
        tokens = vit.norm(tokens)
        return tokens[:, vit.num_prefix_tokens:]

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted and target patch pixels, both (B, N, P*P*3), for (B, 3, S, S) images in
        [0, 1] under ``mask`` (B, N) bool. No pixel of a masked patch reaches the encoder."""
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        gh, gw = grid_size(self.backbone, tuple(x.shape[-2:]))
        pixel_mask = mask.view(-1, 1, gh, gw).repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
        visible = x * (~pixel_mask).to(x.dtype)
        return self.head(self.encode_masked(visible, mask)), patchify(x, self.patch)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked L1 loss (scalar) of (B, 3, S, S) images in [0, 1] under ``mask`` (B, N) bool."""
        pred, target = self.predict(images, mask)
        return masked_l1_loss(pred.float(), target.float(), mask)
