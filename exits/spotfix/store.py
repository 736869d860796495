"""The fixes store: every spot-fix decision, append-only, in ``WORKDIR/fixes/fixes.jsonl``.

One JSON object per line (a :class:`FixRecord`). Appends are atomic across threads,
browser tabs and processes: the writer holds an exclusive ``fcntl.flock`` on the file,
writes the whole line with one ``os.write`` on an ``O_APPEND`` descriptor, then ``fsync``s
before releasing the lock; readers hold a shared lock, so they never see a write in
progress. A write that fails (disk full, I/O error) is cut off again (``ftruncate`` to the
size before it) and raised as an ``OSError`` naming the file, so no half record is left
behind; if even that fails, the rules below keep the file readable.

The file is never rewritten. A line that is not a fix record (a write cut short by a power
cut, a hand edit, JSON of something else) is skipped with a warning naming the file and
the line number, and stays in the file; the other records are served. A last line without
its newline (nobody is writing: readers hold the lock) is read as it is, and the next
append starts its record on a fresh line instead of gluing onto it. The latest decision
for an ``ann_id`` (file order) wins.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
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

log = logging.getLogger(__name__)
_READ_CHUNK = 1 << 20


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
    def from_dict(cls, d: Any) -> "FixRecord":
        """A stored line's JSON -> record.

        Raises:
            ValueError: ``d`` is not a fix record (not an object, a missing key, a field of
                the wrong type: what a hand edit or another program could leave).
        """
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not a fix record object")
        missing = [k for k in ("ann_id", "decision", "user", "clicks", "time") if k not in d]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        ann_id, clicks, rle = d["ann_id"], d["clicks"], d.get("rle")
        if isinstance(ann_id, bool) or not isinstance(ann_id, int):
            raise ValueError(f"ann_id {ann_id!r} is not an integer")
        if not isinstance(clicks, list) or not all(isinstance(c, list) and len(c) == 3 for c in clicks):
            raise ValueError("clicks is not a list of [x, y, positive]")
        if rle is not None and not (isinstance(rle, dict) and isinstance(rle.get("counts"), (str, list))
                                    and isinstance(rle.get("size"), list) and len(rle["size"]) == 2):
            raise ValueError("rle is not a COCO RLE object")
        for key in ("user", "time"):
            if not isinstance(d[key], str):
                raise ValueError(f"{key} is not a string")
        return cls(ann_id=ann_id, decision=d["decision"], user=d["user"], clicks=list(clicks),
                   rle=rle, base=d.get("base", "pseudo"), editor=str(d.get("editor", "")),
                   time=d["time"], app_version=str(d.get("app_version", "")), record_id=str(d.get("record_id", "")))


class FixesStore:
    """Append-only decisions of one run folder, with an incremental in-memory index."""

    def __init__(self, workdir: str | Path) -> None:
        self.path = RunFolder(workdir).fixes_file
        self._mutex = threading.Lock()  # guards the index; flock alone is per open file
        self._reset_index()

    def _reset_index(self) -> None:
        self._offset = 0  # bytes read and indexed
        self._line_no = 0  # number of the last line read (whole, or the open last line)
        self._open_line = False  # the last line read had no newline yet
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read
        self._records: list[FixRecord] = []
        self._latest: dict[int, FixRecord] = {}
        self._revision: dict[int, int] = {}
        self._skipped: list[int] = []

    def append(self, record: FixRecord, expect_revision: int | None = None) -> int:
        """Append ``record`` atomically; returns the object's new revision (decisions so far).

        Raises:
            RevisionConflict: ``expect_revision`` is given and differs from the object's
                current revision (someone decided it meanwhile); nothing is written.
            OSError: the file cannot be written (disk full, read-only folder, I/O error),
                naming the file (``filename``); nothing of the record stays in the file.
        """
        data = record.to_line()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self._mutex:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                _flock(fd, fcntl.LOCK_EX, self.path)  # released by close
                self._read_new(fd)
                current = self._revision.get(record.ann_id, 0)
                if expect_revision is not None and expect_revision != current:
                    raise RevisionConflict(record.ann_id, expect_revision, current)
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    data = b"\n" + data  # never glue a record onto a line that lacks its newline
                self._write(fd, data, end)
                self._read_new(fd)
            except OSError as exc:
                raise _naming(exc, self.path) from None
            finally:
                os.close(fd)
        if created:
            try:
                _fsync_dir(self.path.parent)
            except OSError as exc:  # the record itself is written and fsynced
                log.warning("could not fsync %s: %s", self.path.parent, exc)
        return self._revision[record.ann_id]

    def _write(self, fd: int, data: bytes, end: int) -> None:
        """Write ``data`` at the end (``end`` bytes before it) and fsync; on failure cut the
        file back to ``end`` so no partial line stays, and raise."""
        try:
            view = memoryview(data)
            while view:  # one write() takes the line; a short write only happens as a disk fills up
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[n:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError as undo:
                log.warning("%s: could not remove a partly written record (%s); readers skip it as a corrupt "
                            "line", self.path, undo)
            raise

    def refresh(self) -> None:
        """Pick up records appended by other processes since the last read.

        Raises:
            OSError: the file exists but cannot be read (naming it).
        """
        with self._mutex:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if self._offset:  # the file went away: nothing is decided any more
                    self._reset_index()
                return
            except OSError as exc:
                raise _naming(exc, self.path) from None
            try:
                _flock(fd, fcntl.LOCK_SH, self.path)  # no write is in progress while we read
                self._read_new(fd)
            except OSError as exc:
                raise _naming(exc, self.path) from None
            finally:
                os.close(fd)

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

    @property
    def skipped_lines(self) -> list[int]:
        """Line numbers (1-based) of the lines skipped as corrupt so far (each warned once)."""
        with self._mutex:
            return list(self._skipped)

    def _read_new(self, fd: int) -> None:
        """Index the bytes after ``self._offset`` (caller holds ``self._mutex`` and a lock on
        ``fd``, so no write is in progress and a last line without newline is complete)."""
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        if self._identity is not None and (identity != self._identity or st.st_size < self._offset):
            log.warning("%s was replaced or shortened since it was read; reading it again from the start", self.path)
            self._reset_index()
        self._identity = identity
        if st.st_size <= self._offset:
            return
        chunk = _pread_all(fd, self._offset, st.st_size - self._offset)
        pos = 0
        if self._open_line:  # the rest of the last line read: normally just the newline an append adds
            nl = chunk.find(b"\n")
            stop = len(chunk) if nl < 0 else nl
            if stop:
                log.warning("%s line %d: %d bytes were added to this line after it was read; they are ignored",
                            self.path, self._line_no, stop)
            if nl < 0:
                self._offset += len(chunk)
                return
            pos, self._open_line = nl + 1, False
        while pos < len(chunk):
            nl = chunk.find(b"\n", pos)
            self._line_no += 1
            self._index(chunk[pos:len(chunk) if nl < 0 else nl], self._line_no, last=nl < 0)
            if nl < 0:
                pos, self._open_line = len(chunk), True
            else:
                pos = nl + 1
        self._offset += pos

    def _index(self, line: bytes, line_no: int, last: bool = False) -> None:
        if not line.strip():
            return
        try:
            rec = FixRecord.from_dict(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError, JSONDecodeError are ValueErrors
            self._skipped.append(line_no)
            cut = ", the last line, without its newline: a write cut short?" if last else ""
            log.warning("%s line %d: skipped a corrupt fix record (%s%s); the line is left in the file as it is",
                        self.path, line_no, exc, cut)
            return
        self._records.append(rec)
        self._latest[rec.ann_id] = rec
        self._revision[rec.ann_id] = self._revision.get(rec.ann_id, 0) + 1


def _pread_all(fd: int, offset: int, size: int) -> bytes:
    parts = []
    while size > 0:
        part = os.pread(fd, min(size, _READ_CHUNK), offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
        size -= len(part)
    return b"".join(parts)


def _flock(fd: int, op: int, path: Path) -> None:
    try:
        fcntl.flock(fd, op)
    except OSError as exc:
        raise _naming(exc, path) from None


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``filename`` set to ``path`` where the failing call named no file
    (``write``, ``fsync``, ``pread`` on a descriptor)."""
    if exc.filename is None and exc.errno is not None:
        named = OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
        named.__cause__ = exc.__cause__
        return named
    return exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
