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

    After every optimizer step t = 0, 1, 2, ... (t = updates done before this one), for
    each parameter:
        theta_teacher <- d_t * theta_teacher + (1 - d_t) * theta_student,
        d_t = d                                  (warmup=False)
        d_t = min(d, (1 + t) / (10 + t))         (warmup=True; d = ``decay`` in [0, 1))
    and every buffer (e.g. BatchNorm running stats) is copied from the student, because
    buffers are statistics of the current student, not weights to average. With d = 0 the
    teacher is a copy of the student; d -> 1 freezes it.

    Why the warm-up (issue 13): without it the teacher keeps d^t of the random initial
    weights — with d = 0.99 and 8 steps an epoch, 85% when the CRF loss starts after 2
    epochs and 13% after 25 — and the teacher builds the CRF target and, saved at the end,
    labels every object. With the warm-up the initial weights' share after t steps is
    prod_{s<t} d_s = 9! t! / (t+9)! for t up to the point where d_t reaches d: 0.5% after 8
    steps, 2e-5 after 16; the teacher then averages over the last ~1/(1 - d_t) steps
    (the schedule of TensorFlow's ExponentialMovingAverage with num_updates).
    The teacher is a deep copy of the (unwrapped) student at construction, kept in eval mode
    with ``requires_grad=False``; call ``teacher(...)`` under ``torch.no_grad()``.
    Under DDP all ranks hold identical student weights after each step (gradients are
    averaged), so teachers built after the DDP wrap stay identical across ranks too.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.teacher = copy.deepcopy(unwrap_model(model))
        self.teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (the student, wrapped or not)."""
        student = unwrap_model(model)
        d = self.current_decay()
        teacher_params = dict(self.teacher.named_parameters())
        for name, param in student.named_parameters():
            target = teacher_params[name]
            target.mul_(d).add_(param.detach().to(target.dtype), alpha=1.0 - d)
        teacher_buffers = dict(self.teacher.named_buffers())
        for name, buffer in student.named_buffers():
            teacher_buffers[name].copy_(buffer)
        self.updates += 1

    def current_decay(self) -> float:
        """d_t of the next update (see class docstring)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "decay": self.decay, "warmup": self.warmup, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.updates = int(state["updates"])
