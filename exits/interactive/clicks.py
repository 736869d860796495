"""Click encoding: disk maps, the previous mask and the 5-state map (InterFormer), in crop
pixel coordinates.

A click is ``(u, v, positive)``: crop pixel coordinates (pixel index ``u`` is the centre of
column ``u``; see :mod:`exits.data.crops`) and its sign. Pixel ``(i, j)`` (row, column) is in
the disk of a click when ``(j - u)^2 + (i - v)^2 <= r^2``.

5-state map Z (InterFormer Sec. 3.1), one label per pixel:

    UNKNOWN, DEFINITE_FG, DEFINITE_BG, POSSIBLE_FG, POSSIBLE_BG

Z is *carried between clicks* (it is the model's memory of how stable each pixel was):

  * start: all UNKNOWN. An existing mask to edit (a pseudo mask) is treated as a
    prediction made before the first click, so the transition below turns it into
    POSSIBLE_FG inside / POSSIBLE_BG outside;
  * a click sets its disk to DEFINITE_FG / DEFINITE_BG (a later click overrides an
    earlier one where the disks overlap);
  * after a prediction P, pixel by pixel (:data:`TRANSITIONS`, InterFormer's rules):

        state \\ P        fg            bg
        UNKNOWN          POSSIBLE_FG   POSSIBLE_BG
        POSSIBLE_FG      POSSIBLE_FG   UNKNOWN        (contradicted -> unknown)
        POSSIBLE_BG      UNKNOWN       POSSIBLE_BG
        DEFINITE_FG      DEFINITE_FG   DEFINITE_FG    (clicked pixels never change)
        DEFINITE_BG      DEFINITE_BG   DEFINITE_BG

So a pixel whose prediction flips becomes UNKNOWN and, if the next prediction agrees with
the flip, settles into the new POSSIBLE state one click later. The state after k clicks
therefore depends on the whole prediction history, not only on the last mask: callers keep
it (:class:`exits.interactive.session.ClickSession` in the predictor, a list of states in
training) and pass it back with the next click.

Decoder input maps (:func:`encode_click_maps`, ``NUM_MAP_CHANNELS`` = 8): positive disks,
negative disks, one-hot of the 5 states, and the previous mask itself (RITM's extra input;
with UNKNOWN states the mask can no longer be read off the states).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

UNKNOWN, DEFINITE_FG, DEFINITE_BG, POSSIBLE_FG, POSSIBLE_BG = range(5)
NUM_STATES = 5
PREV_CHANNEL = 2 + NUM_STATES
NUM_MAP_CHANNELS = 2 + NUM_STATES + 1  # positive disks, negative disks, one-hot states, previous mask

Click = tuple[float, float, bool]

# TRANSITIONS[state, prediction_is_fg] -> next state (InterFormer's update rule, see module doc).
TRANSITIONS = np.zeros((NUM_STATES, 2), np.uint8)
TRANSITIONS[UNKNOWN] = (POSSIBLE_BG, POSSIBLE_FG)
TRANSITIONS[POSSIBLE_FG] = (UNKNOWN, POSSIBLE_FG)
TRANSITIONS[POSSIBLE_BG] = (POSSIBLE_BG, UNKNOWN)
TRANSITIONS[DEFINITE_FG] = (DEFINITE_FG, DEFINITE_FG)
TRANSITIONS[DEFINITE_BG] = (DEFINITE_BG, DEFINITE_BG)


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


def click_label_map(clicks: Sequence[Click], size: tuple[int, int], radius: float) -> np.ndarray:
    """(H, W) int8: +1 inside the disk of a positive click, -1 negative, 0 elsewhere; a later
    click wins where disks overlap (the labels a constrained output must keep)."""
    out = np.zeros(size, np.int8)
    for u, v, positive in clicks:
        rows, cols, disk = disk_index(u, v, radius, *size)
        out[rows, cols][disk] = 1 if positive else -1
    return out


def update_with_prediction(state: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Z' = TRANSITIONS[Z, P]: (H, W) uint8 states and (H, W) bool prediction -> new states."""
    return TRANSITIONS[np.asarray(state, np.uint8), np.asarray(prediction, bool).astype(np.uint8)]


def initial_state(prev_mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 states before any click: all UNKNOWN, updated with ``prev_mask`` as a
    prediction when one is given (so POSSIBLE_FG inside it, POSSIBLE_BG outside)."""
    state = np.full(size, UNKNOWN, np.uint8)
    if prev_mask is None:
        return state
    prev = np.asarray(prev_mask, bool)
    if prev.shape != tuple(size):
        raise ValueError(f"prev_mask has shape {prev.shape}, expected {tuple(size)}")
    return update_with_prediction(state, prev)


def apply_click(state: np.ndarray, click: Click, radius: float) -> np.ndarray:
    """New state map with the click's disk set to DEFINITE_FG (positive) or DEFINITE_BG."""
    out = state.copy()
    u, v, positive = click
    rows, cols, disk = disk_index(u, v, radius, *state.shape)
    out[rows, cols][disk] = DEFINITE_FG if positive else DEFINITE_BG
    return out


def apply_clicks(state: np.ndarray, clicks: Sequence[Click], radius: float) -> np.ndarray:
    """``apply_click`` for every click in order. Re-applying clicks already in ``state`` is a
    no-op (their disks are definite with the same last-click-wins labels), so a caller may
    pass its carried state together with the full click list."""
    out = state.copy()
    for u, v, positive in clicks:
        rows, cols, disk = disk_index(u, v, radius, *state.shape)
        out[rows, cols][disk] = DEFINITE_FG if positive else DEFINITE_BG
    return out


def state_map(clicks: Sequence[Click], prev_mask: np.ndarray | None, size: tuple[int, int], radius: float,
              state: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8 states the decoder sees: the carried ``state`` (or, when None, the
    initial state of ``prev_mask``) with ``clicks`` applied in order."""
    base = initial_state(prev_mask, size) if state is None else np.asarray(state, np.uint8)
    if base.shape != tuple(size):
        raise ValueError(f"state has shape {base.shape}, expected {tuple(size)}")
    return apply_clicks(base, clicks, radius)


def _block_mean(x: np.ndarray, k: int) -> np.ndarray:
    """(C, H, W) -> (C, H / k, W / k) float32 means of k x k blocks (H, W divisible by k), as
    a sum of the k^2 strided views (memory-bound reductions over 512 px maps cost more than
    the decoder's passes on a 2-core VM: numpy's axis mean 20 ms, avg_pool2d 6 ms, this 1 ms)."""
    if k == 1:
        return np.asarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // k, x.shape[2] // k), np.float32)
    for i in range(k):
        for j in range(k):
            out += x[:, i::k, j::k]
    return out / float(k * k)


def _state_fractions(z: np.ndarray, k: int) -> np.ndarray:
    """(5, H / k, W / k) float32 share of each state in every k x k block of the (H, W) uint8
    states (the block mean of their one-hot, without building the (5, H, W) one-hot)."""
    if k == 1:
        return (z[None] == np.arange(NUM_STATES, dtype=np.uint8)[:, None, None]).astype(np.float32)
    out = np.zeros((NUM_STATES, z.shape[0] // k, z.shape[1] // k), np.float32)
    for i in range(k):
        for j in range(k):
            view = z[i::k, j::k]
            for c in range(NUM_STATES):
                out[c] += view == c
    return out / float(k * k)


def encode_click_maps(clicks: Sequence[Click], prev_mask: np.ndarray | None, size: tuple[int, int],
                      radius: float, state: np.ndarray | None = None, block: int = 1) -> torch.Tensor:
    """Decoder input maps (NUM_MAP_CHANNELS, H / k, W / k) float32, k = ``block``: [pos disks,
    neg disks, one-hot of the 5 states in the order UNKNOWN, DEFINITE_FG, DEFINITE_BG,
    POSSIBLE_FG, POSSIBLE_BG, previous mask], built at (H, W) and averaged over k x k blocks
    (k = 1: the maps themselves); states from :func:`state_map` (``state`` = the carried one,
    if any)."""
    disks = _block_mean(disk_maps(clicks, size, radius), block)
    states = _state_fractions(state_map(clicks, prev_mask, size, radius, state), block)
    if prev_mask is None:
        prev = np.zeros((1, *states.shape[1:]), np.float32)
    else:
        prev = _block_mean(np.asarray(prev_mask, np.float32)[None], block)
    return torch.from_numpy(np.concatenate([disks, states, prev], axis=0))


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
