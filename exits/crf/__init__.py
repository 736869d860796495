"""CRF refinement of object masks: one entry point, two implementations.

``crf_refine(image, prob, impl="meanfield")`` — batched local-window mean-field in PyTorch
on the input's device (used inside the CRF loss at every training step);
``impl="dense"`` — pydensecrf's fully connected CRF on the CPU (reference, offline).
Parameter names and defaults are shared (``exits.crf.common.DEFAULT_CRF_PARAMS``).
"""
from __future__ import annotations

from typing import Any

import torch

from exits.crf.common import DEFAULT_CRF_PARAMS
from exits.crf.dense import dense_crf
from exits.crf.meanfield import meanfield_crf

CRF_IMPLS = {"meanfield": meanfield_crf, "dense": dense_crf}


def crf_refine(image: torch.Tensor, prob: torch.Tensor, impl: str = "meanfield", **params: Any) -> torch.Tensor:
    """Refine a foreground probability with a CRF.

    Args:
        image: (B, 3, H, W) uint8 in 0..255, or float in [0, 1]; same H, W as ``prob``.
        prob: (B, 1, H, W) float foreground probability.
        impl: ``"meanfield"`` (batched, any device) or ``"dense"`` (pydensecrf, CPU loop;
            result returned on ``prob``'s device).
        **params: shared ``iters, sxy_gauss, compat_gauss, sxy_bilateral, srgb,
            compat_bilateral, clip``; meanfield only: ``window, dilation, max_kernel_mib``.
    Returns:
        (B, 1, H, W) refined foreground probability in [0, 1], dtype/device of ``prob``.
        No gradient flows through it (a CRF target is a constant).
    """
    try:
        fn = CRF_IMPLS[impl]
    except KeyError:
        raise ValueError(f"impl must be one of {sorted(CRF_IMPLS)}, got {impl!r}") from None
    with torch.no_grad():
        return fn(image, prob, **params)


__all__ = ["CRF_IMPLS", "DEFAULT_CRF_PARAMS", "crf_refine", "dense_crf", "meanfield_crf"]
