"""Click encoding: disk maps and the 5-state map (InterFormer), in crop pixel coordinates.

A click is ``(u, v, positive)``: crop pixel coordinates (pixel index ``u`` is the centre of
column ``u``; see :mod:`exits.data.crops`) and its sign. Pixel ``(i, j)`` (row, column) is in
the disk of a click when ``(j - u)^2 + (i - v)^2 <= r^2``.

5-state map Z (InterFormer, Sec. 3.1), one label per pixel:

    UNKNOWN, DEFINITE_FG, DEFINITE_BG, POSSIBLE_FG, POSSIBLE_BG

Rules used here:
  * start: all UNKNOWN; when a previous mask exists (an existing pseudo mask to edit, or the
    model's last prediction) POSSIBLE_FG inside it and POSSIBLE_BG outside;
  * a click sets its disk to DEFINITE_FG / DEFINITE_BG (a later click overrides an earlier
    one where the disks overlap);
  * after a prediction P, every non-definite pixel becomes POSSIBLE_FG where P is fg and
    POSSIBLE_BG where it is not; definite pixels never change.

Since the prediction fed back is the previous mask, the state after k clicks equals
``state_map(all k clicks, previous prediction)``: the decoder needs no hidden state.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

UNKNOWN, DEFINITE_FG, DEFINITE_BG, POSSIBLE_FG, POSSIBLE_BG = range(5)
NUM_STATES = 5
NUM_MAP_CHANNELS = 2 + NUM_STATES  # positive disks, negative disks, one-hot states

Click = tuple[float, float, bool]


def disk_index(u: float, v: float, radius: float, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """Rows/columns slices of the disk's bounding square and the (h, w) bool disk inside it.

    Only the bounding square is touched, so a click costs O(r^2), not O(H W) (512 crops).
    """
    r = float(radius)
    i0, i1 = max(0, int(np.ceil(v - r))), min(height, int(np.floor(v + r)) + 1)
    j0, j1 = max(0, int(np.ceil(u - r))), min(width, int(np.floor(u + r)) + 1)
    if i0 >= i1 or j0 >= j1:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), bool)
    ii = np.arange(i0, i1, dtype=np.float64)[:, None]
    jj = np.arange(j0, j1, dtype=np.float64)[None, :]
    return slice(i0, i1), slice(j0, j1), (jj - u) ** 2 + (ii - v) ** 2 <= r * r


def disk_maps(clicks: Sequence[Click], size: tuple[int, int], radius: float) -> np.ndarray:
    """(2, H, W) float32: channel 0 the union of positive click disks, channel 1 negative."""
    h, w = size
    out = np.zeros((2, h, w), np.float32)
    for u, v, positive in clicks:
        rows, cols, disk = disk_index(u, v, radius, h, w)
        out[0 if positive else 1, rows, cols][disk] = 1.0
    return out


def initial_state(prev_mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 states before any click: UNKNOWN, or POSSIBLE_FG/BG from ``prev_mask``."""
    if prev_mask is None:
        return np.full(size, UNKNOWN, np.uint8)
    prev = np.asarray(prev_mask, bool)
    if prev.shape != tuple(size):
        raise ValueError(f"prev_mask has shape {prev.shape}, expected {tuple(size)}")
    return np.where(prev, POSSIBLE_FG, POSSIBLE_BG).astype(np.uint8)


def apply_click(state: np.ndarray, click: Click, radius: float) -> np.ndarray:
    """New state map with the click's disk set to DEFINITE_FG (positive) or DEFINITE_BG."""
    out = state.copy()
    u, v, positive = click
    rows, cols, disk = disk_index(u, v, radius, *state.shape)
    out[rows, cols][disk] = DEFINITE_FG if positive else DEFINITE_BG
    return out


def update_with_prediction(state: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Definite pixels stay; every other pixel -> POSSIBLE_FG where predicted fg, else POSSIBLE_BG."""
    definite = (state == DEFINITE_FG) | (state == DEFINITE_BG)
    possible = np.where(np.asarray(prediction, bool), POSSIBLE_FG, POSSIBLE_BG).astype(np.uint8)
    return np.where(definite, state, possible).astype(np.uint8)


def state_map(clicks: Sequence[Click], prev_mask: np.ndarray | None, size: tuple[int, int], radius: float) -> np.ndarray:
    """(H, W) uint8 states after ``clicks`` (in order) on top of ``prev_mask``."""
    state = initial_state(prev_mask, size)
    for click in clicks:
        state = apply_click(state, click, radius)
    return state


def encode_click_maps(clicks: Sequence[Click], prev_mask: np.ndarray | None, size: tuple[int, int],
                      radius: float) -> torch.Tensor:
    """Decoder input maps (NUM_MAP_CHANNELS, H, W) float32: [pos disks, neg disks, one-hot of
    the 5 states in the order UNKNOWN, DEFINITE_FG, DEFINITE_BG, POSSIBLE_FG, POSSIBLE_BG]."""
    disks = disk_maps(clicks, size, radius)
    state = state_map(clicks, prev_mask, size, radius)
    one_hot = (state[None] == np.arange(NUM_STATES, dtype=np.uint8)[:, None, None]).astype(np.float32)
    return torch.from_numpy(np.concatenate([disks, one_hot], axis=0))


def clicks_tensor(clicks_per_sample: Sequence[Sequence[Click]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad click lists to (B, K, 3) [u, v, +1/-1] and a (B, K) bool validity mask (K >= 1)."""
    k = max([1] + [len(c) for c in clicks_per_sample])
    out = torch.zeros((len(clicks_per_sample), k, 3), dtype=torch.float32)
    valid = torch.zeros((len(clicks_per_sample), k), dtype=torch.bool)
    for b, clicks in enumerate(clicks_per_sample):
        for i, (u, v, positive) in enumerate(clicks):
            out[b, i] = torch.tensor([u, v, 1.0 if positive else -1.0])
            valid[b, i] = True
    return out, valid
