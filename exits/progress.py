"""Remaining-time estimates for long stages (training epochs, shards), shown in log lines.

Log lines rather than only progress bars: inside Prefect tasks (threads, Dask workers) the
log is what reaches the user's terminal and the Prefect UI.
"""
from __future__ import annotations

import time

__all__ = ["format_duration", "Eta"]


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Eta:
    """ETA of ``total`` units of work from the mean time per unit done so far in this process.

    ``done_before``: units already finished when this process started (a resumed training):
    they count towards the progress but not towards the rate.
    """

    def __init__(self, total: int, done_before: int = 0, clock=time.perf_counter):
        self.total, self.done_before, self._clock = total, done_before, clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def remaining(self, done: int) -> float | None:
        """Seconds left after ``done`` units (None before the first unit of this process)."""
        here = done - self.done_before
        if here <= 0:
            return None
        return self.elapsed() / here * max(0, self.total - done)

    def describe(self, done: int) -> str:
        """``"3/25, 1m02s elapsed, ETA 7m30s"``."""
        left = self.remaining(done)
        eta = "ETA ?" if left is None else f"ETA {format_duration(left)}"
        return f"{done}/{self.total}, {format_duration(self.elapsed())} elapsed, {eta}"
