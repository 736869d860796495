"""Loading pretrained ViT weights from local files (below :mod:`exits.models.vit`, which uses it).

Pretrained ViT files come in several layouts (timm: flat state dict; DeiT / MAE: nested
under 'model'; Lightning-style: 'state_dict'; DDP: 'module.' prefix; our own MaskModel:
'backbone.' prefix). They may also be trained at another resolution or patch size, so the
position embedding is resampled to the model's grid (``timm.layers.resample_abs_pos_embed``)
and a linear patch embedding to the model's patch size (``timm.layers.resample_patch_embed``).
Every key that does not load is reported, never silently dropped.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "LoadReport",
    "extract_state_dict",
    "load_vit_checkpoint",
    "load_vit_state_dict",
]

_log = logging.getLogger(__name__)

_NESTING_KEYS = ("model", "state_dict", "model_state", "module")
_KEY_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


@dataclass
class LoadReport:
    """What happened to each key of a checkpoint loaded into a model.

    loaded: keys copied (possibly after resampling); missing: model keys the file lacks;
    unexpected: file keys the model lacks; mismatched: keys present in both with shapes
    that could not be reconciled (left at their current value); resized: keys resampled
    (position / patch embedding).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)}, resized {self.resized}, missing {self.missing}, "
            f"unexpected {self.unexpected}, mismatched {self.mismatched}"
        )


def extract_state_dict(obj: Any, model_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded checkpoint object.

    Unwraps 'model' / 'state_dict' / 'model_state' / 'module' nesting, then strips one
    leading 'module.' / 'backbone.' / 'encoder.' / 'model.' prefix when that makes more keys
    match ``model_keys`` (or, without ``model_keys``, when every key has the prefix).
    """
    for _ in range(len(_NESTING_KEYS)):
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint is a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"no tensors found in checkpoint (keys: {sorted(map(str, obj))[:10]})")
    for prefix in _KEY_PREFIXES:
        with_prefix = [k for k in state if k.startswith(prefix)]
        if not with_prefix:
            continue
        stripped = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
        if model_keys is None:
            better = len(with_prefix) == len(state)
        else:
            better = len(model_keys & stripped.keys()) > len(model_keys & state.keys())
        if better:
            state = stripped
    return state


def _resample_pos_embed(model: VisionTransformer, pos: torch.Tensor) -> torch.Tensor:
    """Checkpoint position embedding (1, L, C) -> the model's (1, L', C).

    The file's prefix-token count p is the one that leaves a square grid (L - p = n^2);
    the grid part is resampled bicubically to the model's grid; prefix rows are kept,
    cut, or zero-padded to the model's prefix count.
    """
    target = model.pos_embed
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    candidates = [model_prefix] + [p for p in (0, 1, model.num_prefix_tokens, 2, 5) if p != model_prefix]
    for file_prefix in candidates:
        side = math.isqrt(max(pos.shape[1] - file_prefix, 0))
        if side > 0 and side * side == pos.shape[1] - file_prefix:
            break
    else:
        raise ValueError(f"cannot infer the grid of a position embedding with {pos.shape[1]} tokens")
    prefix, grid = pos[:, :file_prefix], pos[:, file_prefix:]
    grid = resample_abs_pos_embed(
        grid, new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=0
    )
    if file_prefix >= model_prefix:
        prefix = prefix[:, :model_prefix]
    else:
        pad = prefix.new_zeros(1, model_prefix - file_prefix, pos.shape[2])
        prefix = torch.cat([prefix, pad], dim=1)
    out = torch.cat([prefix, grid], dim=1)
    if out.shape != target.shape:
        raise ValueError(f"resampled position embedding {tuple(out.shape)} != model {tuple(target.shape)}")
    return out


def load_vit_state_dict(model: VisionTransformer, state: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy ``state`` into ``model`` (non-strict) with embedding resampling; see module doc."""
    own = model.state_dict()
    state = extract_state_dict(dict(state), set(own))
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if key == "pos_embed" and value.shape != target.shape:
            value = _resample_pos_embed(model, value)
            report.resized.append(key)
        elif key == "patch_embed.proj.weight" and value.dim() == 4 and value.shape[-2:] != target.shape[-2:]:
            value = resample_patch_embed(value, list(target.shape[-2:]))
            report.resized.append(key)
        elif key == "patch_embed.proj.weight" and value.dim() == 2 and target.dim() == 4:
            # Flattened patchify + linear (older ViT files): (C, 3*p*p) -> (C, 3, p, p).
            p = math.isqrt(value.shape[1] // target.shape[1])
            value = value.reshape(value.shape[0], target.shape[1], p, p)
            if value.shape != target.shape:
                value = resample_patch_embed(value, list(target.shape[-2:]))
                report.resized.append(key)
        if value.shape != target.shape:
            report.mismatched.append(key)
            continue
        to_load[key] = value.to(dtype=target.dtype)
    result = model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(set(result.missing_keys) | (set(own) - set(to_load) - set(report.mismatched)))
    report.unexpected = sorted(report.unexpected)
    report.mismatched = sorted(report.mismatched)
    return report


def load_vit_checkpoint(model: VisionTransformer, path: str | os.PathLike) -> LoadReport:
    """Load a local ViT checkpoint file into ``model``; logs and returns the report."""
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    report = load_vit_state_dict(model, obj)
    if not report.loaded:
        raise ValueError(f"no key of {path} matches the model: {report.summary()}")
    _log.info("loaded %s: %s", path, report.summary())
    return report
