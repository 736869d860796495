"""Atomic file writes: a crash or kill mid-write never leaves a half-written output.

Every file the pipeline produces goes through these helpers: the bytes are written to a
temporary file in the destination folder (same filesystem, so the rename is atomic), flushed
and fsynced, then moved over the destination with ``os.replace``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Iterator

def format_os_error(exc: OSError) -> str:
    """``<filename>: <strerror> (<errno name>)``, e.g. ``/runs/a/report.md: No space left on
    device (ENOSPC)``; without a file name just ``<strerror> (<errno name>)``."""
    if exc.errno is None:
        return str(exc) or type(exc).__name__
    what = f"{exc.strerror or os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    if exc.filename is None:
        return what
    name = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        name = f"{name} -> {os.fsdecode(exc.filename2)}"
    return f"{name}: {what}"


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it over ``dest``.

    For writers that want a path (``pq.write_table``, ``torch.save``, ``PIL.Image.save``).
    On any exception the temporary file is removed and ``dest`` is untouched. An ``OSError``
    (disk full, read-only folder, a directory where the file should be) is re-raised naming
    ``dest`` (not the temporary file, and not nothing, as a failed ``write``/``fsync`` does),
    so the one-line message of the command says what could not be written.
    """
    dest = Path(dest)
    tmp_path: Path | None = None
    try:
        _make_parent(dest.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; outputs get the usual umask-based mode (e.g. 0644)
        # so reports and labels can be shared/served like any other file.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
        tmp_path = None  # it is dest now
    except OSError as exc:
        _name_destination(exc, dest, tmp_path)
        raise
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):  # never hide the write's own error
                tmp_path.unlink()


def _make_parent(folder: Path) -> None:
    """``mkdir -p folder``; a regular file in the way is "Not a directory" (ENOTDIR) naming
    it, not mkdir's "File exists"."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from exc


def _name_destination(exc: OSError, dest: Path, tmp: Path | None) -> None:
    """Make ``exc`` name ``dest`` where it names the temporary file (mkstemp, os.replace) or
    no file at all (a failed write or fsync: ENOSPC, EIO); an error about another file (an
    input read inside the block) keeps its name."""
    if exc.errno is None:
        return
    name = None if exc.filename is None else os.fsdecode(exc.filename)
    if name is None or name == str(tmp) or os.path.basename(name).startswith(f".{dest.name}."):
        exc.filename = str(dest)
        del exc.filename2  # unset (None would print as "-> None")


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``dest`` only if the block succeeds."""
    if "b" in mode:
        encoding = None
    with atomic_path(dest) as tmp:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()


def write_json(dest: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Atomically write ``obj`` as JSON."""
    with atomic_open(dest, "w") as fh:
        json.dump(obj, fh, indent=indent)
    return Path(dest)


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    """Atomically write raw bytes."""
    with atomic_open(dest, "wb") as fh:
        fh.write(data)
    return Path(dest)


_CHUNK = 1 << 20


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, memo: bool = True) -> str:
    """blake2b-128 hex digest of a file's bytes: the project's one file digest (cache keys,
    stage 2's training-source record, the source of an exported fixes merge).

    Memoised per process on (path, size, mtime, inode), so the many tasks of a run that
    name the same model or table hash it once; ``memo=False`` always reads the bytes (for a
    file rewritten within the filesystem's timestamp granularity, e.g. in one test).
    """
    st = os.stat(path)
    if not memo:
        return _file_digest.__wrapped__(os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    return _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def read_json_if_exists(path: str | os.PathLike, hint: str = "") -> Any:
    """The JSON value in ``path``, or None when there is no such file.

    Raises:
        ValueError: the file is not valid JSON (the message names the file; ``hint`` is
            appended, e.g. what to do about it).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}){'; ' + hint if hint else ''}") from exc
