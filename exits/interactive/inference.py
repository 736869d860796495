"""One decoder call on a batch of objects: click lists + previous masks (+ carried states)
-> probabilities.

Shared by the training loop (simulated rounds), the predictor and the benchmarks, so the
maps the decoder sees are built one way everywhere.

Map frame. Clicks, previous masks and states are in the S x S crop; the 8 input maps are
built at M = S / k (:func:`map_frame`, k the smallest divisor of S with S / k <=
``map_size``) as exact k x k block means of the S-level maps, and the decoder's output is
at M too. The decoder never works at more than ``max(coarse_size, decode_size)`` px, so
S-level maps of a 512 crop (2 M values, built, stacked and resampled twice per click) were
pure cost: 8.5 ms to build and 11.5 ms of antialiased resizing per click on one thread
(cProfile). M = S for the demo's 96-px crops (nothing changes there).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from exits.interactive.clicks import Click, clicks_tensor, encode_click_maps
from exits.interactive.decoder import ClickDecoder, StaticInputs

__all__ = ["build_inputs", "decode_logits", "decode_probs", "map_frame"]


def map_frame(size: int, map_size: int) -> int:
    """k: the smallest divisor of ``size`` S with S / k <= ``map_size`` (the maps are S / k a side)."""
    k = max(1, -(-int(size) // int(map_size)))
    while size % k:
        k += 1
    return k


def build_inputs(clicks: Sequence[Sequence[Click]], prev_masks: Sequence[np.ndarray | None], size: int,
                 radius: float, device: torch.device | str, states: Sequence[np.ndarray | None] | None = None,
                 map_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """maps (B, 8, M, M), clicks (B, K, 3), valid (B, K) on ``device``; clicks in crop coords
    (S frame); ``states``: the carried 5-state maps (None entries start from the previous
    mask); M = S / :func:`map_frame` (``map_size`` None: M = S)."""
    states = states if states is not None else [None] * len(clicks)
    k = 1 if map_size is None else map_frame(size, map_size)
    maps = torch.stack([encode_click_maps(c, m, (size, size), radius, z, block=k)
                        for c, m, z in zip(clicks, prev_masks, states, strict=True)])
    pts, valid = clicks_tensor(clicks)
    return maps.to(device), pts.to(device), valid.to(device)


def decode_logits(decoder: ClickDecoder, tokens: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor,
                  clicks: Sequence[Sequence[Click]], prev_masks: Sequence[np.ndarray | None],
                  states: Sequence[np.ndarray | None] | None = None, static: StaticInputs | None = None
                  ) -> torch.Tensor:
    """(B, 1, M, M) logits (the map frame) for tokens (B, L, C), crops (B, 3, S, S);
    ``static`` the decoder's kept click-independent inputs of these objects, if any."""
    maps, pts, valid = build_inputs(clicks, prev_masks, crops.shape[-1], decoder.config.disk_radius, tokens.device,
                                    states, map_size=decoder.config.map_size)
    return decoder(tokens, grid, crops, maps, pts, valid, static)


@torch.no_grad()
def decode_probs(decoder: ClickDecoder, tokens: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor,
                 clicks: Sequence[Sequence[Click]], prev_masks: Sequence[np.ndarray | None],
                 states: Sequence[np.ndarray | None] | None = None, at_crop_size: bool = True,
                 static: StaticInputs | None = None) -> np.ndarray:
    """(B, S, S) float32 foreground probabilities (no grad, eval mode as given); with
    ``at_crop_size=False`` (B, M, M) in the map frame, for callers that resample anyway."""
    logits = decode_logits(decoder, tokens, grid, crops, clicks, prev_masks, states, static)
    s = crops.shape[-1]
    if at_crop_size and logits.shape[-1] != s:
        logits = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[:, 0].float().cpu().numpy()
