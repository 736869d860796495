"""Exponential-moving-average (EMA) teacher of a student model (mean teacher).

The EXITS pseudo-label generator's CRF loss compares the student against a target built
from the average of student and teacher predictions; the teacher is a slowly moving average
of the student's weights, which is smoother than any single student snapshot.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class ModelEMA:
    """Teacher = EMA of the student's parameters; buffers are copied.

    After every optimizer step, for each parameter:
        theta_teacher <- d * theta_teacher + (1 - d) * theta_student,   d = ``decay`` in [0, 1)
    and every buffer (e.g. BatchNorm running stats) is copied from the student, because
    buffers are statistics of the current student, not weights to average. With d = 0 the
    teacher is a copy of the student; d -> 1 freezes it.

    The teacher is a deep copy of the (unwrapped) student at construction, kept in eval mode
    with ``requires_grad=False``; call ``teacher(...)`` under ``torch.no_grad()``.
    Under DDP all ranks hold identical student weights after each step (gradients are
    averaged), so teachers built after the DDP wrap stay identical across ranks too.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.teacher = copy.deepcopy(unwrap_model(model))
        self.teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (the student, wrapped or not)."""
        student = unwrap_model(model)
        d = self.decay
        teacher_params = dict(self.teacher.named_parameters())
        for name, param in student.named_parameters():
            target = teacher_params[name]
            target.mul_(d).add_(param.detach().to(target.dtype), alpha=1.0 - d)
        teacher_buffers = dict(self.teacher.named_buffers())
        for name, buffer in student.named_buffers():
            teacher_buffers[name].copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.updates = int(state["updates"])
