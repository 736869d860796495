"""Build a :class:`MaskModel` from plain values (configs are parsed elsewhere), and save /
load whole mask models with the arguments that rebuild them."""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from exits.io import atomic_path

from exits.models.mask_decoder import MaskDecoder
from exits.models.mask_model import MaskModel
from exits.models.vit import build_vit

__all__ = ["build_mask_model", "save_mask_model", "load_mask_model"]

def build_mask_model(
    vit_name: str,
    img_size: int,
    patch_size: int,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    conv_stem: bool = True,
    decoder_dim: int = 128,
    num_upsamples: int | None = None,
    image_skip: bool = True,
    skip_dim: int = 16,
    pretrained_path: str | None = None,
    vit_kwargs: dict[str, Any] | None = None,
) -> MaskModel:
    """ViT (:func:`exits.models.vit.build_vit`) + :class:`MaskDecoder`.

    ``num_upsamples`` defaults to ceil(log2(patch_size)) so the decoder reaches the crop
    size by 2x stages (a final resize covers non-power-of-2 patches). ``vit_kwargs`` are
    extra ``VisionTransformer`` arguments (e.g. ``drop_path_rate``). The returned model
    carries ``build_kwargs`` for :func:`save_mask_model`.
    """
    backbone = build_vit(
        vit_name,
        img_size=img_size,
        patch_size=patch_size,
        pretrained_path=pretrained_path,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        conv_stem=conv_stem,
        **(vit_kwargs or {}),
    )
    ups = int(math.ceil(math.log2(patch_size))) if num_upsamples is None else int(num_upsamples)
    decoder = MaskDecoder(
        backbone.embed_dim,
        decoder_dim=decoder_dim,
        num_upsamples=ups,
        image_skip=image_skip,
        skip_dim=skip_dim,
    )
    model = MaskModel(backbone, decoder)
    model.build_kwargs = dict(
        vit_name=vit_name,
        img_size=img_size,
        patch_size=patch_size,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        conv_stem=conv_stem,
        decoder_dim=decoder_dim,
        num_upsamples=num_upsamples,
        image_skip=image_skip,
        skip_dim=skip_dim,
        pretrained_path=pretrained_path,
        vit_kwargs=dict(vit_kwargs or {}),
    )
    return model


def save_mask_model(path: str | os.PathLike, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Atomically save a :class:`MaskModel` with the factory arguments that rebuild it."""
    build_kwargs = getattr(model, "build_kwargs", None)
    if build_kwargs is None:
        raise ValueError("model has no build_kwargs; build it with exits.models.build_mask_model")
    payload = {"build_kwargs": dict(build_kwargs), "state_dict": model.state_dict(), "extra": extra or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_mask_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a model written by :func:`save_mask_model` (strict key match).

    The returned model has the saved ``extra`` dict in ``model.checkpoint_extra``.
    """
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=False)
    kwargs = dict(payload["build_kwargs"])
    kwargs["pretrained_path"] = None  # weights come from the state dict below
    model = build_mask_model(**kwargs)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.checkpoint_extra = payload.get("extra", {})
    return model.to(map_location)
