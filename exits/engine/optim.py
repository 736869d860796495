"""AdamW with weight decay only where it regularises: matrices and convolution kernels.

Decoupled weight decay (AdamW) shrinks every decayed weight towards 0 each step. That is
harmful for parameters that are offsets or scales rather than feature detectors:
- biases and normalisation scales/shifts (LayerNorm, GroupNorm), and every other 1-D
  parameter such as layer-scale gammas: decaying them pulls activations towards 0/unscaled;
- position embeddings and learned tokens (``pos_embed``, ``cls_token``, ``reg_token``,
  ``dist_token``, ``mask_token``), which are inputs rather than weights (the timm/DeiT/MAE
  recipes exclude them too). Modules may also list names in a timm-style
  ``no_weight_decay()`` method; those are honoured at any depth of the model.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["no_decay_parameter_names", "param_groups_weight_decay", "build_optimizer"]

# Last components of parameter names that are inputs to the network rather than weights.
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


def _declared_no_decay(model: nn.Module) -> set[str]:
    """Full parameter names listed by ``no_weight_decay()`` methods of any submodule."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            for name in declare():
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that get no weight decay (see the module docstring)."""
    declared = _declared_no_decay(model)
    names = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or last in NO_DECAY_SUFFIXES or name in declared:
            names.add(name)
    return names


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: ``decay`` (weight_decay) and ``no_decay`` (0); empty groups dropped.

    Frozen parameters (``requires_grad=False``) are left out entirely.
    """
    skip = no_decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups_weight_decay`."""
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr)
