"""Training the click decoder with iterative click simulation (RITM / InterFormer) on cached features.

Per batch (targets = the chosen training masks, see :mod:`exits.interactive.data`):
  1. start: with probability ``p_start_from_mask`` a corrupted copy of the target (an
     existing mask to edit: dilated/eroded, a part dropped, a blob added), else nothing;
  2. first click at the centre of the largest error region of the start;
  3. r rounds without gradient, P(r) = decay^r / sum_{k=0..R} decay^k for r = 0..R
     (InterFormer: up to 20 pre-interactions, exponentially decaying; R =
     ``max_sim_rounds``, decay ``sim_round_decay``): predict, pass the probabilities
     through the click constraint the predictor uses (``constraint``, on the crop;
     :func:`simulated_answer`; ``sim_constraint: false`` keeps only the disks), feed the result back
     as the previous mask, advance the carried 5-state map with it, click at the centre of
     the largest error region;
  4. one prediction with gradient; loss :func:`training_loss`.
The encoder is frozen: its tokens are computed once for all training crops. The crops,
targets and tokens are written once to a temporary folder in WORKDIR/cache and memory-mapped
(:func:`train_click_model`): a step reads its batch's rows only.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from exits.interactive.clicks import Click, click_label_map, state_map, update_with_prediction
from exits.interactive.config import ClickModelConfig
from exits.interactive.constrain import CrfKernels, constrain_clicks
from exits.interactive.data import ClickTrainingSet, build_training_set
from exits.interactive.decoder import ClickDecoder, DecoderOutput, StaticInputs
from exits.interactive.features import encode_crops
from exits.interactive.inference import build_inputs, decode_probs
from exits.interactive.losses import click_loss
from exits.interactive.pem import PrototypeLoss
from exits.interactive.zoom import roi_resample
from exits.interactive.model_io import CLICK_MODEL_PATH, GENERATOR_PATH, save_click_model
from exits.interactive.robot import largest_error_click
from exits.models.factory import load_mask_model
from exits.run_folder import RunFolder

__all__ = ["corrupt_mask", "sample_rounds", "simulated_answer", "simulate_clicks", "training_loss", "train_click_decoder", "encode_to_storage",
           "train_click_model"]

log = logging.getLogger(__name__)


def corrupt_mask(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible imperfect mask of ``target`` (S, S) bool: grow or shrink by 1-4 px, drop
    one connected part (when there are several) with prob. 0.3, add a random disk blob near
    the object with prob. 0.5."""
    out = np.asarray(target, bool).copy()
    iters = int(rng.integers(1, 5))
    out = ndimage.binary_dilation(out, iterations=iters) if rng.random() < 0.5 else ndimage.binary_erosion(out, iterations=iters)
    labels, n = ndimage.label(out)
    if n > 1 and rng.random() < 0.3:
        out &= labels != int(rng.integers(1, n + 1))
    if rng.random() < 0.5:
        s = out.shape[0]
        rows, cols = np.nonzero(target) if target.any() else (np.array([s // 2]), np.array([s // 2]))
        k = int(rng.integers(len(rows)))
        cy, cx = rows[k] + rng.normal(0, s / 8), cols[k] + rng.normal(0, s / 8)
        r = rng.uniform(s / 24, s / 8)
        yy, xx = np.mgrid[:s, :s]
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def sample_rounds(rng: np.random.Generator, max_rounds: int, decay: float) -> int:
    """r in 0..max_rounds with P(r) = decay^r / sum_k decay^k (decay = 1: uniform)."""
    weights = decay ** np.arange(max_rounds + 1, dtype=np.float64)
    return int(rng.choice(max_rounds + 1, p=weights / weights.sum()))


def simulated_answer(prob: np.ndarray, crop: torch.Tensor, clicks: list[Click], config: ClickModelConfig,
                     kernels: dict[int, CrfKernels], key: int) -> np.ndarray:
    """(S, S) bool answer of one simulated round, built as the predictor builds it.

    prob (S, S) decoder probabilities, crop (3, S, S) in [0, 1]. With ``sim_constraint`` the
    configured click ``constraint`` runs on the crop (the predictor runs it on the window at
    the image's pixels, which training does not have; at the demo's 96 px the two grids are
    about the same size), its kernels built once per crop and kept in ``kernels[key]``;
    without, the decoder's mask with the click disks forced (the rule before issue 28)."""
    size = prob.shape[-1]
    if config.sim_constraint and (config.constraint == "none" or not clicks):
        return prob >= 0.5
    if not config.sim_constraint or config.constraint == "disk":
        labels = click_label_map(clicks, (size, size), config.disk_radius)
        return np.where(labels != 0, labels > 0, prob > 0.5)
    image = crop.detach().float().cpu()
    if key not in kernels:
        kernels[key] = CrfKernels(image, max_size=config.crf_max_size, sxy=config.crf_sxy, srgb=config.crf_srgb,
                                  weight=config.crf_w)
    return constrain_clicks(prob, image, clicks, config.disk_radius, method=config.constraint, iters=config.crf_iters,
                            sxy=config.crf_sxy, srgb=config.crf_srgb, weight=config.crf_w, colour=config.crf_colour,
                            max_size=config.crf_max_size, kernels=kernels[key])


def simulate_clicks(decoder: ClickDecoder, tokens: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor,
                    targets: np.ndarray, config: ClickModelConfig, rng: np.random.Generator,
                    static: StaticInputs | None = None
                    ) -> tuple[list[list[Click]], list[np.ndarray | None], list[np.ndarray | None]]:
    """Clicks, previous masks and carried state maps for the final (gradient) step of a batch;
    ``static`` the decoder's click-independent inputs of the batch (None: computed per round)."""
    prevs: list[np.ndarray | None] = []
    clicks: list[list[Click]] = []
    states: list[np.ndarray | None] = []
    size = targets.shape[-1]
    for target in targets:
        prev = corrupt_mask(target, rng) if rng.random() < config.p_start_from_mask else None
        first = largest_error_click(target, prev if prev is not None else np.zeros_like(target))
        prevs.append(prev)
        clicks.append([first] if first is not None else [])
        states.append(None)
    kernels: dict[int, CrfKernels] = {}
    for _ in range(sample_rounds(rng, config.max_sim_rounds, config.sim_round_decay)):
        probs = decode_probs(decoder, tokens, grid, crops, clicks, prevs, states, static=static)
        for i, target in enumerate(targets):
            pred = simulated_answer(probs[i], crops[i], clicks[i], config, kernels, i)
            z = state_map(clicks[i], prevs[i], (size, size), config.disk_radius, states[i])
            states[i] = update_with_prediction(z, pred)
            prevs[i] = pred
            nxt = largest_error_click(target, pred)
            if nxt is not None:
                clicks[i].append(nxt)
    return clicks, prevs, states


def training_loss(out: DecoderOutput, target: torch.Tensor, config: ClickModelConfig,
                  pem: PrototypeLoss | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one decoder output against targets (B, S, S) bool.

        L = L(coarse, T)                                     whole crop (coarse pass)
          + L(refine, T_RoI)                                 zoom on: RoI pixels only, in RoI coords
          + pem_weight * L_PEM(F_last, T_last)               PEM on: the last pass's head features
          + mean_b min_h L(latent_h, T_last)                 diversified training: best head per image
          + mean_h BCE(latent_h, click label | click disks)  ... every head keeps the clicks

    L = the configured loss (NFL / BCE + Dice); T_RoI = the target cut out of each RoI with
    the decoder's own resampling (>= 0.5). Restricting the refinement's loss to the RoI keeps
    the constant outside-RoI pixels from diluting the normaliser; the coarse pass carries the
    whole crop.
    """
    tgt = target.float()
    coarse = out.coarse
    zc = coarse.logits.shape[-1]
    t_c = tgt if zc == tgt.shape[-1] else F.interpolate(tgt[:, None], size=(zc, zc), mode="area")[:, 0]
    terms = {"coarse": click_loss(config.loss, coarse.logits, t_c >= 0.5, config.focal_gamma)}
    last, t_last = coarse, t_c >= 0.5
    if out.refine is not None:
        z = out.refine.logits.shape[-1]
        t_r = roi_resample(tgt[:, None], out.refine.boxes, tgt.shape[-1], (z, z))[:, 0] >= 0.5
        terms["refine"] = click_loss(config.loss, out.refine.logits, t_r, config.focal_gamma)
        last, t_last = out.refine, t_r
    if pem is not None:
        terms["pem"] = config.pem_weight * pem(last.features, t_last)
    if last.latent is not None:
        n = last.latent.shape[1]
        per_head = torch.stack([click_loss(config.loss, last.latent[:, h:h + 1], t_last, config.focal_gamma,
                                           reduction="none") for h in range(n)], dim=1)  # (B, N)
        terms["latent_min"] = per_head.min(dim=1).values.mean()
        region = (last.disks.sum(1, keepdim=True) > 0).float()
        if bool(region.any()):
            label = last.disks[:, :1].expand_as(last.latent)
            bce = F.binary_cross_entropy_with_logits(last.latent, label, reduction="none")
            terms["latent_clicks"] = (bce * region).sum() / (region.sum() * n)
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _lr_factor(step: int, total: int, warmup: int = 20) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_click_decoder(tokens: torch.Tensor, grid: tuple[int, int], train_set: ClickTrainingSet,
                        config: ClickModelConfig, *, iterations: int | None = None, progress: bool = False
                        ) -> tuple[ClickDecoder, list[float]]:
    """Train a fresh decoder on cached ``tokens`` (K, L, C) of ``train_set``; returns it
    (eval mode) and the loss of every iteration."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    decoder = ClickDecoder(config, tokens.shape[-1]).to(device)
    pem = PrototypeLoss(decoder.head_channels).to(device) if config.use_pem else None
    optim = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = int(iterations if iterations is not None else config.iterations)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, total))
    targets_np = train_set.targets.numpy()
    history: list[float] = []
    for step in range(total):
        idx = rng.choice(len(train_set), size=min(config.batch_size, len(train_set)), replace=False)
        tok = tokens[idx].to(device)
        crops = train_set.crops[idx].float().div(255).to(device)
        target = targets_np[idx]
        # the crop sides on the image edge and the boxes choose the prototypes' background
        edge = None if train_set.at_edge is None else train_set.at_edge[idx]
        boxes = None if train_set.boxes is None else train_set.boxes[idx]
        decoder.eval()
        with torch.no_grad():
            static = decoder.static_inputs(tok, grid, crops, at_edge=edge, object_box=boxes)
        clicks, prevs, states = simulate_clicks(decoder, tok, grid, crops, target, config, rng, static=static)
        decoder.train()
        maps, pts, valid = build_inputs(clicks, prevs, crops.shape[-1], config.disk_radius, device, states,
                                        map_size=config.map_size)
        out = decoder.forward_all(tok, grid, crops, maps, pts, valid,
                                  decoder.static_inputs(tok, grid, crops, at_edge=edge, object_box=boxes))
        loss, _ = training_loss(out, torch.from_numpy(target).to(device), config, pem)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optim.step()
        sched.step()
        history.append(float(loss.detach()))
        if progress and (step % 50 == 0 or step == total - 1):
            log.info("click model step %d/%d loss %.4f", step + 1, total, float(np.mean(history[-50:])))
    return decoder.eval(), history


def encode_to_storage(encoder: torch.nn.Module, crops: torch.Tensor, path: Path | None, batch_size: int = 64
                      ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch tokens (K, L, C) float32 of uint8 crops (K, 3, S, S), ``batch_size`` crops at a
    time (the batches :func:`encode_crops` makes, so the values are its values), appended to
    the raw file ``path`` and returned memory-mapped from it (None: in memory)."""
    if path is None:
        return encode_crops(encoder, crops.float().div(255), batch_size=batch_size)
    path.write_bytes(b"")
    shape, grid = None, (0, 0)
    with open(path, "ab") as fh:
        for i in range(0, len(crops), batch_size):
            tokens, grid = encode_crops(encoder, crops[i:i + batch_size].float().div(255), batch_size=batch_size)
            fh.write(tokens.numpy().tobytes())
            shape = tokens.shape[1:]
    if shape is None:
        return encode_crops(encoder, crops.float().div(255), batch_size=batch_size)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", shape=(len(crops), *shape))), tuple(grid)


def train_click_model(workdir: str | Path, config: ClickModelConfig, *, out_path: str | Path | None = None,
                      exclude: set[int] | None = None, progress: bool = True,
                      synthetic_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Train on the run's masks and write WORKDIR/click_model/model.pt (or ``out_path``).

    The training set and its encoder tokens are written once to a temporary folder in
    WORKDIR/cache (removed at the end) and memory-mapped: each step reads its batch's rows,
    nothing per object stays in memory (the tokens alone are ~3 MB per object for ViT-B at
    512 px). Returns the path and a summary {objects, iterations, first/last loss, source}.
    """
    workdir = Path(workdir)
    encoder = load_mask_model(workdir / GENERATOR_PATH, map_location=config.device)
    crop_size = int(encoder.img_size)
    cache = RunFolder(workdir).cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="click-train-", dir=cache) as storage:
        train_set = build_training_set(workdir, crop_size, source=config.train_source,
                                       top_fraction=config.train_top_fraction, max_objects=config.max_train_objects,
                                       train_json=config.train_json, exclude=exclude,
                                       synthetic_objects=config.synthetic_objects, synthetic_seed=config.synthetic_seed,
                                       synthetic_variant=config.synthetic_variant,
                                       synthetic_dir=synthetic_dir, storage=storage)
        tokens, grid = encode_to_storage(encoder, train_set.crops, Path(storage) / "tokens.f32")
        decoder, history = train_click_decoder(tokens, grid, train_set, config, progress=progress)
        objects = len(train_set)
        trained_ids = [int(a) for a in train_set.ann_ids if a >= 0]
        del tokens, train_set  # unmap before the folder goes
    k = max(1, min(20, len(history) // 5))
    summary = {"objects": objects, "iterations": len(history), "source": config.train_source,
               "loss_first": float(np.mean(history[:k])), "loss_last": float(np.mean(history[-k:]))}
    path = Path(out_path) if out_path is not None else workdir / CLICK_MODEL_PATH
    save_click_model(path, decoder.cpu(), encoder_path=str(GENERATOR_PATH), crop_size=crop_size,
                     extra={"train_summary": summary, "train_ann_ids": trained_ids})
    return path, summary
