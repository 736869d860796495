"""Training engine: LR schedule, EMA, weight-decay groups, determinism, exact resume, DDP."""
from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from exits.engine import (
    LAST_CHECKPOINT,
    ModelEMA,
    TrainSettings,
    build_optimizer,
    build_scheduler,
    cleanup_distributed,
    load_checkpoint,
    lr_at,
    move_to_device,
    resolve_device,
    train,
)
from exits.engine.optim import no_decay_parameter_names

# ---------------------------------------------------------------- toy problem


def regression_dataset(n: int = 64, dim: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = torch.sin(x @ w) + 0.5 * x[:, :1]
    return TensorDataset(x, y)


def mlp(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(dropout), nn.LayerNorm(32), nn.Linear(32, 1))


class MseTask:
    """Mean-squared error (a mean over the batch, as the engine requires); with a teacher,
    adds a consistency term so the teacher's weights influence the student."""

    def __init__(self, crash_at_epoch: int | None = None) -> None:
        self.crash_at_epoch = crash_at_epoch
        self.epochs_seen: list[int] = []
        self.rng_draws: list[float] = []

    def on_epoch_start(self, epoch: int, rng: np.random.Generator) -> None:
        if epoch == self.crash_at_epoch:
            raise KeyboardInterrupt("simulated kill")
        self.epochs_seen.append(epoch)
        self.rng_draws.append(float(rng.random()))

    def loss(self, model, batch, teacher, epoch):
        x, y = batch
        pred = model(x)
        mse = nn.functional.mse_loss(pred, y)
        parts = {"mse": mse.item()}
        if teacher is None:
            return mse, parts
        with torch.no_grad():
            target = teacher(x)
        consistency = nn.functional.mse_loss(pred, target)
        parts["consistency"] = consistency.item()
        return mse + 0.1 * consistency, parts


def full_mse(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        return nn.functional.mse_loss(model(x), y).item()


def settings(**kw) -> TrainSettings:
    base = dict(epochs=3, batch_size=16, lr=1e-2, warmup_epochs=1.0, device="cpu", log_every=2)
    base.update(kw)
    return TrainSettings(**base)


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        diff = (sa[key].float() - sb[key].float()).abs().max().item()
        assert diff <= atol, f"{key}: max diff {diff}"


# ---------------------------------------------------------------- pure pieces


def test_lr_schedule_values() -> None:
    total, warm, base = 100, 10, 2.0
    assert lr_at(0, total, warm, base) == pytest.approx(0.2)  # warm-up start: base / warmup
    assert lr_at(4, total, warm, base) == pytest.approx(1.0)
    assert lr_at(9, total, warm, base) == pytest.approx(base)  # peak at the end of warm-up
    assert lr_at(10, total, warm, base) == pytest.approx(base)  # cosine starts at the peak
    assert lr_at(55, total, warm, base) == pytest.approx(1.0)  # cosine half-way: base / 2
    assert lr_at(99, total, warm, base) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(99, total, warm, base) < 1e-3
    assert lr_at(100, total, warm, base) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, total, warm, base, min_lr=0.01) == 0.01
    assert lr_at(0, total, 0, base) == pytest.approx(base)  # no warm-up
    lrs = [lr_at(s, total, warm, base) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    assert all(a > b for a, b in zip(lrs[warm:-1], lrs[warm + 1:]))
    with pytest.raises(ValueError):
        lr_at(0, 10, 11, base)


def test_scheduler_follows_lr_at_for_every_group() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = build_optimizer(model, lr=0.5, weight_decay=0.1)
    optimizer.param_groups[1]["lr"] = 0.5  # both groups start at base
    scheduler = build_scheduler(optimizer, total_steps=20, warmup_steps=4)
    for step in range(20):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(lr_at(step, 20, 4, 0.5))
        optimizer.step()
        scheduler.step()


def test_no_decay_param_groups() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.gamma = nn.Parameter(torch.ones(8))  # layer scale, 1-D
            self.rel_table = nn.Parameter(torch.zeros(3, 2))  # declared below

        def no_weight_decay(self):
            return {"rel_table"}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.conv = nn.Conv2d(3, 8, 3)
            self.block = Block()
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    net = Net()
    assert no_decay_parameter_names(net) == {
        "pos_embed", "cls_token", "conv.bias", "block.proj.bias", "block.norm.weight",
        "block.norm.bias", "block.gamma", "block.rel_table",
    }
    optimizer = build_optimizer(net, lr=1e-3, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert decayed == {id(net.conv.weight), id(net.block.proj.weight)}
    assert len(groups["no_decay"]["params"]) == 8
    all_ids = decayed | {id(p) for p in groups["no_decay"]["params"]}
    assert id(net.frozen.weight) not in all_ids and id(net.frozen.bias) not in all_ids


def test_ema_update_formula() -> None:
    student = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = ModelEMA(student, decay=0.9)
    teacher = ema.teacher
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        teacher[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        teacher[0].bias.fill_(0.0)
        student[0].weight.copy_(torch.tensor([[3.0, -2.0]]))
        student[0].bias.fill_(10.0)
        student[1].running_mean.fill_(7.0)
    student[1].num_batches_tracked.fill_(5)
    ema.update(student)
    # 0.9 * teacher + 0.1 * student
    assert torch.allclose(teacher[0].weight, torch.tensor([[1.2, 1.6]]))
    assert torch.allclose(teacher[0].bias, torch.tensor([1.0]))
    assert teacher[1].running_mean.item() == 7.0  # buffers copied, not averaged
    assert teacher[1].num_batches_tracked.item() == 5
    ema.update(student)
    assert torch.allclose(teacher[0].weight, torch.tensor([[0.9 * 1.2 + 0.3, 0.9 * 1.6 - 0.2]]))
    assert ema.updates == 2
    assert teacher[0].weight.data_ptr() != student[0].weight.data_ptr()
    with pytest.raises(ValueError):
        ModelEMA(student, decay=1.0)


def test_move_to_device_keeps_structure() -> None:
    @dataclasses.dataclass(frozen=True)
    class Batch:
        image: torch.Tensor
        names: list[str]

    Pair = namedtuple("Pair", "a b")
    batch = {"x": torch.ones(2), "nested": [Pair(torch.zeros(1), 3), (torch.ones(3), "s")], "b": Batch(torch.ones(1), ["n"])}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta"
    assert isinstance(moved["nested"][0], Pair) and moved["nested"][0].a.is_meta and moved["nested"][0].b == 3
    assert isinstance(moved["nested"][1], tuple) and moved["nested"][1][0].is_meta and moved["nested"][1][1] == "s"
    assert isinstance(moved["b"], Batch) and moved["b"].image.is_meta and moved["b"].names == ["n"]
    assert batch["x"].device.type == "cpu"


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        TrainSettings(epochs=0, batch_size=1, lr=1.0)


# ---------------------------------------------------------------- the loop


def test_loss_goes_down_and_history_is_complete() -> None:
    data = regression_dataset()
    model = mlp(0)
    before = full_mse(model, data)
    result = train(model, data, MseTask(), settings(epochs=8), progress=False)
    after = full_mse(result.model, data)
    assert after < 0.5 * before, (before, after)
    assert result.teacher is None and not result.model.training
    assert [h["epoch"] for h in result.history] == list(range(8))
    assert all(h["steps"] == 4 for h in result.history)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.history[0]["loss"] == pytest.approx(result.history[0]["mse"])
    assert all(0 < h["grad_norm"] for h in result.history)
    assert result.history[0]["lr"] == pytest.approx(1e-2)  # peak at the end of warm-up epoch
    assert result.history[-1]["lr"] < 1e-3


def test_seeded_runs_are_identical() -> None:
    data = regression_dataset()
    kw = dict(ema_decay=0.8)
    a = train(mlp(1, dropout=0.2), data, MseTask(), settings(seed=5, **kw), progress=False)
    b = train(mlp(1, dropout=0.2), data, MseTask(), settings(seed=5, **kw), progress=False)
    c = train(mlp(1, dropout=0.2), data, MseTask(), settings(seed=6, **kw), progress=False)
    assert_same_weights(a.model, b.model)
    assert_same_weights(a.teacher, b.teacher)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    with pytest.raises(AssertionError):
        assert_same_weights(a.model, c.model, atol=1e-6)  # the seed matters (order, dropout)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    data = regression_dataset()
    run = dict(epochs=3, ema_decay=0.7, seed=3)
    full_task = MseTask()
    full = train(mlp(2, dropout=0.2), data, full_task, settings(**run), progress=False)

    ckpt_dir = tmp_path / "ckpt"
    crashing = MseTask(crash_at_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        train(mlp(2, dropout=0.2), data, crashing, settings(checkpoint_dir=str(ckpt_dir), **run), progress=False)
    saved = load_checkpoint(ckpt_dir / LAST_CHECKPOINT)
    assert saved["epoch"] == 1 and saved["global_step"] == 8 and len(saved["history"]) == 2
    assert [p.name for p in ckpt_dir.iterdir()] == [LAST_CHECKPOINT]  # no temporary files left

    resumed_task = MseTask()
    # Different initial weights: everything must come from the checkpoint.
    resumed = train(mlp(99, dropout=0.2), data, resumed_task, settings(checkpoint_dir=str(ckpt_dir), **run), progress=False)
    assert resumed_task.epochs_seen == [2]
    assert resumed_task.rng_draws == full_task.rng_draws[2:]
    assert_same_weights(full.model, resumed.model, atol=1e-6)
    assert_same_weights(full.teacher, resumed.teacher, atol=1e-6)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)
    assert load_checkpoint(ckpt_dir / LAST_CHECKPOINT)["epoch"] == 2

    # A finished run resumes to a no-op.
    again_task = MseTask()
    again = train(mlp(98), data, again_task, settings(checkpoint_dir=str(ckpt_dir), **run), progress=False)
    assert again_task.epochs_seen == []
    assert_same_weights(full.model, again.model, atol=1e-6)


def test_non_finite_loss_raises() -> None:
    class NanTask:
        def loss(self, model, batch, teacher, epoch):
            return model(batch[0]).mean() * float("nan"), {}

    with pytest.raises(FloatingPointError):
        train(mlp(0), regression_dataset(), NanTask(), settings(epochs=1), progress=False)


# ---------------------------------------------------------------- DDP on CPU (gloo)

DDP_RUN = dict(epochs=2, batch_size=16, lr=1e-2, ema_decay=0.5, seed=11, warmup_epochs=0.5, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    # What torchrun sets for each process; train() joins the group from these.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = train(mlp(4), regression_dataset(), MseTask(), TrainSettings(checkpoint_dir=f"{out_dir}/ckpt", **DDP_RUN), progress=False)
        torch.save({"model": result.model.state_dict(), "teacher": result.teacher.state_dict(), "history": result.history},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        cleanup_distributed()


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = train(mlp(4), regression_dataset(), MseTask(), TrainSettings(**DDP_RUN), progress=False)

    for key in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key
        assert torch.equal(ranks[0]["teacher"][key], ranks[1]["teacher"][key]), key
        assert torch.allclose(ranks[0]["model"][key], single.model.state_dict()[key], atol=1e-5, rtol=0), key
        assert torch.allclose(ranks[0]["teacher"][key], single.teacher.state_dict()[key], atol=1e-5, rtol=0), key
    assert not torch.allclose(ranks[0]["model"]["0.weight"], mlp(4)[0].weight)  # it did train
    for h_ddp, h_single in zip(ranks[0]["history"], single.history, strict=True):
        assert h_ddp["steps"] == h_single["steps"] == 4  # 64 samples / global batch 16
        assert h_ddp["loss"] == pytest.approx(h_single["loss"], abs=1e-5)  # epoch means over both ranks
    saved = load_checkpoint(tmp_path / "ckpt" / LAST_CHECKPOINT)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2 and saved["epoch"] == 1
    assert torch.equal(saved["model"]["0.weight"], ranks[0]["model"]["0.weight"])
