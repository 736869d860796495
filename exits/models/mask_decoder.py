"""Light mask decoder: ViT patch tokens -> per-pixel mask logits for one object crop.

Tokens (B, N*N, C) are laid back on their N x N grid, projected to ``decoder_dim``
channels, and upsampled 2x per stage (bilinear + 3x3 conv + GroupNorm + GELU, channels
halving each stage, at least ``min_dim``). Bilinear-then-conv rather than transposed
convolution avoids checkerboard artefacts in the masks the CRF loss compares against.

Optionally a low-level image branch (two 3x3 convs on the RGB crop at full resolution) is
concatenated before the last conv: at stride ``patch_size`` the tokens alone cannot place
a boundary to better than a patch, and from scratch a ViT learns little fine detail, so
the colour edges come in directly (the same reason CRF refinement helps).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskDecoder", "ImageSkip"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv_block(ch_in: int, ch_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch_in, ch_out, 3, padding=1, bias=False), _norm(ch_out), nn.GELU())


class ImageSkip(nn.Module):
    """Two 3x3 conv-GN-GELU layers on the (normalised) RGB crop, full resolution.

    (B, 3, H, W) -> (B, skip_dim, H, W).
    """

    def __init__(self, skip_dim: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(_conv_block(in_chans, skip_dim), _conv_block(skip_dim, skip_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class MaskDecoder(nn.Module):
    """Patch tokens -> mask logits.

    Args:
        embed_dim: ViT token width C.
        decoder_dim: channels after the input projection (halved per upsampling stage).
        num_upsamples: 2x stages; log2(patch_size) makes the output exactly the crop size.
            Any shortfall (or a non-power-of-2 patch) is closed by a final bilinear resize.
        image_skip: add the :class:`ImageSkip` branch (then ``forward`` needs ``image``).
        skip_dim: channels of the image branch.
        min_dim: lower bound on stage channels.
    """

    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int = 128,
        num_upsamples: int = 3,
        image_skip: bool = True,
        skip_dim: int = 16,
        min_dim: int = 16,
    ) -> None:
        super().__init__()
        if num_upsamples < 0:
            raise ValueError("num_upsamples must be >= 0")
        self.embed_dim = embed_dim
        self.num_upsamples = num_upsamples
        self.input_proj = nn.Sequential(nn.Conv2d(embed_dim, decoder_dim, 1, bias=False), _norm(decoder_dim), nn.GELU())
        stages = []
        ch = decoder_dim
        for _ in range(num_upsamples):
            ch_out = max(min_dim, ch // 2)
            stages.append(_conv_block(ch, ch_out))
            ch = ch_out
        self.stages = nn.ModuleList(stages)
        self.skip = ImageSkip(skip_dim) if image_skip else None
        self.fuse = _conv_block(ch + skip_dim, ch) if image_skip else nn.Identity()
        self.head = nn.Conv2d(ch, 1, 1)
        self.out_channels = ch

    def forward(
        self,
        tokens: torch.Tensor,
        grid_hw: tuple[int, int],
        image: torch.Tensor | None = None,
        out_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Decode one mask per crop.

        Args:
            tokens: (B, N_h*N_w, C) patch tokens, row-major (no prefix tokens).
            grid_hw: (N_h, N_w).
            image: (B, 3, H, W) normalised crop; required when ``image_skip``.
            out_size: (H, W) of the logits; default the image's size, else the grid
                times 2^num_upsamples.
        Returns:
            (B, 1, H, W) mask logits (sigmoid -> foreground probability).
        """
        b, n, c = tokens.shape
        gh, gw = grid_hw
        if n != gh * gw or c != self.embed_dim:
            raise ValueError(f"tokens {tuple(tokens.shape)} do not fit grid {grid_hw} x {self.embed_dim}")
        if out_size is None:
            out_size = tuple(image.shape[-2:]) if image is not None else (gh << self.num_upsamples, gw << self.num_upsamples)
        x = tokens.transpose(1, 2).reshape(b, c, gh, gw)
        x = self.input_proj(x)
        for stage in self.stages:
            x = stage(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        if self.skip is not None:
            if image is None:
                raise ValueError("this decoder has an image skip branch: pass the image")
            skip = self.skip(image)
            if tuple(skip.shape[-2:]) != tuple(out_size):
                skip = F.interpolate(skip, size=out_size, mode="bilinear", align_corners=False)
            x = self.fuse(torch.cat([x, skip], dim=1))
        return self.head(x)
