"""Spot-fix click model: a light click decoder over cached generator-ViT features.

Modules (one concept each):
  config       ClickModelConfig (typed settings; ``from_dict`` rejects unknown keys)
  clicks       disk maps and the 5-state map with InterFormer's transitions (carried)
  session      the carried state per object and click sequence (predictor)
  robot        evaluation robot user (RITM convention) and the training clicker
  metrics      NoC@t, NoF@t, mIoU@k from IoU curves
  attention    I-MSA: interactive attention with P2T pooling (InterFormer)
  spm          max/min cosine-similarity click propagation (SPM)
  prototypes   SGC prototypes + GPA allocation (ASGNet)
  zoom         RoI box, resampling and paste-back (IAM)
  diffusion    FDM (feature diffusion) and PDM (pixel diffusion) (CDNet)
  pem          prototype loss, training only (PEM)
  progressive  a click changes only the region it touches (CDNet)
  decoder      ClickDecoder: coarse pass + zoomed refinement, parts switchable,
               latent heads for diversified training (CDNet)
  constrain    clicks always respected: dense CRF with hard clicks + colour model
  features     encoder tokens per object + LRU cache
  inference    one batched decoder call from click lists
  data, synthetic, losses, train, model_io   training on the run's best pseudo masks, a
               named COCO json or a generated labelled set
  predictor    ClickPredictor: the web page's interface
  grabcut      GrabCut seeded by the same clicks (reference)
  evaluate     run_eval_clicks: robot-user NoC/NoF/mIoU, click model vs GrabCut
  commands     typer commands train-clicks / eval-clicks
"""
import importlib
from typing import Any

# Names load on first use: the run config imports ClickModelConfig from here, and loading a
# config must not import torch, timm and OpenCV.
_LAZY = {
    "ClickModelConfig": "exits.interactive.config",
    "ClickPredictor": "exits.interactive.predictor",
    "grabcut_from_clicks": "exits.interactive.grabcut",
    "run_eval_clicks": "exits.interactive.evaluate",
    "train_click_model": "exits.interactive.train",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'exits.interactive' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
