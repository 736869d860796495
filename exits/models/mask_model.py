"""MaskModel: ViT backbone + mask decoder, images in [0, 1] -> mask logits.

The same module serves as the similarity extractor (trained with the MIL loss, then frozen
and read through :meth:`MaskModel.similarity`) and as the pseudo-label generator (student
and EMA teacher). ImageNet normalisation lives inside the model so callers pass raw [0, 1]
crops and pretrained weights see the statistics they were trained on.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from exits.models.attention import similarity_matrix
from exits.models.mask_decoder import MaskDecoder
from exits.models.vit import grid_size

__all__ = ["MaskModel"]


class MaskModel(nn.Module):
    """Object-crop segmenter.

    Args:
        backbone: timm ``VisionTransformer`` (num_classes=0, global_pool='').
        decoder: :class:`MaskDecoder` with ``embed_dim == backbone.embed_dim``.
    Attributes:
        build_kwargs: factory arguments (set by ``build_mask_model``) so checkpoints can
            rebuild the model; None when assembled by hand.
    """

    def __init__(self, backbone: VisionTransformer, decoder: MaskDecoder) -> None:
        super().__init__()
        if decoder.embed_dim != backbone.embed_dim:
            raise ValueError(f"decoder embed_dim {decoder.embed_dim} != backbone {backbone.embed_dim}")
        self.backbone = backbone
        self.decoder = decoder
        # Non-persistent: constants, not weights; keeps state dicts to learnable tensors.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        self.build_kwargs: dict[str, Any] | None = None

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    @property
    def img_size(self) -> int:
        return int(self.backbone.patch_embed.img_size[0])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (x - mean) / std with ImageNet statistics."""
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens (B, N_h*N_w, C) and the grid (N_h, N_w) for [0, 1] images."""
        tokens = self.backbone.forward_features(self.normalize(images))
        return tokens[:, self.backbone.num_prefix_tokens :], grid_size(self.backbone, tuple(images.shape[-2:]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images in [0, 1] -> (B, 1, S, S) mask logits."""
        x = self.normalize(images)
        tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens :]
        grid = grid_size(self.backbone, tuple(images.shape[-2:]))
        return self.decoder(tokens, grid, image=x, out_size=tuple(images.shape[-2:]))

    def similarity(self, images: torch.Tensor, layers: Sequence[int] = (-1,)) -> torch.Tensor:
        """EXITS similarity S (B, N^2, N^2) from head/layer-averaged attention; see
        :func:`exits.models.attention.similarity_matrix`."""
        return similarity_matrix(self, images, layers)
