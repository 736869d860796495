"""Spot-fix click model: a light click decoder over cached generator-ViT features.

Modules (one concept each):
  config       ClickModelConfig (typed settings; ``from_dict`` rejects unknown keys)
  clicks       disk maps and the 5-state map (InterFormer)
  robot        evaluation robot user (RITM convention) and the training clicker
  metrics      NoC@t, NoF@t, mIoU@k from IoU curves
  attention    I-MSA: interactive attention with P2T pooling (InterFormer)
  spm          max/min cosine-similarity click propagation (SPM)
  prototypes   SGC prototypes + GPA allocation (ASGNet)
  zoom         zoom-in on the region of interest, clicks kept inside (IAM)
  progressive  a click changes only the region it touches (CDNet)
  decoder      ClickDecoder: the parts assembled, each switchable
  features     encoder tokens per object + LRU cache
  inference    one batched decoder call from click lists
  data, losses, train, model_io   training on the run's best pseudo masks
  predictor    ClickPredictor: the web page's interface
  grabcut      GrabCut seeded by the same clicks (reference)
  evaluate     run_eval_clicks: robot-user NoC/NoF/mIoU, click model vs GrabCut
  commands     typer commands train-clicks / eval-clicks
"""
from exits.interactive.config import ClickModelConfig
from exits.interactive.evaluate import run_eval_clicks
from exits.interactive.grabcut import grabcut_from_clicks
from exits.interactive.predictor import ClickPredictor
from exits.interactive.train import train_click_model

__all__ = ["ClickModelConfig", "ClickPredictor", "grabcut_from_clicks", "run_eval_clicks", "train_click_model"]
