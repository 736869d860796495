"""EXITS CRF loss: the student chases a CRF-refined average of itself and its EMA teacher."""
from __future__ import annotations

from typing import Any

import torch

from exits.crf import crf_refine
from exits.losses.dice import dice_loss


def crf_target(
    student_prob: torch.Tensor,
    teacher_prob: torch.Tensor,
    image: torch.Tensor,
    impl: str = "meanfield",
    **crf_params: Any,
) -> torch.Tensor:
    """Pseudo ground truth CRF(M_avg), M_avg = (M_student + M_teacher) / 2, without gradient.

    Args:
        student_prob, teacher_prob: (B, 1, H, W) foreground probabilities.
        image: (B, 3, H, W) crop at the masks' resolution (uint8, or float in [0, 1]).
        impl, crf_params: passed to ``exits.crf.crf_refine``.
    Returns:
        (B, 1, H, W) soft target in [0, 1], detached.
    """
    with torch.no_grad():
        m_avg = 0.5 * (student_prob.detach() + teacher_prob.detach())
        return crf_refine(image, m_avg, impl=impl, **crf_params).detach()


def crf_loss(
    student_prob: torch.Tensor,
    teacher_prob: torch.Tensor,
    image: torch.Tensor,
    impl: str = "meanfield",
    eps: float = 1e-5,
    reduction: str = "mean",
    **crf_params: Any,
) -> torch.Tensor:
    """L_crf = Dice(M_student, CRF((M_student + M_teacher) / 2))  (EXITS eq. 11).

    The target is a constant: gradients reach the student only through the first Dice
    argument, never through the CRF or the teacher (the teacher is an EMA of the student,
    not trained by backprop). The squared Dice is minimised exactly at M = target, so the
    soft CRF output can be used as is.

    Args:
        student_prob: (B, 1, H, W) student foreground probability (requires grad).
        teacher_prob: (B, 1, H, W) EMA-teacher foreground probability.
        image: (B, 3, H, W) crop, uint8 or float in [0, 1], same H, W.
        impl: CRF implementation, ``"meanfield"`` (on the training device) or ``"dense"``.
        eps: Dice smoothing.
        reduction: ``"none"`` -> (B,), ``"mean"`` / ``"sum"`` -> scalar.
        **crf_params: CRF parameters (``iters``, ``sxy_bilateral``, ``srgb``, ...).
    Returns:
        (B,) per-object losses or their reduction.
    """
    if student_prob.shape != teacher_prob.shape:
        raise ValueError(f"student {tuple(student_prob.shape)} and teacher {tuple(teacher_prob.shape)} differ")
    target = crf_target(student_prob, teacher_prob, image, impl=impl, **crf_params)
    return dice_loss(student_prob, target, eps=eps, reduction=reduction)
