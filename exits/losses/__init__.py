"""EXITS training losses (pure torch, batched): Dice, box MIL, point and CRF losses.

Every loss returns per-object values (B,) with ``reduction="none"`` and their mean by
default; the overall stage-1c objective is λ_point · point_loss + λ_crf · crf_loss.
"""
from exits.losses.crf_loss import crf_loss, crf_target
from exits.losses.dice import dice_loss, reduce_loss
from exits.losses.mil import mil_loss
from exits.losses.point import downsample_to_grid, point_loss

__all__ = ["crf_loss", "crf_target", "dice_loss", "downsample_to_grid", "mil_loss", "point_loss", "reduce_loss"]
