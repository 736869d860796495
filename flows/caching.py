"""Caching of the flows' tasks: content fingerprints of inputs, checks of cached outputs.

Cache key of every stage task (Prefect ``cache_policy``)::

    INPUTS            the task's arguments: paths, shard range, the config sections the
                      stage reads (so an unrelated setting never invalidates it), and the
                      image folder's fingerprint
    + TASK_SOURCE     the task function's source code
    + ContentFingerprint(files)
                      blake2b digest of the BYTES of each input file the task names
                      (annotations json, instances.parquet, models, points, shards) and
                      the ``exits`` version

A changed file or setting therefore changes the key and recomputes; an unchanged one hits
the cache even if the file was rewritten with the same bytes (a touched json). Image
folders are fingerprinted by their file list + sizes + modification times, not their bytes
(a COCO image folder is ~20 GB): replacing an image, adding or removing one, or touching
one recomputes. Results and cache records live in ``WORKDIR/.prefect-results``.

Outputs live at fixed paths in the run folder, so a cache hit is trusted only while the
files it produced are unchanged: every task returns :func:`output_record` (its output paths
with their content digests) and :func:`run_task` / :func:`run_shards` recompute a cached
task (``refresh_cache=True``) whose outputs were since deleted or overwritten (e.g. by a run
with other settings).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import wait
from prefect.transactions import get_transaction
from prefect.utilities.hashing import hash_objects

import exits
from exits.io import file_digest
from exits.progress import Eta

log = logging.getLogger(__name__)

__all__ = ["file_digest", "folder_fingerprint", "path_digest", "ContentFingerprint", "content_cache",
           "output_record", "outputs_intact", "current_cache_key", "keyed_checkpoint_dir", "prune_other_dirs",
           "run_task", "run_shards"]

def folder_fingerprint(path: str | os.PathLike) -> str:
    """Digest of the sorted (relative path, size, mtime) of every file under ``path``.

    Cheap stand-in for the bytes of an image folder (one ``stat`` per file): any added,
    removed, resized, replaced or touched file changes it. Names are hashed as the bytes the
    file system holds (``os.fsencode``), so a name that is not valid UTF-8 (``caf\\xe9.png``
    from a Latin-1 machine) is fingerprinted like any other; for UTF-8 names the digest is
    the one of the text.
    """
    root = os.fsencode(path)
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(path))
    entries = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            entries.append(b"%s\0%d\0%d" % (os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    entries.sort()
    return hashlib.blake2b(b"\n".join(entries), digest_size=16).hexdigest()


def path_digest(path: str | os.PathLike) -> str | None:
    """Content digest of a file, or of every file (name + bytes) under a folder; None when absent.

    Names are hashed as bytes (``os.fsencode``), as in :func:`folder_fingerprint`."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        parts = sorted(os.fsencode(f.relative_to(p)) + b"\0" + file_digest(f).encode()
                       for f in p.rglob("*") if f.is_file())
        return hashlib.blake2b(b"\n".join(parts), digest_size=16).hexdigest()
    return None


@dataclass
class ContentFingerprint(CachePolicy):
    """Cache-key part from the bytes of the input files named by task parameters.

    ``files``: names of parameters holding a path, a list of paths, or None (no file).
    """

    files: tuple[str, ...] = ()

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        digests: dict[str, Any] = {"exits": exits.__version__}
        for name in self.files:
            value = (inputs or {}).get(name)
            if value is None:
                digests[name] = None
            elif isinstance(value, (list, tuple)):
                digests[name] = [file_digest(v) for v in value]
            else:
                digests[name] = file_digest(value)
        return hash_objects(digests, raise_on_failure=True)


def content_cache(*files: str) -> CachePolicy:
    """INPUTS + TASK_SOURCE + the bytes of the files named by the parameters ``files``."""
    return INPUTS + TASK_SOURCE + ContentFingerprint(files=tuple(files))


def output_record(outputs: Mapping[str, str | os.PathLike], **extra: Any) -> dict[str, Any]:
    """What a stage task returns: ``{"outputs": {name: path}, "digests": {name: digest}, **extra}``."""
    paths = {name: str(p) for name, p in outputs.items()}
    return {"outputs": paths, "digests": {name: path_digest(p) for name, p in paths.items()}, **extra}


def outputs_intact(record: Mapping[str, Any]) -> bool:
    """True when every output of a task record still has the content it had when it was made."""
    return all(path_digest(p) == record["digests"][name] for name, p in record["outputs"].items())


def current_cache_key() -> str | None:
    """The cache key of the running task (None outside a task, or when it has none)."""
    txn = get_transaction()
    return txn.key if txn is not None else None


def keyed_checkpoint_dir(base: Path) -> Path:
    """``base/<key prefix>``: a training task resumes only checkpoints made under its own cache
    key, never one left by a run with other data or settings."""
    key = current_cache_key()
    return Path(base) / (key[:16] if key else "unkeyed")


def prune_other_dirs(keep: Path) -> None:
    """Remove the sibling folders of ``keep`` (checkpoints of superseded keys; they can be large)."""
    for other in Path(keep).parent.iterdir():
        if other.is_dir() and other != Path(keep):
            shutil.rmtree(other, ignore_errors=True)


def run_task(task: Task, results: Path, options: Mapping[str, Any] | None = None,
             **kwargs: Any) -> tuple[dict[str, Any], str]:
    """Call a stage task; returns (its output record, its final state name, e.g. Cached).

    A cache hit whose outputs were deleted or overwritten since is run again with
    ``refresh_cache=True``.
    """
    bound = task.with_options(result_storage=results, **(options or {}))
    state = bound(**kwargs, return_state=True)
    record = state.result()
    if state.name == "Cached" and not outputs_intact(record):
        log.warning("%s: cached outputs changed on disk; recomputing", task.name)
        state = bound.with_options(refresh_cache=True)(**kwargs, return_state=True)
        record = state.result()
    return record, state.name


class ShardProgress:
    """A Prefect progress artifact for a sharded stage (percent of shards finished).

    Artifacts are a view for people watching the UI: failing to write one never fails the run.
    """

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done, self.artifact_id = name, max(1, total), 0, None
        self.eta = Eta(self.total)
        try:
            self.artifact_id = create_progress_artifact(0.0, key=f"{name}-progress",
                                                        description=f"{name}: shards finished")
        except Exception as exc:  # noqa: BLE001 - no run context / server hiccup: skip the view
            log.debug("no progress artifact for %s: %s", name, exc)

    def update(self, done: int) -> None:
        self.done = done
        log.info("%s: shards %s", self.name, self.eta.describe(done))
        if self.artifact_id is None:
            return
        try:
            update_progress_artifact(self.artifact_id, 100.0 * self.done / self.total)
        except Exception as exc:  # noqa: BLE001
            log.debug("progress artifact update failed: %s", exc)


def run_shards(task: Task, results: Path, calls: Sequence[Mapping[str, Any]],
               options: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Submit one task per shard to the flow's task runner; wait for all; return records and
    state names in shard order. Stale cache hits are resubmitted as in :func:`run_task`.

    Every shard gets to finish before a failure is raised, so a re-run has only the failed
    ones left to do.
    """
    bound = task.with_options(result_storage=results, **(options or {}))
    futures = [bound.submit(**kw) for kw in calls]
    progress = ShardProgress(task.name, len(futures))
    for done, future in enumerate(futures, start=1):  # in submission order: shards finish roughly so
        future.wait()
        progress.update(done)
    stale = [i for i, f in enumerate(futures) if f.state.name == "Cached" and not outputs_intact(f.result())]
    if stale:
        log.warning("%s: %d cached shards changed on disk; recomputing", task.name, len(stale))
        refresh = bound.with_options(refresh_cache=True)
        for i in stale:
            futures[i] = refresh.submit(**calls[i])
        wait([futures[i] for i in stale])
    failed = [f for f in futures if not f.state.is_completed()]
    if failed:
        failed[0].result()  # raises the first shard's exception
    return [f.result() for f in futures], [f.state.name for f in futures]
