"""Self-attention maps of a timm ViT, captured without changing timm's code.

timm's ``Attention`` computes ``F.scaled_dot_product_attention`` (fused), so the attention
weights never exist as a tensor. :class:`AttentionRecorder` hooks the modules that produce
the (normalised) queries and keys of each selected block, ``attn.q_norm`` and ``attn.k_norm``
(``nn.Identity`` when the model has no QK-norm; forward hooks fire on it all the same), and
recomputes

    A_h = softmax(q_h k_h^T * scale)         (B, heads, T, T), T = prefix + N*N tokens

exactly as timm's non-fused path does before attention dropout. Only timm's plain
``Attention`` is accepted: variants that rotate q/k after the norm (RoPE) would differ.

EXITS uses the head- and layer-averaged map as the similarity matrix S (N^2 x N^2) between
patches; :func:`similarity_matrix` builds it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["AttentionRecorder", "similarity_matrix", "resolve_layers"]


def resolve_layers(num_blocks: int, layers: Iterable[int] | None) -> list[int]:
    """Layer indices (negative = from the end) -> sorted unique non-negative indices."""
    if layers is None:
        return list(range(num_blocks))
    out = set()
    for layer in layers:
        idx = int(layer) + num_blocks if int(layer) < 0 else int(layer)
        if not 0 <= idx < num_blocks:
            raise IndexError(f"layer {layer} out of range for {num_blocks} blocks")
        out.add(idx)
    if not out:
        raise ValueError("no layer selected")
    return sorted(out)


def _backbone(model: nn.Module) -> VisionTransformer:
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer (or a model with .backbone), got {type(backbone).__name__}")
    return backbone


class AttentionRecorder:
    """Context manager recording softmax attention of selected ViT blocks.

    Usage::

        with AttentionRecorder(vit, layers=[-1]) as rec:
            vit(x)
        attn = rec.attentions[len(vit.blocks) - 1]   # (B, heads, T, T), rows sum to 1

    Args:
        model: timm ``VisionTransformer`` or a module with a ``.backbone`` that is one.
        layers: block indices to record (negative from the end); None = all blocks.
        head_mean: store the mean over heads, (B, T, T), instead of (B, heads, T, T).
        detach: store detached tensors (default) so no autograd graph is kept alive.
    Attributes:
        attentions: {block index: attention}; overwritten by each forward pass. Values are
            float32 (computed in float32 even under autocast), on the input's device.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int] | None = None,
        head_mean: bool = False,
        detach: bool = True,
    ) -> None:
        self.backbone = _backbone(model)
        self.layers = resolve_layers(len(self.backbone.blocks), layers)
        self.head_mean = head_mean
        self.detach = detach
        self.attentions: dict[int, torch.Tensor] = {}
        self._queries: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for idx in self.layers:
            attn = self.backbone.blocks[idx].attn
            if not isinstance(attn, Attention):
                raise TypeError(f"block {idx}: unsupported attention module {type(attn).__name__}")

    def __enter__(self) -> "AttentionRecorder":
        self.attentions.clear()
        for idx in self.layers:
            attn = self.backbone.blocks[idx].attn
            self._handles.append(attn.q_norm.register_forward_hook(self._query_hook(idx)))
            self._handles.append(attn.k_norm.register_forward_hook(self._key_hook(idx, attn.scale)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._queries.clear()

    def _query_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._queries[idx] = output

        return hook

    def _key_hook(self, idx: int, scale: float):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            q = self._queries.pop(idx)
            k = output
            if self.detach:
                q, k = q.detach(), k.detach()
            # (B, h, T, d) @ (B, h, d, T) -> (B, h, T, T); float32 for a stable softmax.
            logits = (q.float() * scale) @ k.float().transpose(-2, -1)
            attn = logits.softmax(dim=-1)
            self.attentions[idx] = attn.mean(dim=1) if self.head_mean else attn

        return hook


def similarity_matrix(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[int] = (-1,),
) -> torch.Tensor:
    """Patch-to-patch similarity S from self-attention, as in EXITS.

    S = mean over the chosen layers l and heads h of A_{l,h}[P:, P:], rows renormalised:

        S(i, j) = Abar(i, j) / sum_{j'} Abar(i, j'),   i, j patch tokens,

    where Abar is the head/layer mean of the softmax attention and P = num_prefix_tokens.
    Dropping the class/register columns removes the attention mass a query puts on them
    (often large: prefix tokens act as attention sinks); renormalising keeps every row a
    probability distribution over patches, so S >= 0 and S.sum(-1) == 1. S is not
    symmetric; Sinkhorn and (A + A^T)/2 come downstream.

    Blocks after the last selected one are not run. Gradients follow the caller's grad
    mode (wrap in ``torch.no_grad()`` for a frozen extractor).

    Args:
        model: a :class:`~exits.models.mask_model.MaskModel` (images in [0, 1], normalised
            inside) or a bare timm ``VisionTransformer`` (images already normalised).
        images: (B, 3, H, W).
        layers: block indices to average (negative from the end).
    Returns:
        (B, N_h*N_w, N_h*N_w) float32, row-major patch order.
    """
    backbone = _backbone(model)
    x = model.normalize(images) if hasattr(model, "normalize") else images
    idx = resolve_layers(len(backbone.blocks), layers)
    with AttentionRecorder(backbone, idx, head_mean=True, detach=False) as rec:
        backbone.forward_intermediates(x, indices=[idx[-1]], stop_early=True, intermediates_only=True)
    p = backbone.num_prefix_tokens
    mean_attn = torch.stack([rec.attentions[i] for i in idx]).mean(dim=0)
    patches = mean_attn[:, p:, p:]
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)
