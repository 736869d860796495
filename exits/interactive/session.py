"""Per-object click sessions: the 5-state map carried from one click to the next.

InterFormer's state map depends on every earlier prediction (see
:mod:`exits.interactive.clicks`), but the web page sends only the clicks and the current
mask. The predictor therefore remembers, per object, the state reached after each click
sequence it answered, keyed by the clicks, together with the mask it returned:

    state for clicks c_1..c_k = the stored state of c_1..c_{k-1}, when the request's
    previous mask is exactly the mask returned for c_1..c_{k-1}; else none (the state
    restarts from the previous mask: POSSIBLE_FG inside, POSSIBLE_BG outside)

Keying by the whole sequence makes undo work (the page goes back to an earlier sequence
and its mask). The returned mask's crop (the (S, S) crop_mask the next click needs as its
previous mask) is kept beside it, so a continuing session crops one mask per click instead
of two (~1 ms each at 512 px). Each object keeps at most ``per_object`` sequences, the
cache at most ``objects`` objects (least recently used first out).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from exits.interactive.clicks import Click

__all__ = ["ClickSessions"]

Key = tuple[tuple[float, float, bool], ...]


def _key(clicks: Sequence[Click]) -> Key:
    return tuple((float(x), float(y), bool(p)) for x, y, p in clicks)


class ClickSessions:
    """ann_id -> {click sequence: (crop state (S, S) uint8, returned full mask (H, W) bool,
    its crop (S, S) bool or None)}."""

    def __init__(self, objects: int = 64, per_object: int = 64) -> None:
        self.objects, self.per_object = int(objects), int(per_object)
        self._items: OrderedDict[int, OrderedDict[Key, tuple[np.ndarray, np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, ann_id: int, clicks: Sequence[Click], prev_mask: np.ndarray | None) -> np.ndarray | None:
        """The carried state before the last of ``clicks``, or None (see module doc)."""
        return self.lookup_entry(ann_id, clicks, prev_mask)[0]

    def lookup_entry(self, ann_id: int, clicks: Sequence[Click], prev_mask: np.ndarray | None
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(carried state, crop of ``prev_mask``) stored with the sequence before the last of
        ``clicks`` when ``prev_mask`` is the mask returned for it, else (None, None)."""
        if not clicks or prev_mask is None:
            return None, None
        with self._lock:
            entry = self._items.get(int(ann_id), {}).get(_key(clicks[:-1]))
        if entry is None or entry[1].shape != np.shape(prev_mask) or not np.array_equal(entry[1], prev_mask):
            return None, None
        return entry[0], entry[2]

    def store(self, ann_id: int, clicks: Sequence[Click], state: np.ndarray, mask: np.ndarray,
              crop: np.ndarray | None = None) -> None:
        with self._lock:
            seqs = self._items.setdefault(int(ann_id), OrderedDict())
            self._items.move_to_end(int(ann_id))
            seqs[_key(clicks)] = (state, np.asarray(mask, bool).copy(), crop)
            seqs.move_to_end(_key(clicks))
            while len(seqs) > self.per_object:
                seqs.popitem(last=False)
            while len(self._items) > self.objects:
                self._items.popitem(last=False)
