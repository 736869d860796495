"""Training with Detectron2's DefaultTrainer, writing the torchvision backend's out_dir layout.

``out_dir/last_checkpoint.pth``: ``{"model", "trainer" (optimizer, scheduler, AMP scaler
states as Detectron2 keeps them), "iteration" (completed iterations), "history", "meta"}``,
written every ``checkpoint_every`` iterations and at the end; ``out_dir/model_final.pth``:
``{"model", "meta"}`` with ``meta["iteration"]``; ``out_dir/train_log.json``:
``{"iterations", "history": [{"iteration", "lr", "loss", "seconds", "loss_*"...}]}``. With
an eval set, ``out_dir/eval_metrics.json``: ``{"gt_json", "evaluator", "history": [{"iteration",
"format", "<format>": {"bbox": {...}, "segm": {...}}}]}`` in [0, 1] (-1.0: no GT in a bucket),
the convention of :mod:`detectors.evaluation`. These are written atomically.

Beside them, what Detectron2 users look for in an output folder:

- ``metrics.json``: Detectron2's JSONWriter (one json line per 20 iterations and at the
  end: losses, lr, timings and, after an evaluation, ``bbox/AP``... in percent, as
  Detectron2 reports them; appended to on resume, as Detectron2 does);
- ``events.out.tfevents.*``: the same scalars for TensorBoard (Detectron2's
  TensorboardXWriter), when ``tensorboard`` is installed (a dependency of a pip-installed
  Detectron2); without it a warning says so and the other files are written;
- ``last_checkpoint``: Detectron2's checkpoint tag, the name of the latest full checkpoint
  (``last_checkpoint.pth``), so ``DetectionCheckpointer(model, out_dir).resume_or_load(...,
  resume=True)`` finds and loads it (its ``"model"`` and ``"trainer"`` keys are the ones
  DefaultTrainer's checkpointer reads).

Detectron2's own periodic checkpointer is not used (its ``model_NNNNNNN.pth`` files are not
the shared layout).

Resume restores model, optimizer, scheduler, AMP scaler and the iteration count. Unlike the
torchvision backend it does not replay the exact batches: Detectron2's infinite sampler
restarts its (seeded) stream.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.modeling import build_model
from detectron2.solver import get_default_optimizer_params
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter

from detectors.config import DetectorConfig
from detectors.evaluation import COCO_STAT_NAMES, LVIS_STAT_NAMES, numpy_float_alias
from exits.io import atomic_open, atomic_path, write_json

log = logging.getLogger(__name__)

# The torchvision backend's file names (detectors/torchvision_backend/engine.py).
LAST_CHECKPOINT = "last_checkpoint.pth"
FINAL_CHECKPOINT = "model_final.pth"
TRAIN_LOG = "train_log.json"
EVAL_METRICS = "eval_metrics.json"
# Detectron2's names (JSONWriter's file in default_writers; fvcore Checkpointer's tag file).
D2_METRICS = "metrics.json"
D2_CHECKPOINT_TAG = "last_checkpoint"


def with_full_model_clipping(optimizer_cls: type[torch.optim.Optimizer], max_norm: float) -> type[torch.optim.Optimizer]:
    """``optimizer_cls`` whose ``step`` first clips the gradient norm of all parameters.

    g <- g * min(1, max_norm / ||g||_2), ||g||_2 over every parameter together (the torchvision
    backend's clipping; Detectron2's CLIP_GRADIENTS clips each parameter on its own). Under
    AMP, GradScaler.step unscales before calling ``step``, so the norm is of true gradients.
    """

    class FullModelClipped(optimizer_cls):  # type: ignore[valid-type, misc]
        def step(self, closure=None):  # noqa: ANN001, ANN201
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelClipped.__name__ = f"{optimizer_cls.__name__}FullModelClipped"
    return FullModelClipped


def _fraction(value: Any) -> float:
    """Detectron2 reports AP in percent with NaN for an empty bucket; ours is [0, 1] and -1."""
    v = float(value)
    return -1.0 if v != v else v / 100.0


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def save_last_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """:func:`save_checkpoint`, then Detectron2's ``last_checkpoint`` tag naming it (as
    fvcore's ``Checkpointer.tag_last_checkpoint`` writes it: the bare file name)."""
    save_checkpoint(path, payload)
    with atomic_open(path.parent / D2_CHECKPOINT_TAG) as fh:
        fh.write(path.name)
    return path


def tensorboard_missing() -> str | None:
    """Why TensorBoard events cannot be written (``None`` when they can)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception as exc:  # ImportError without tensorboard; anything it raises on import
        return f"{type(exc).__name__}: {exc}"
    return None


def event_writers(out_dir: Path, max_iter: int) -> list[EventWriter]:
    """Detectron2's ``default_writers`` (printer, ``metrics.json``, TensorBoard events), less
    the TensorBoard writer when tensorboard cannot be imported (it would only fail at the
    first write, 20 iterations in)."""
    writers: list[EventWriter] = [CommonMetricPrinter(max_iter), JSONWriter(str(out_dir / D2_METRICS))]
    missing = tensorboard_missing()
    if missing is None:
        writers.append(TensorboardXWriter(str(out_dir)))
    else:
        log.warning("no TensorBoard events in %s: tensorboard is not importable (%s); pip install tensorboard. "
                    "%s has the same scalars.", out_dir, missing, D2_METRICS)
    return writers


class HistoryHook(HookBase):
    """Appends the torchvision backend's per-iteration record to ``history``.

    Runs after Detectron2's LRScheduler hook (which stores this step's lr) and after the
    step wrote its losses to the event storage.
    """

    def __init__(self, history: list[dict[str, float]]) -> None:
        self.history = history
        self._tick = time.perf_counter()

    def before_step(self) -> None:
        self._tick = time.perf_counter()

    def after_step(self) -> None:
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        record = {"iteration": it, "lr": float(latest["lr"][0]), "loss": float(latest["total_loss"][0]),
                  "seconds": time.perf_counter() - self._tick}
        record.update({k: float(v) for k, (v, i) in latest.items() if k.startswith("loss_") and i == it})
        self.history.append(record)


class CheckpointHook(HookBase):
    """Saves ``last_checkpoint.pth`` (and the ``last_checkpoint`` tag) every ``period``
    iterations and after the last one."""

    def __init__(self, path: Path, period: int, payload_fn: Callable[[int], dict[str, Any]]) -> None:
        self.path, self.period, self.payload_fn = path, period, payload_fn

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period and done % self.period == 0 and done < self.trainer.max_iter:
            save_last_checkpoint(self.path, self.payload_fn(done))

    def after_train(self) -> None:
        # trainer.iter == max_iter only when the loop finished (Detectron2's convention).
        if self.trainer.iter >= self.trainer.max_iter:
            save_last_checkpoint(self.path, self.payload_fn(self.trainer.max_iter))


class ExitsTrainer(DefaultTrainer):
    """DefaultTrainer evaluating with COCOEvaluator / LVISEvaluator, saving in our layout."""

    def __init__(self, cfg: CfgNode, out_dir: Path, meta: dict[str, Any], history: list[dict[str, float]],
                 eval_history: list[dict[str, Any]], eval_json: str | None) -> None:
        # Set before super().__init__, which calls build_hooks.
        self.out_dir, self.meta, self.history = Path(out_dir), meta, history
        self.eval_history, self.eval_json = eval_history, eval_json
        super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        return build_model(cfg)  # DefaultTrainer's also logs the whole architecture

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """SGD (momentum) or AdamW over Detectron2's parameter groups (no decay on norms)."""
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        kwargs: dict[str, Any] = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
        if cfg.EXITS.OPTIMIZER == "sgd":
            opt_cls: type[torch.optim.Optimizer] = torch.optim.SGD
            kwargs["momentum"] = cfg.SOLVER.MOMENTUM
        else:
            opt_cls = torch.optim.AdamW
        if cfg.EXITS.GRAD_CLIP_NORM > 0:
            opt_cls = with_full_model_clipping(opt_cls, cfg.EXITS.GRAD_CLIP_NORM)
        return opt_cls(params, **kwargs)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        """LVISEvaluator for an LVIS-format GT json, COCOEvaluator otherwise (bbox + segm)."""
        if MetadataCatalog.get(dataset_name).evaluator_type == "lvis":
            return LVISEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=False, output_dir=None)
        # use_fast_impl=False: the fast one needs the compiled extension; the official one is
        # what detectors.evaluation runs too.
        return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=False, output_dir=None,
                             use_fast_impl=False)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):  # noqa: ANN001, ANN206
        with numpy_float_alias():  # lvis 0.5.3 needs np.float (see detectors.evaluation)
            return super().test(cfg, model, evaluators)

    def build_writers(self) -> list[EventWriter]:
        return event_writers(self.out_dir, self.max_iter)

    def _payload(self, done: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "trainer": self.state_dict(), "iteration": done,
                "history": list(self.history), "meta": self.meta}

    def _evaluate(self) -> dict[str, Any]:
        results = self.test(self.cfg, self.model)
        fmt = MetadataCatalog.get(self.cfg.DATASETS.TEST[0]).evaluator_type
        names = LVIS_STAT_NAMES if fmt == "lvis" else COCO_STAT_NAMES
        done = self.iter + 1 if self.iter < self.max_iter else self.max_iter
        record = {"iteration": done, "format": fmt,
                  fmt: {t: {n: _fraction(res[n]) for n in names if n in res} for t, res in results.items()}}
        self.eval_history.append(record)
        write_json(self.out_dir / EVAL_METRICS, {
            "gt_json": self.eval_json, "evaluator": "LVISEvaluator" if fmt == "lvis" else "COCOEvaluator",
            "history": self.eval_history}, indent=1)
        return results

    def build_hooks(self) -> list[HookBase]:
        """Detectron2's hooks with its checkpointer and eval replaced by ours, in this order:
        timer, lr scheduler, history, checkpoint, eval, log printer."""
        out: list[HookBase] = []
        for h in super().build_hooks():
            if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook)):
                continue
            if isinstance(h, hooks.PeriodicWriter):
                out.append(HistoryHook(self.history))
                out.append(CheckpointHook(self.out_dir / LAST_CHECKPOINT, self.cfg.SOLVER.CHECKPOINT_PERIOD,
                                          self._payload))
                if len(self.cfg.DATASETS.TEST):
                    out.append(hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate))
            out.append(h)
        return out


def _previous_eval_history(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, "r", encoding="utf-8") as fh:
        return [r for r in json.load(fh).get("history", []) if int(r["iteration"]) <= upto]


def train_detectron2(d2cfg: CfgNode, cfg: DetectorConfig, out_dir: str | Path, meta: dict[str, Any],
                     eval_json: str | None = None) -> Path:
    """Train for ``d2cfg.SOLVER.MAX_ITER`` iterations; return ``out_dir/model_final.pth``.

    Resumes from ``out_dir/last_checkpoint.pth`` when present (same categories required).

    Raises:
        ValueError: the checkpoint in ``out_dir`` was trained on other categories.
        FloatingPointError: a non-finite loss (raised by Detectron2's trainer).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, final_path = out / LAST_CHECKPOINT, out / FINAL_CHECKPOINT
    meta = {**meta, "detectron2_config": d2cfg.dump()}
    state, start, history = None, 0, []
    if last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state["meta"].get("category_ids") != meta.get("category_ids"):
            raise ValueError(f"{last_path} was trained on other categories; use a fresh out_dir")
        start, history = int(state["iteration"]), list(state.get("history", []))
        log.info("resuming from %s at iteration %d", last_path, start)
        if start >= cfg.iterations and final_path.exists():
            return final_path
    seed_all_rng(cfg.seed)  # python, numpy and torch generators: model init and sampling
    trainer = ExitsTrainer(d2cfg, out, meta, history, _previous_eval_history(out / EVAL_METRICS, start), eval_json)
    if state is None:
        trainer.resume_or_load(resume=False)  # loads MODEL.WEIGHTS when it names a file
    else:
        trainer.model.load_state_dict(state["model"])
        trainer.load_state_dict(state["trainer"])
        trainer.start_iter = start
    done = start
    if start < trainer.max_iter:
        trainer.train()
        done = trainer.max_iter
    save_checkpoint(final_path, {"model": trainer.model.state_dict(), "meta": {**meta, "iteration": done}})
    write_json(out / TRAIN_LOG, {"iterations": done, "history": history}, indent=1)
    return final_path
