"""The fixes store: every spot-fix decision, append-only, in ``WORKDIR/fixes/fixes.jsonl``.

One JSON object per line (a :class:`FixRecord`). Appends are atomic across threads,
browser tabs and processes: the writer holds an exclusive ``fcntl.flock`` on the file,
writes the whole line with one ``write`` call, then ``fsync``s before releasing the lock.
So no reader ever sees a half record except after a crash mid-write; readers skip a last
line without its newline, and the next writer (under the lock) cuts such crash debris off
before appending. The latest decision for an ``ann_id`` (file order) wins.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from exits.run_folder import RunFolder

APP_VERSION = "exits-spotfix/1"

Decision = Literal["accept", "reject"]
Base = Literal["pseudo", "fix"]


class RevisionConflict(RuntimeError):
    """The object was decided elsewhere (another tab/process) since the caller loaded it."""

    def __init__(self, ann_id: int, expected: int, actual: int) -> None:
        super().__init__(f"object {ann_id} changed elsewhere (revision {actual}, this page has {expected}); reload it")
        self.ann_id, self.expected, self.actual = ann_id, expected, actual


@dataclass(frozen=True)
class FixRecord:
    """One decision. ``clicks`` are [x, y, positive] in image pixels, in click order;
    ``rle`` is the accepted mask (COCO RLE, str counts), ``None`` for a rejection; ``base``
    says what the editing started from (the pseudo mask or an earlier accepted fix)."""

    ann_id: int
    decision: Decision
    user: str
    clicks: list[list[float | bool]]
    rle: dict[str, Any] | None
    base: Base = "pseudo"
    editor: str = ""
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    app_version: str = APP_VERSION
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.decision not in ("accept", "reject"):
            raise ValueError(f"decision must be 'accept' or 'reject', got {self.decision!r}")
        if (self.decision == "accept") != (self.rle is not None):
            raise ValueError("an accepted fix carries its mask (rle); a rejection carries none")

    def to_line(self) -> bytes:
        return (json.dumps(asdict(self), separators=(",", ":"), sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FixRecord":
        return cls(ann_id=int(d["ann_id"]), decision=d["decision"], user=str(d["user"]), clicks=list(d["clicks"]),
                   rle=d.get("rle"), base=d.get("base", "pseudo"), editor=str(d.get("editor", "")),
                   time=str(d["time"]), app_version=str(d.get("app_version", "")), record_id=str(d.get("record_id", "")))


class FixesStore:
    """Append-only decisions of one run folder, with an incremental in-memory index."""

    def __init__(self, workdir: str | Path) -> None:
        self.path = RunFolder(workdir).fixes_file
        self._mutex = threading.Lock()  # guards the index; flock alone is per open file
        self._offset = 0
        self._records: list[FixRecord] = []
        self._latest: dict[int, FixRecord] = {}
        self._revision: dict[int, int] = {}

    def append(self, record: FixRecord, expect_revision: int | None = None) -> int:
        """Append ``record`` atomically; returns the object's new revision (decisions so far).

        Raises:
            RevisionConflict: ``expect_revision`` is given and differs from the object's
                current revision (someone decided it meanwhile); nothing is written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self._mutex, open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                self._read_new(fh)
                current = self._revision.get(record.ann_id, 0)
                if expect_revision is not None and expect_revision != current:
                    raise RevisionConflict(record.ann_id, expect_revision, current)
                end = fh.seek(0, os.SEEK_END)
                if end > self._offset:
                    # Only a crashed writer leaves bytes after the last newline (we hold the lock).
                    fh.truncate(self._offset)
                fh.write(record.to_line())
                fh.flush()
                os.fsync(fh.fileno())
                self._read_new(fh)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        if created:
            _fsync_dir(self.path.parent)
        return self._revision[record.ann_id]

    def refresh(self) -> None:
        """Pick up records appended by other processes since the last read."""
        if not self.path.exists():
            return
        with self._mutex, open(self.path, "rb") as fh:
            self._read_new(fh)

    def records(self) -> list[FixRecord]:
        """All decisions in file order."""
        self.refresh()
        with self._mutex:
            return list(self._records)

    def latest(self) -> dict[int, FixRecord]:
        """The winning (last) decision per ann_id."""
        self.refresh()
        with self._mutex:
            return dict(self._latest)

    def latest_for(self, ann_id: int) -> tuple[FixRecord | None, int]:
        """(latest decision or None, revision) of one object."""
        self.refresh()
        with self._mutex:
            return self._latest.get(ann_id), self._revision.get(ann_id, 0)

    def _read_new(self, fh: Any) -> None:
        """Index complete lines after ``self._offset`` (caller holds ``self._mutex``)."""
        fh.seek(self._offset)
        chunk = fh.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        for k, line in enumerate(chunk[: end + 1].splitlines()):
            if not line.strip():
                continue
            try:
                rec = FixRecord.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.path}: corrupt record after byte {self._offset} (line +{k}): {exc}") from exc
            self._records.append(rec)
            self._latest[rec.ann_id] = rec
            self._revision[rec.ann_id] = self._revision.get(rec.ann_id, 0) + 1
        self._offset += end + 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
