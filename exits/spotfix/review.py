"""The spot-fix page's side of ``exits loop``: the triage budget its queue is limited to, and
the "review done" button that resumes the suspended loop run through Prefect's API.

The budget is ``WORKDIR/loop/review.json`` (written by the loop flow) when it was made from
the run's current ``pseudo_labels.json``; it is re-read when the file changes. Prefect is
imported only when the button is pressed.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from pydantic import Field

from exits.io import file_digest
from exits.run_folder import RunFolder
from exits.spotfix.schemas import USER_PATTERN, _Strict

__all__ = ["ReviewUnavailable", "LoopReview", "ReviewDoneIn"]

log = logging.getLogger(__name__)


class ReviewDoneIn(_Strict):
    """Body of ``POST /api/review/done``."""

    reviewer: str | None = Field(default=None, pattern=USER_PATTERN)
    note: str = Field(default="", max_length=2000)


class ReviewUnavailable(Exception):
    """"review done" cannot resume anything: ``status`` (HTTP) and a message saying why."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


class LoopReview:
    """The loop review of one run folder (the page's budget and its "review done")."""

    def __init__(self, workdir: str | Path, limit_queue: bool = True) -> None:
        self.run = RunFolder(workdir)
        self.limit_queue = limit_queue
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of review.json last read
        self._budget: frozenset[int] | None = None
        self._info: dict[str, Any] | None = None

    def budget(self) -> frozenset[int] | None:
        """Ids the queue is limited to (None: no budget, or ``limit_queue`` off)."""
        return self._load()[0] if self.limit_queue else None

    def info(self) -> dict[str, Any]:
        """For ``/api/meta``: the budget's size and limits, and the loop run's state."""
        budget, info = self._load()
        loop = self._loop_state()
        return {"budget": None if budget is None else len(budget), "limited": self.limit_queue and budget is not None,
                "below_score": (info or {}).get("below_score"), "loop_state": loop.get("state"),
                "flow_run_id": loop.get("flow_run_id"), "waiting": loop.get("state") == "waiting_for_review"}

    def done(self, reviewer: str, note: str = "") -> dict[str, Any]:
        """Resume the suspended loop run and make sure something continues it.

        Raises:
            ReviewUnavailable: 409 when there is no loop run or it is not waiting for review;
                503 when the Prefect server cannot be reached.
        """
        if not self.run.loop_state.is_file():
            raise ReviewUnavailable(409, f"no loop run in {self.run.root} ({self.run.loop_state} missing): "
                                         "nothing waits for this review; start one with `exits loop`",
                                    reason="no_loop_run")
        try:
            from flows.loop_control import LoopError, NotWaitingForReview, continue_loop, resume_loop
        except ImportError as exc:  # pragma: no cover - the package ships flows/
            raise ReviewUnavailable(503, f"cannot reach Prefect: {exc}", reason="prefect_unavailable") from exc
        try:
            resumed = resume_loop(self.run.root, reviewer=reviewer, note=note)
        except NotWaitingForReview as exc:
            raise ReviewUnavailable(409, str(exc), reason="not_waiting") from exc
        except (LoopError, ValueError) as exc:
            raise ReviewUnavailable(409, str(exc), reason="no_loop_run") from exc
        except (OSError, RuntimeError) as exc:  # Prefect's API unreachable, or a refused transition
            raise ReviewUnavailable(503, f"could not resume the loop run through Prefect's API: {exc}",
                                    reason="prefect_unavailable") from exc
        log.info("review done by %s: loop run %s resumed", reviewer, resumed["flow_run_id"])
        return {**resumed, "resumed": True, **continue_loop(self.run.root)}

    def _loop_state(self) -> dict[str, Any]:
        import json

        try:
            data = json.loads(self.run.loop_state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _load(self) -> tuple[frozenset[int] | None, dict[str, Any] | None]:
        from exits.stages.review import read_review_queue

        path = self.run.review_queue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None, None
        with self._lock:
            if self._seen != (st.st_mtime_ns, st.st_size):
                self._seen = (st.st_mtime_ns, st.st_size)
                self._budget, self._info = None, None
                try:
                    queue = read_review_queue(self.run.root)
                except ValueError as exc:
                    log.warning("%s; the queue is not limited", exc)
                    return None, None
                if queue is not None and queue.get("source_blake2b") != file_digest(self.run.pseudo_json, memo=False):
                    log.warning("%s was made from older pseudo labels; the queue is not limited", path)
                elif queue is not None:
                    self._budget = frozenset(int(a) for a in queue["ann_ids"])
                    self._info = queue
            return self._budget, self._info
