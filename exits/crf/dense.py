"""Reference fully connected CRF: pydensecrf (permutohedral-lattice mean-field, CPU).

Exact-range Gaussian and bilateral kernels over the whole crop (Krähenbühl & Koltun
2011). One object at a time on the CPU, so it serves as the reference the batched
``meanfield`` implementation is checked against and as an offline refiner.
"""
from __future__ import annotations

import numpy as np
import torch

from exits.crf.common import DEFAULT_CRF_PARAMS, check_crf_inputs, image_to_uint8


def dense_crf(
    image: torch.Tensor,
    prob: torch.Tensor,
    iters: int = int(DEFAULT_CRF_PARAMS["iters"]),
    sxy_gauss: float = DEFAULT_CRF_PARAMS["sxy_gauss"],
    compat_gauss: float = DEFAULT_CRF_PARAMS["compat_gauss"],
    sxy_bilateral: float = DEFAULT_CRF_PARAMS["sxy_bilateral"],
    srgb: float = DEFAULT_CRF_PARAMS["srgb"],
    compat_bilateral: float = DEFAULT_CRF_PARAMS["compat_bilateral"],
    clip: float = DEFAULT_CRF_PARAMS["clip"],
) -> torch.Tensor:
    """Dense-CRF refinement of a foreground probability with pydensecrf.

    Unaries U(l) = -log max(Q0(l), clip) with Q0 = (1 - p, p); pairwise terms
    ``addPairwiseGaussian(sxy_gauss, compat_gauss)`` and
    ``addPairwiseBilateral(sxy_bilateral, srgb, image, compat_bilateral)`` (Potts, symmetric
    kernel normalisation: pydensecrf's defaults); ``iters`` mean-field steps.

    Args:
        image: (B, 3, H, W) uint8 in 0..255 or float in [0, 1] (scaled x255 and rounded).
        prob: (B, 1, H, W) float foreground probability.
    Returns:
        (B, 1, H, W) refined foreground marginal Q(fg) in [0, 1], dtype and device of ``prob``.
    """
    # Imported here so the training path (meanfield) works where pydensecrf's C++ build
    # is unavailable (it does not build with Cython 3; pydensecrf2 provides it).
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    check_crf_inputs(image, prob)
    batch, _, height, width = prob.shape
    images = image_to_uint8(image.detach()).permute(0, 2, 3, 1).cpu().numpy()
    probs = prob.detach().to("cpu", torch.float32).numpy()[:, 0]
    out = np.empty((batch, height, width), dtype=np.float32)
    for b in range(batch):
        fg = probs[b]
        softmax = np.stack([1.0 - fg, fg]).astype(np.float32)
        # pydensecrf reads raw buffers: unaries must be float32 and C-contiguous, the image
        # uint8 H x W x 3 and C-contiguous, or it silently reads garbage / raises.
        unary = np.ascontiguousarray(unary_from_softmax(softmax, clip=clip), dtype=np.float32)
        crf = dcrf.DenseCRF2D(width, height, 2)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=sxy_gauss, compat=compat_gauss)
        crf.addPairwiseBilateral(
            sxy=sxy_bilateral, srgb=srgb, rgbim=np.ascontiguousarray(images[b]), compat=compat_bilateral
        )
        q = np.asarray(crf.inference(int(iters)), dtype=np.float32).reshape(2, height, width)
        out[b] = q[1]
    return torch.from_numpy(out)[:, None].to(device=prob.device, dtype=prob.dtype)
