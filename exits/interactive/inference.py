"""One decoder call on a batch of objects: click lists + previous masks (+ carried states)
-> probabilities.

Shared by the training loop (simulated rounds), the predictor and the benchmarks, so the
maps the decoder sees are built one way everywhere.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from exits.interactive.clicks import Click, clicks_tensor, encode_click_maps
from exits.interactive.decoder import ClickDecoder

__all__ = ["build_inputs", "decode_logits", "decode_probs"]


def build_inputs(clicks: Sequence[Sequence[Click]], prev_masks: Sequence[np.ndarray | None], size: int,
                 radius: float, device: torch.device | str, states: Sequence[np.ndarray | None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """maps (B, 8, S, S), clicks (B, K, 3), valid (B, K) on ``device``; clicks in crop coords;
    ``states``: the carried 5-state maps (None entries start from the previous mask)."""
    states = states if states is not None else [None] * len(clicks)
    maps = torch.stack([encode_click_maps(c, m, (size, size), radius, z)
                        for c, m, z in zip(clicks, prev_masks, states, strict=True)])
    pts, valid = clicks_tensor(clicks)
    return maps.to(device), pts.to(device), valid.to(device)


def decode_logits(decoder: ClickDecoder, tokens: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor,
                  clicks: Sequence[Sequence[Click]], prev_masks: Sequence[np.ndarray | None],
                  states: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
    """(B, 1, S, S) logits for tokens (B, L, C), crops (B, 3, S, S); clicks per object."""
    maps, pts, valid = build_inputs(clicks, prev_masks, crops.shape[-1], decoder.config.disk_radius, tokens.device,
                                    states)
    return decoder(tokens, grid, crops, maps, pts, valid)


@torch.no_grad()
def decode_probs(decoder: ClickDecoder, tokens: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor,
                 clicks: Sequence[Sequence[Click]], prev_masks: Sequence[np.ndarray | None],
                 states: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """(B, S, S) float32 foreground probabilities (no grad, eval mode as given)."""
    logits = decode_logits(decoder, tokens, grid, crops, clicks, prev_masks, states)
    return torch.sigmoid(logits)[:, 0].float().cpu().numpy()
