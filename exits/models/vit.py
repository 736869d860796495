"""ViT backbone for EXITS stage 1, built on timm's ``VisionTransformer``.

The similarity extractor and the pseudo-label generator both use a plain timm ViT so that
ImageNet / DeiT / MAE weights (when the user has a local file) load without conversion.
Weights are never downloaded: ``pretrained=False`` always, and an optional local checkpoint
is loaded by :func:`exits.models.pretrained.load_vit_checkpoint`.

An optional convolutional stem replaces the single ``patch x patch`` linear projection by a
stack of stride-2 3x3 convolutions (Xiao et al., "Early Convolutions Help Transformers See
Better", 2021). From random init on a few hundred crops it trains much better than the
linear patch embedding (see the calibration note in DESIGN.md); it is plugged in through
timm's ``embed_layer`` argument, so the rest of the timm model is unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from exits.models.pretrained import load_vit_checkpoint

__all__ = [
    "ConvStemPatchEmbed",
    "build_vit",
    "grid_size",
    "patch_tokens",
    "is_conv_stem",
]


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: batches here are small, crops are labelled one by one at
    # inference, and an EMA teacher would need BN running stats copied as well.
    groups = math.gcd(8, channels)
    return nn.GroupNorm(groups, channels)


def _stem_layers(in_chans: int, embed_dim: int, patch_size: int, bias: bool) -> nn.Sequential:
    """Conv stack with total stride ``patch_size``.

    ``k`` = the number of factors 2 in ``patch_size`` (at most 4) stride-2 3x3 convs
    (conv-GN-ReLU), channels doubling up to ``embed_dim / 2``; a remaining factor ``r``
    (``patch_size = 2^k * r``) becomes an ``r x r`` stride-``r`` conv; a final 1x1 conv maps to
    ``embed_dim``. Patch 8 -> 3 convs (stride 8), patch 16 -> 4 convs, patch 14 -> 1 conv +
    a 7x7/7 conv.
    """
    k = 0
    while patch_size % (2 ** (k + 1)) == 0 and k < 4:
        k += 1
    rest = patch_size // (2**k)
    layers: list[nn.Module] = []
    ch_in = in_chans
    for i in range(k):
        ch_out = max(16, embed_dim // (2 ** (k - i)))
        layers += [nn.Conv2d(ch_in, ch_out, 3, stride=2, padding=1, bias=False), _group_norm(ch_out), nn.ReLU(inplace=True)]
        ch_in = ch_out
    if rest > 1:
        ch_out = max(16, embed_dim // 2)
        layers += [nn.Conv2d(ch_in, ch_out, rest, stride=rest, bias=False), _group_norm(ch_out), nn.ReLU(inplace=True)]
        ch_in = ch_out
    layers.append(nn.Conv2d(ch_in, embed_dim, 1, bias=bias))
    return nn.Sequential(*layers)


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose ``proj`` is a small conv stack instead of one linear conv.

    Same constructor arguments and output as ``PatchEmbed`` (B, N*N, C), so it can be given
    to ``VisionTransformer(embed_layer=...)``. Patch-size changes after construction
    (``set_input_size(patch_size=...)``) are not supported.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.proj
        device, dtype = old.weight.device, old.weight.dtype
        self.proj = _stem_layers(old.in_channels, old.out_channels, self.patch_size[0], old.bias is not None).to(
            device=device, dtype=dtype
        )
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"conv stem needs a square patch, got {self.patch_size}")

    def set_input_size(self, img_size=None, patch_size=None):  # noqa: ANN001 - timm signature
        if patch_size is not None and tuple(timm.layers.to_2tuple(patch_size)) != tuple(self.patch_size):
            raise ValueError("the conv stem's patch size is fixed at construction")
        super().set_input_size(img_size=img_size, patch_size=None)


def is_conv_stem(model: VisionTransformer) -> bool:
    """True when ``model`` embeds patches with :class:`ConvStemPatchEmbed`."""
    return isinstance(model.patch_embed, ConvStemPatchEmbed)


def build_vit(
    name: str,
    img_size: int,
    patch_size: int,
    pretrained_path: str | None = None,
    *,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    conv_stem: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """A timm ViT without classifier head, randomly initialised or from a local file.

    Args:
        name: any timm model name whose class is ``VisionTransformer`` (e.g.
            'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224',
            'deit_small_patch16_224'). Only the architecture is taken from the name.
        img_size: square input size S; must be a multiple of ``patch_size``.
        patch_size: patch side P; the token grid is (S/P) x (S/P).
        pretrained_path: optional local checkpoint (timm / DeiT / MAE state dict, possibly
            nested under 'model' or 'state_dict'); loaded with position-embedding and
            patch-embedding resampling (see ``load_vit_checkpoint``).
        depth, embed_dim, num_heads: architecture overrides (None keeps the name's value).
        conv_stem: replace the linear patch embedding with :class:`ConvStemPatchEmbed`.
        **overrides: any other ``VisionTransformer`` argument (``drop_path_rate``,
            ``class_token``, ``reg_tokens``, ``dynamic_img_size``, ...).
    Returns:
        ``VisionTransformer`` with ``num_classes=0`` and ``global_pool=''``: its forward
        returns all tokens (B, prefix + N*N, C).
    Raises:
        ValueError: unknown name, non-ViT architecture, or ``img_size % patch_size != 0``.
    """
    if img_size % patch_size != 0:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown timm model name {name!r}")
    kwargs: dict[str, Any] = dict(overrides)
    for key, value in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
        if value is not None:
            kwargs[key] = int(value)
    if conv_stem:
        kwargs["embed_layer"] = ConvStemPatchEmbed
    try:
        model = timm.create_model(
            name,
            pretrained=False,  # never download: weights come from pretrained_path only
            num_classes=0,
            global_pool="",
            img_size=int(img_size),
            patch_size=int(patch_size),
            **kwargs,
        )
    except TypeError as err:  # e.g. a CNN name: its class takes no img_size/patch_size
        raise ValueError(f"{name!r} is not a timm VisionTransformer ({err})") from err
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name!r} builds a {type(model).__name__}, not a timm VisionTransformer")
    if pretrained_path is not None:
        load_vit_checkpoint(model, pretrained_path)
    return model


def grid_size(model: VisionTransformer, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """Token grid (rows, cols) for an input of ``image_hw`` (default: the built size)."""
    if image_hw is None:
        return tuple(model.patch_embed.grid_size)
    return tuple(model.patch_embed.dynamic_feat_size(tuple(image_hw)))


def patch_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Final-norm patch tokens without class / register / distillation tokens.

    Args:
        model: timm ``VisionTransformer`` (from :func:`build_vit`).
        x: (B, 3, H, W) images, already normalised as the model expects.
    Returns:
        (B, N_h*N_w, C) tokens in row-major grid order (token t = row * N_w + col).
    """
    tokens = model.forward_features(x)
    return tokens[:, model.num_prefix_tokens :]
