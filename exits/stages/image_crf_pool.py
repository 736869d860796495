"""Stage 1d's image-level CRF in worker processes, overlapping the generator's forward pass.

pydensecrf holds the GIL for a whole inference (~30 ms per demo object), so threads cannot
run it beside the forward pass; processes can. :class:`ImageCRFRefiner` is the ``refine``
callable of ``paste_pseudo_masks``: ``submit`` hands a batch of crop probabilities to the
workers as soon as the forward pass produced them, ``refiner(i, prob)`` returns object i's
mask over its crop window (waiting for its worker, or computing it here when there are no workers). Both
paths run the same function on the same inputs, so the masks are identical.

The worker pool lives for the process (forking per shard would cost more than a shard's
CRFs) and is rebuilt when its size changes or a worker died. Workers exit when their parent
dies, so a killed run leaves no orphans.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from exits.data.images import image_file
from exits.crf.image_refine import box_prior_crf_window, image_crf_prior, split_image_crf_params
from exits.data.crops import CropWindow

log = logging.getLogger(__name__)

_POOL: ProcessPoolExecutor | None = None
_POOL_KEY: tuple[int, int] | None = None  # (pid, workers) the pool was made for
_POOL_LOCK = threading.Lock()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_crf_workers(workers: int) -> int:
    """Config value -> worker processes: -1 = one per available CPU, 0 = none (in-process).

    A daemonic process (e.g. a multiprocessing pool worker) may not have children, so it
    always gets 0."""
    if workers == 0 or mp.current_process().daemon:
        return 0
    return available_cpus() if workers < 0 else workers


def _exit_with_parent(parent: int) -> None:
    """Worker initialiser: leave when the parent process is gone (a killed run)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _pool(workers: int) -> ProcessPoolExecutor:
    global _POOL, _POOL_KEY
    key = (os.getpid(), workers)
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != key:
            if _POOL is not None and _POOL_KEY[0] == key[0]:
                _POOL.shutdown(wait=False, cancel_futures=True)
            # fork is Linux's default and what torch's DataLoader workers use: the worker needs
            # no imports. Elsewhere spawn (fork is unsafe on macOS).
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent,
                                        initargs=(os.getpid(),))
            _POOL_KEY = key
        return _POOL


def _discard_pool() -> None:
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        if _POOL is not None and _POOL_KEY[0] == os.getpid():
            _POOL.shutdown(wait=False, cancel_futures=True)
        _POOL, _POOL_KEY = None, None


atexit.register(_discard_pool)

_IMAGE: dict[str, np.ndarray] = {}  # the last decoded image of this process (objects come image by image)


def _image(path: Path) -> np.ndarray:
    from exits.data.images import read_rgb

    key = str(path)
    if key not in _IMAGE:
        _IMAGE.clear()
        _IMAGE[key] = read_rgb(path)
    return _IMAGE[key]


def _crf_window(path: Path, window: CropWindow, points: np.ndarray, prior: np.ndarray,
                crf: Mapping[str, Any]) -> np.ndarray:
    """The unit of work of a worker: one object's window mask, (window.height, window.width) bool."""
    return box_prior_crf_window(_image(path), window, points, prior, **crf)


class ImageCRFRefiner:
    """``refine(i, crop_prob) -> window mask`` for object i of an ``ObjectCropDataset`` (its
    image folder, file names, windows, extreme points): the box-constrained dense CRF at image
    resolution (``exits.crf.image_refine.image_crf_refine``), in ``workers`` processes or here.

    Args:
        dataset: the shard's ``ObjectCropDataset``.
        params: ``pseudo.image_crf`` settings.
        workers: worker processes (:func:`resolve_crf_workers` already applied); 0 = this process.
    """

    def __init__(self, dataset: Any, params: Mapping[str, float], workers: int = 0) -> None:
        self.dataset = dataset
        self.prior, self.crf = split_image_crf_params(params)
        self.workers = workers
        self._pending: dict[int, Future] = {}

    def submit(self, start: int, probs: torch.Tensor) -> None:
        """Queue objects ``start .. start + len(probs) - 1`` (probs: (B, S, S), the same values
        ``refine`` will be called with). No-op without workers."""
        if not self.workers:
            return
        pool = _pool(self.workers)
        for k in range(len(probs)):
            i = start + k
            args = self._work(i, probs[k])
            try:
                self._pending[i] = pool.submit(_crf_window, *args)
            except BrokenProcessPool:  # a worker was killed (e.g. OOM): new pool, same work
                _discard_pool()
                pool = _pool(self.workers)
                self._pending[i] = pool.submit(_crf_window, *args)

    def __call__(self, i: int, crop_prob: torch.Tensor) -> np.ndarray:
        """Object i's mask over its crop window, (window.height, window.width) bool."""
        future = self._pending.pop(i, None)
        if future is not None:
            try:
                return future.result()
            except BrokenProcessPool:
                log.warning("a CRF worker died; refining object %d of this shard in-process", i)
                _discard_pool()
        return _crf_window(*self._work(i, crop_prob))

    def close(self) -> None:
        """Cancel what is still queued (a shard that failed before pasting all its objects)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def _work(self, i: int, crop_prob: torch.Tensor) -> tuple:
        d = self.dataset
        prior = image_crf_prior(crop_prob, d.windows[i], **self.prior)
        return image_file(d.image_dir, d.file_names[i]), d.windows[i], d.points_image[i], prior, self.crf
