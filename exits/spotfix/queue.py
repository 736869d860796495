"""The spot-fix queue over a run's objects: filters, pages, and the score-sorted columns
that answer them (worst pseudo-mask score first) without a Python object per object.

:class:`exits.spotfix.catalog.RunCatalog` builds the index from the run's Parquet columns
(or its json) and answers ``/api/queue`` with :meth:`_QueueIndex.page`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    from exits.spotfix.review_object import ReviewObject

# Rows of the score-sorted columns one step of a queue request looks at (its memory: ~1 B
# per row, whatever the run's size).
QUEUE_SCAN_ROWS = 1 << 16


@dataclass(frozen=True)
class QueueFilter:
    category_id: int | None = None
    separated: bool | None = None
    min_score: float | None = None
    max_score: float | None = None

    def accepts(self, obj: ReviewObject) -> bool:
        if self.category_id is not None and obj.category_id != self.category_id:
            return False
        if self.separated is not None and obj.separated != self.separated:
            return False
        # written as the columns compare: no score, or a NaN bound, passes no range
        if self.min_score is not None and not (obj.score is not None and obj.score >= self.min_score):
            return False
        if self.max_score is not None and not (obj.score is not None and obj.score <= self.max_score):
            return False
        return True


@dataclass(frozen=True)
class QueueItem:
    """One row of the queue as the list shows it (no mask, no geometry): made from the
    queue's columns only, so listing never reads an RLE."""

    ann_id: int
    image_id: int
    category_id: int
    score: float | None
    parts: int

    @property
    def separated(self) -> bool:
        return self.parts >= 2


@dataclass(frozen=True)
class QueuePage:
    """``items``: rows ``[offset, offset + limit)`` of the filtered queue; ``total``: its length."""

    total: int
    items: list[QueueItem]


def _compact(a: np.ndarray) -> np.ndarray:
    """An integer column as int32 when every value fits (the values are unchanged)."""
    a = np.asarray(a)
    if a.dtype.kind in "iu" and a.dtype.itemsize > 4 and (
            not len(a) or (int(a.min()) >= np.iinfo(np.int32).min and int(a.max()) <= np.iinfo(np.int32).max)):
        return a.astype(np.int32)
    return a


def _int64_ids(ids: Iterable[Any]) -> np.ndarray:
    """The integer ids that can be object ids (int64), sorted and unique; others match nothing."""
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    ok = [int(a) for a in ids if isinstance(a, (int, np.integer)) and not isinstance(a, bool) and lo <= a <= hi]
    return np.unique(np.asarray(ok, dtype=np.int64))


class _QueueIndex:
    """The queue's order and filter columns, one numpy array each, rows in queue order: worst
    score first (no score = unknown quality, first too), ties by id.

    A queue request scans these columns in steps of ``QUEUE_SCAN_ROWS`` rows, counting the
    rows that pass and keeping only the page's positions: no filtered list, no Python object
    per object. The score range is a slice of the sorted scores (``searchsorted``); the
    status filter comes as the few decided ids (their positions are found by lookup).

    Held per object: ann_id 8 B + score 8 B + category, image id and parts 4 B each (8 B for
    ids past int32) + the id lookup (sorted ids 8 B + their positions 4 B) = 40 B.
    """

    def __init__(self, ann_id: np.ndarray, image_id: np.ndarray, category_id: np.ndarray, score: np.ndarray,
                 parts: np.ndarray):
        """Columns of the objects in file order (a repeated id: its last row is the one looked up)."""
        ann_id = np.asarray(ann_id, dtype=np.int64)
        score = np.asarray(score, dtype=np.float64)
        key = np.where(np.isnan(score), -np.inf, score)
        by_id = np.argsort(ann_id, kind="stable")  # by id, ties in file order
        order = by_id[np.argsort(key[by_id], kind="stable")]  # worst first, ties by id (then file order)
        self.order = order  # the permutation, for the caller's own per-object columns
        self.ann_id = ann_id[order]
        self.score = score[order]
        self.category_id = _compact(np.asarray(category_id)[order])
        self.image_id = _compact(np.asarray(image_id)[order])
        self.parts = _compact(np.asarray(parts)[order])
        self.size = len(order)
        # Rows with no score (NaN) or a score of -inf sort first; every other score after them,
        # ascending: a score range is a slice of that tail.
        self._head = int(np.count_nonzero(key == -np.inf))
        # Id lookup: the sorted ids and their queue positions (a repeated id: the rightmost
        # match is its last file row, like a dict built in file order).
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        self._sorted_ids = ann_id[by_id]
        self._by_id = _compact(position[by_id])
        self.unique = int(np.count_nonzero(np.diff(self._sorted_ids))) + 1 if len(order) else 0

    def position(self, ann_id: Any) -> int | None:
        """Queue position of ``ann_id`` (its last file row if repeated); None if absent."""
        if isinstance(ann_id, bool) or not isinstance(ann_id, (int, np.integer)):
            return None
        if not np.iinfo(np.int64).min <= ann_id <= np.iinfo(np.int64).max:
            return None
        j = int(np.searchsorted(self._sorted_ids, ann_id, side="right")) - 1
        if j < 0 or self._sorted_ids[j] != ann_id:
            return None
        return int(self._by_id[j])

    def positions(self, ids: Iterable[Any]) -> np.ndarray:
        """Queue positions (ascending) of every row whose id is in ``ids``."""
        want = _int64_ids(ids)
        left = np.searchsorted(self._sorted_ids, want, side="left")
        right = np.searchsorted(self._sorted_ids, want, side="right")
        n = right - left
        if not n.any():
            return np.zeros(0, np.int64)
        j = np.repeat(left - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(int(n.sum()))
        return np.sort(self._by_id[j].astype(np.int64))

    def ids(self) -> Iterator[int]:
        """Every id once, ascending."""
        last = None
        for a in self._sorted_ids:
            if a != last:
                last = a
                yield int(a)

    def item(self, p: int) -> QueueItem:
        score = float(self.score[p])
        return QueueItem(ann_id=int(self.ann_id[p]), image_id=int(self.image_id[p]),
                         category_id=int(self.category_id[p]), score=None if math.isnan(score) else score,
                         parts=int(self.parts[p]))

    def _score_slice(self, flt: QueueFilter) -> tuple[int, int, bool]:
        """Positions ``[lo, hi)`` that can pass the score range, and whether rows of the head
        (no score / -inf) inside it must be checked for a missing score (which fails a range)."""
        lo_s, hi_s = flt.min_score, flt.max_score
        if lo_s is None and hi_s is None:
            return 0, self.size, False
        if (lo_s is not None and math.isnan(lo_s)) or (hi_s is not None and math.isnan(hi_s)):
            return 0, 0, False  # nothing compares true with NaN
        tail = self.score[self._head:]  # no NaN, ascending
        lo = self._head + (int(np.searchsorted(tail, lo_s, side="left")) if lo_s is not None else 0)
        hi = self._head + (int(np.searchsorted(tail, hi_s, side="right")) if hi_s is not None else len(tail))
        if (lo_s is None or lo_s == -math.inf) and (hi_s is None or hi_s >= -math.inf):
            lo = 0  # a score of -inf passes such a range: the head is in it, less its missing scores
        return lo, max(lo, hi), lo < self._head

    def _mask(self, flt: QueueFilter, a: int, b: int, check_head: bool) -> np.ndarray:
        ok = np.ones(b - a, bool)
        if flt.category_id is not None:
            ok &= self.category_id[a:b] == flt.category_id
        if flt.separated is not None:
            ok &= (self.parts[a:b] >= 2) == bool(flt.separated)
        if check_head and a < self._head:
            h = min(b, self._head)
            ok[:h - a] &= ~np.isnan(self.score[a:h])
        return ok

    def page(self, flt: QueueFilter, offset: int, limit: int, only: Iterable[Any] | None = None,
             exclude: Iterable[Any] = ()) -> tuple[int, np.ndarray]:
        """(number of rows passing, positions of rows ``[offset, offset + limit)`` of them).

        ``only``: just the rows of these ids (a status such as "accepted": few ids);
        ``exclude``: not the rows of these ids (status "todo": all but the decided ones).
        """
        lo, hi, check_head = self._score_slice(flt)
        if only is not None:
            pos = self.positions(only)
            pos = pos[(pos >= lo) & (pos < hi)]
            keep = np.ones(len(pos), bool)
            if flt.category_id is not None:
                keep &= self.category_id[pos] == flt.category_id
            if flt.separated is not None:
                keep &= (self.parts[pos] >= 2) == bool(flt.separated)
            if check_head:
                keep &= ~((pos < self._head) & np.isnan(self.score[pos]))
            pos = pos[keep]
            return len(pos), pos[offset:offset + limit]
        skip = self.positions(exclude)
        skip = skip[(skip >= lo) & (skip < hi)]
        total, found, s = 0, [], 0
        for a in range(lo, hi, QUEUE_SCAN_ROWS):
            b = min(a + QUEUE_SCAN_ROWS, hi)
            ok = self._mask(flt, a, b, check_head)
            e = s + int(np.searchsorted(skip[s:], b, side="left"))
            ok[skip[s:e] - a] = False
            s = e
            n = int(np.count_nonzero(ok))
            want = offset + limit - total  # rows of this step still before the page's end
            if n and want > 0 and total + n > offset:
                rows = np.flatnonzero(ok)[max(0, offset - total):want] + a
                found.append(rows)
            total += n
        return total, (np.concatenate(found) if found else np.zeros(0, np.int64))[:limit]

    def select(self, flt: QueueFilter) -> np.ndarray:
        """Positions of every row passing ``flt`` (the Python API's whole queue)."""
        lo, hi, check_head = self._score_slice(flt)
        return np.flatnonzero(self._mask(flt, lo, hi, check_head)) + lo
