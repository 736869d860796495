"""Does the learned part add value when it learns from the refined masks? (issue 28, item 2)

    python bench/bench_self_training.py RUN --gt GT_JSON [--epochs 8] [--top 0.6]
        [--weights 0.15 0.3 0.5] [--out bench/results/self_training_<name>.json]

Self-training round (BoxTeacher / MAL style): the run's final pseudo masks (after the
image-level CRF) whose triage score is in the top ``--top`` fraction become mask targets,
and the run's trained generator is fine-tuned for ``--epochs`` on

    L = L_EXITS (the run's own stage-1c loss, unchanged) + lambda_self * Dice(M ⊙ s, T ⊙ s)

M (B, 1, S, S) the generator's probability, T (B, S, S) the selected final mask cut to the
crop (``exits.data.crops.crop_mask`` >= 0.5), s (B,) 1 for the selected objects. The EMA
teacher of the fine-tuning is the new generator. Stage 1d is then recomputed with the old and
the new generator (in this process, every object as one shard): the generator's own mask
(``pseudo.refine_at: none``) and the final mask (``image``) at each ``--weights`` prior
weight w of the image CRF (trust in the generator; 0.15 is the default). mIoU all / separated
against ``--gt`` (evaluation only: GT never reaches the fine-tuning). The run folder is not
modified (a scratch copy with links holds the new generator).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.config import load_config  # noqa: E402
from exits.data.crops import crop_mask  # noqa: E402
from exits.engine import train  # noqa: E402
from exits.io import write_json  # noqa: E402
from exits.losses.dice import dice_loss  # noqa: E402
from exits.models import save_mask_model  # noqa: E402
from exits.models.factory import load_mask_model  # noqa: E402
from exits.pipeline import generator_task, shard_dataset, stage_pseudo_shard  # noqa: E402
from exits.run_folder import RunFolder  # noqa: E402
from exits.stages.common import train_settings  # noqa: E402
from exits.stages.generator import GeneratorTask, SparseLabels  # noqa: E402
from exits.stages.report import evaluate_masks  # noqa: E402


class SelfTrainingTask:
    """The run's stage-1c loss plus lambda_self * Dice against the selected final masks."""

    def __init__(self, base: GeneratorTask, targets: torch.Tensor, selected: torch.Tensor, weight: float):
        self.base, self.targets, self.selected, self.weight = base, targets, selected, float(weight)

    def on_epoch_start(self, epoch: int, rng: np.random.Generator) -> None:
        self.base.on_epoch_start(epoch, rng)

    def loss(self, model, batch, teacher, epoch):
        total, parts = self.base.loss(model, batch, teacher, epoch)
        index = batch["index"].cpu()
        sel = self.selected[index]
        if bool(sel.any()):
            prob = torch.sigmoid(model(batch["image"][sel.to(batch["image"].device)]).float())
            target = self.targets[index][sel].float()[:, None].to(prob.device)
            l_self = dice_loss(prob, target)
            total = total + self.weight * l_self
            parts["self"] = float(l_self.detach())
        return total, parts


def final_mask_targets(run: RunFolder, ann_ids: list[int], windows) -> tuple[torch.Tensor, np.ndarray]:
    """(K, S, S) bool final masks cut to each object's crop and (K,) triage scores, in ``ann_ids`` order."""
    t = pq.read_table(run.pseudo_parquet, columns=["ann_id", "rle_counts", "height", "width", "score"]).to_pydict()
    row = {a: i for i, a in enumerate(t["ann_id"])}
    size = windows[0].size
    out = torch.zeros((len(ann_ids), size, size), dtype=torch.bool)
    scores = np.full(len(ann_ids), -np.inf)
    for k, (a, win) in enumerate(zip(ann_ids, windows)):
        i = row.get(a)
        if i is None or not t["rle_counts"][i]:
            continue
        m = mask_utils.decode({"size": [t["height"][i], t["width"][i]], "counts": t["rle_counts"][i]})
        out[k] = crop_mask(torch.from_numpy(m.astype(np.float32)), win) >= 0.5
        scores[k] = float(t["score"][i])
    return out, scores


def scratch_run(run: RunFolder, generator: Path, tmp: Path) -> RunFolder:
    """A run folder in ``tmp`` that links the run's files and holds ``generator``."""
    for name in ("instances.parquet", "points.parquet", "config.yaml", "run.json"):
        (tmp / name).symlink_to((run.root / name).resolve())
    (tmp / "generator").mkdir()
    (tmp / "generator" / "model.pt").symlink_to(generator.resolve())
    return RunFolder(tmp)


def evaluate_1d(cfg, images: Path, run: RunFolder, gt: Path, refine_at: str, weight: float | None,
                threshold: float | None = None) -> dict:
    p = cfg.pseudo.model_copy(update={"refine_at": refine_at, "threshold": cfg.pseudo.threshold if threshold is None else threshold,
                                      "image_crf": {**cfg.pseudo.image_crf, **({} if weight is None else {"prior_weight": weight})}})
    c = cfg.model_copy(update={"pseudo": p})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shard = stage_pseudo_shard(c, images, run, 0, run.num_instances(), Path(tmp) / "pseudo.parquet", torch.device("cpu"))
        t = pq.read_table(shard, columns=["ann_id", "rle_counts", "height", "width"]).to_pydict()
    pred = {a: {"size": [h, w], "counts": r} for a, r, h, w in zip(t["ann_id"], t["rle_counts"], t["height"], t["width"])}
    summary, _ = evaluate_masks(pred, gt)
    return {"refine_at": refine_at, "prior_weight": weight, "threshold": p.threshold, "miou_all": round(100 * summary["all"]["miou"], 2),
            "miou_separated": round(100 * summary["separated"]["miou"], 2), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--gt", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--top", type=float, default=0.6)
    ap.add_argument("--lambda-self", type=float, default=1.0)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.15, 0.3, 0.5])
    ap.add_argument("--no-crf-loss", action="store_true", help="fine-tune without the EXITS CRF loss term")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[],
                    help="only evaluate the run's generator's own mask at these thresholds, then stop")
    ap.add_argument("--skip-before", action="store_true", help="only the self-trained generator")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = RunFolder(args.run)
    cfg = load_config(str(run.config))
    images = Path(json.loads(run.run_meta.read_text())["images"])
    out_path = args.out or ROOT / "bench" / "results" / f"self_training_{args.run.name}.json"
    result = {"run": str(args.run), "gt": str(args.gt), "epochs": args.epochs, "lr": args.lr, "top": args.top,
              "lambda_self": args.lambda_self, "before": [], "after": []}
    if args.thresholds:
        result["thresholds"] = [evaluate_1d(cfg, images, run, args.gt, "none", None, t) for t in args.thresholds]
        print(result["thresholds"])
        write_json(out_path, result, indent=1)
        return
    if not args.skip_before:
        result["before"].append(evaluate_1d(cfg, images, run, args.gt, "none", None))
        for w in args.weights:
            result["before"].append(evaluate_1d(cfg, images, run, args.gt, "image", w))
        print("before", result["before"], flush=True)
    table, dataset = shard_dataset(run, images, cfg.data.crop_size, 0, run.num_instances())
    targets, scores = final_mask_targets(run, list(dataset.ann_ids), dataset.windows)
    k = int(round(args.top * len(scores)))
    selected = torch.zeros(len(scores), dtype=torch.bool)
    selected[np.argsort(-scores, kind="stable")[:k]] = True
    if args.no_crf_loss:
        cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"lambda_crf": 0.0})})
    result["lambda_crf"] = cfg.generator.lambda_crf
    base = generator_task(cfg, dataset, SparseLabels.from_table(pq.read_table(run.points)))
    task = SelfTrainingTask(base, targets, selected, args.lambda_self)
    optim = cfg.generator.optim.model_copy(update={"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0})
    model = load_mask_model(run.generator)
    with tempfile.TemporaryDirectory() as tmp:
        settings = train_settings(optim, seed=cfg.seed + 7, device="cpu", amp=False, checkpoint_dir=None,
                                  ema_decay=cfg.generator.ema_decay)
        t0 = time.perf_counter()
        res = train(model, dataset, task, settings, progress=False)
        result["train_seconds"] = round(time.perf_counter() - t0, 1)
        result["history"] = res.history
        new = Path(tmp) / "self_trained.pt"
        save_mask_model(new, res.teacher if res.teacher is not None else res.model)
        scratch = Path(tmp) / "run"
        scratch.mkdir()
        srun = scratch_run(run, new, scratch)
        result["after"].append(evaluate_1d(cfg, images, srun, args.gt, "none", None))
        for w in args.weights:
            result["after"].append(evaluate_1d(cfg, images, srun, args.gt, "image", w))
    print("after", result["after"], flush=True)
    write_json(out_path, result, indent=1)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
