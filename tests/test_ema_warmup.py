"""EMA teacher warm-up: the teacher follows the student early instead of the random init."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from exits.engine import ModelEMA, TrainSettings, train


def _pair() -> tuple[nn.Linear, ModelEMA, ModelEMA]:
    student = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(0.0)  # the "random init" the teacher starts from
    plain, warm = ModelEMA(student, decay=0.99), ModelEMA(student, decay=0.99, warmup=True)
    with torch.no_grad():
        student.weight.fill_(1.0)  # the trained student, held fixed
    return student, plain, warm


def test_teacher_weight_after_k_steps_follows_the_warmup_schedule() -> None:
    student, plain, warm = _pair()
    for k in range(1, 201):
        plain.update(student)
        warm.update(student)
        # Share of the initial weight left in the teacher = prod_{t<k} d_t.
        init_share_warm = math.prod(min(0.99, (1 + t) / (10 + t)) for t in range(k))
        assert abs(warm.teacher.weight.item() - (1.0 - init_share_warm)) < 1e-6
        assert abs(plain.teacher.weight.item() - (1.0 - 0.99 ** k)) < 1e-5
        if k == 16:  # the demo's CRF start (2 epochs x 8 steps)
            assert plain.teacher.weight.item() < 0.16  # 85% of the init is left without warm-up
            assert warm.teacher.weight.item() > 0.9999
    assert abs(warm.current_decay() - 201 / 210) < 1e-12  # still ramping: d is reached at t = 890
    assert plain.teacher.weight.item() < 0.87  # 13% init left after 200 steps, as issue 13 found


def test_warmup_state_round_trips() -> None:
    student, _, warm = _pair()
    for _ in range(5):
        warm.update(student)
    other = ModelEMA(student, decay=0.99, warmup=True)
    other.load_state_dict(warm.state_dict())
    assert other.updates == 5 and other.current_decay() == warm.current_decay() == 6 / 15


def test_teacher_tracks_the_student_early_in_training() -> None:
    """After 2 epochs of real training the warm teacher is close to the student; the plain
    one is still close to its random init."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))

    class Task:
        def loss(self, model, batch, teacher, epoch):
            xb, yb = batch
            loss = ((model(xb) - yb) ** 2).mean()
            return loss, {}

    def run(warmup: bool) -> tuple[float, float]:
        torch.manual_seed(1)
        model = nn.Linear(4, 1)
        init = model.weight.detach().clone()
        settings = TrainSettings(epochs=2, batch_size=8, lr=0.2, warmup_epochs=0, seed=0, device="cpu",
                                 ema_decay=0.99, ema_warmup=warmup)
        res = train(model, data, Task(), settings, progress=False)
        to_student = (res.teacher.weight - res.model.weight).norm().item()
        return to_student, (res.model.weight - init).norm().item()

    warm_gap, moved = run(True)
    plain_gap, _ = run(False)
    assert moved > 1.0  # the student really moved away from its init
    assert warm_gap < 0.2 * moved
    assert plain_gap > 0.7 * moved
