"""Mask editors: what answers each click. Any object with ``prepare``/``predict`` works
(:class:`MaskEditor`); the app wraps it in :class:`EditorRunner` so calls never overlap.

- ``clicks``: the trained click model (``exits.interactive.predictor.ClickPredictor``); with
  ``click_model.grabcut_after`` (default 8) GrabCut answers from that click of an object on.
- ``grabcut``: OpenCV GrabCut seeded by the clicks and the previous mask; needs no model.
- ``auto`` (the default of ``exits spotfix``): chosen from a measurement that exists, never
  from a constant. When the run has its own ``exits eval-clicks`` result for its current
  click model, the editor that result favours (:func:`editor_from_eval`); otherwise
  :data:`DEFAULT_EDITOR` (the click model with the GrabCut hand-over, measured out of domain)
  or GrabCut for a model without the hand-over, with the reason printed.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from exits.grabcut import ensure_background, is_foreground, run_grabcut
from exits.run_folder import RunFolder
from exits.spotfix.catalog import RunCatalog

Click = tuple[float, float, bool]
EDITORS = ("auto", "clicks", "grabcut")
# Without the run's own eval-clicks result: the click model, with GrabCut answering from the
# 8th click of an object on (``click_model.grabcut_after``, the default). Measured out of domain
# (bench/clicks_domain_table.py; docs/benchmarks.md, "Editor choice"): click models trained on
# objects cut from photographs disjoint from the evaluated ones, 3 seeds, the 40 lowest-scoring
# objects, pseudo-mask protocol, GrabCut with the same clicks. Holdout: NoC@85 4.33 vs 4.92,
# NoC@90 6.14 vs 7.55, NoF@85 3.0 vs 3.0, NoF@90 6.7 vs 7.0; demo: 5.15 vs 5.72, 6.65 vs 7.12,
# 4.0 vs 4.0, 6.7 vs 7.0. The click model alone needs fewer clicks too but fails on more objects
# (NoF@90 8.7 vs 7 on holdout), so a model without the hand-over gets GrabCut.
DEFAULT_EDITOR = "clicks"
DEFAULT_REASON = ("no eval-clicks result for this run's click model; out of domain (photographs it was not trained on, "
                  "3 seeds) the click model with GrabCut from the {after}th click needed fewer clicks than GrabCut at "
                  "85 % and 90 % IoU and failed no more often (docs/benchmarks.md, 'Editor choice'); measure on yours "
                  "with `exits eval-clicks -w {workdir} --gt GT_JSON`")
NO_HAND_OVER_REASON = ("this run's click model answers every click itself (click_model.grabcut_after: 0), and without "
                       "the GrabCut hand-over it failed on more objects than GrabCut out of domain (docs/benchmarks.md, "
                       "'Editor choice'); measure on yours with `exits eval-clicks -w {workdir} --gt GT_JSON`")
log = logging.getLogger(__name__)


@runtime_checkable
class MaskEditor(Protocol):
    def prepare(self, ann_id: int) -> None:
        """Compute and cache whatever the object needs before its first click."""

    def predict(self, ann_id: int, clicks: list[Click], prev_mask: np.ndarray | None) -> np.ndarray:
        """clicks (x, y, positive) in image pixels, in click order; prev_mask (H, W) bool
        or None -> (H, W) bool mask of the whole image."""


class EditorUnavailable(RuntimeError):
    """The requested editor cannot be built (e.g. no trained click model)."""


class GrabCutEditor:
    """GrabCut inside the object's crop window (grown to cover clicks and the previous mask).

    Edits are local, as a person expects from a click: with a previous mask, only pixels
    within ``edit_radius`` of some click may change (there, previous-mask pixels are
    probable foreground, others probable background); farther pixels keep the previous
    mask as sure labels. Without a previous mask: outside the extreme-point box = sure
    background, inside = probable foreground (as exits.baselines.grabcut_mask starts).
    Disks around the extreme points = sure foreground; then each click's disk, in order:
    positive = sure foreground, negative = sure background (later clicks win overlaps).
    ``edit_radius`` = max(12 px, 25% of the longer side of the extreme-point box).
    """

    def __init__(self, catalog: RunCatalog, *, iters: int = 5, click_radius: int = 3, cache_size: int = 8) -> None:
        self.catalog = catalog
        self.iters = iters
        self.click_radius = click_radius
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # image_id -> RGB image
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def prepare(self, ann_id: int) -> None:
        self._image(self.catalog.objects[ann_id].image_id)

    def predict(self, ann_id: int, clicks: list[Click], prev_mask: np.ndarray | None) -> np.ndarray:
        obj = self.catalog.objects[ann_id]
        image = self._image(obj.image_id)
        h, w = image.shape[:2]
        pts = np.asarray(obj.extreme_points, dtype=np.float64).round().astype(int)
        x0, y0, x1, y1 = self._window(obj.crop_box, clicks, prev_mask, w, h)
        bx0, by0, bx1, by1 = pts[1, 0], pts[0, 1], pts[3, 0], pts[2, 1]
        if prev_mask is None:
            seeds = np.full((h, w), cv2.GC_BGD, np.uint8)
            seeds[by0:by1 + 1, bx0:bx1 + 1] = cv2.GC_PR_FGD
        else:
            prev = np.asarray(prev_mask, dtype=bool)
            zone = np.zeros((h, w), np.uint8)
            radius = max(12, int(round(0.25 * max(bx1 - bx0 + 1, by1 - by0 + 1))))
            for x, y, _ in clicks:
                cv2.circle(zone, (int(round(x)), int(round(y))), radius, 1, -1)
            sure = np.where(prev, cv2.GC_FGD, cv2.GC_BGD).astype(np.uint8)
            seeds = np.where(zone > 0, np.where(prev, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8), sure)
        for x, y in pts:
            cv2.circle(seeds, (int(x), int(y)), 2, int(cv2.GC_FGD), -1)
        for x, y, positive in clicks:
            cv2.circle(seeds, (int(round(x)), int(round(y))), self.click_radius,
                       int(cv2.GC_FGD if positive else cv2.GC_BGD), -1)
        sub_seeds = np.ascontiguousarray(seeds[y0:y1, x0:x1])
        if not is_foreground(sub_seeds).any():
            # nothing to grow from (every click negative): give GrabCut the centre to start
            sub_seeds[sub_seeds.shape[0] // 2, sub_seeds.shape[1] // 2] = cv2.GC_PR_FGD
        # A failed GrabCut (flat crop) leaves the seeds as they are: they are the answer.
        run_grabcut(image, ensure_background(sub_seeds), x0, y0, iters=self.iters)
        out = np.zeros((h, w), bool)
        out[y0:y1, x0:x1] = is_foreground(sub_seeds)
        return out

    def _window(self, crop_box: Sequence[int], clicks: list[Click], prev_mask: np.ndarray | None,
                w: int, h: int) -> tuple[int, int, int, int]:
        """Crop window grown to every click and the previous mask, plus a margin for GrabCut's
        background statistics; clipped to the image. Returns x0, y0, x1, y1 (exclusive)."""
        cx, cy, cw, ch = crop_box
        xs, ys = [cx, cx + cw - 1], [cy, cy + ch - 1]
        xs += [int(round(c[0])) for c in clicks]
        ys += [int(round(c[1])) for c in clicks]
        if prev_mask is not None and prev_mask.any():
            rows, cols = np.flatnonzero(prev_mask.any(1)), np.flatnonzero(prev_mask.any(0))
            xs += [int(cols[0]), int(cols[-1])]
            ys += [int(rows[0]), int(rows[-1])]
        pad = self.click_radius + 4
        return max(0, min(xs) - pad), max(0, min(ys) - pad), min(w, max(xs) + pad + 1), min(h, max(ys) + pad + 1)

    def _image(self, image_id: int) -> np.ndarray:
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        image = self.catalog.load_image(image_id)
        with self._lock:
            self._cache[image_id] = image
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return image


class EditorRunner:
    """Runs an editor's calls one at a time on one worker thread, so a background
    ``prepare`` (opening or prefetching an object) and a click's ``predict`` never run
    concurrently on a model that is not thread-safe; predict waits for pending prepares."""

    def __init__(self, editor: MaskEditor) -> None:
        self.editor = editor
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spotfix-editor")

    def prepare_async(self, ann_id: int) -> Future:
        future = self._pool.submit(self.editor.prepare, ann_id)
        future.add_done_callback(lambda f: _log_failure(f, ann_id))
        return future

    def predict(self, ann_id: int, clicks: list[Click], prev_mask: np.ndarray | None, timeout: float = 120.0) -> np.ndarray:
        def run() -> np.ndarray:
            self.editor.prepare(ann_id)
            return self.editor.predict(ann_id, clicks, prev_mask)

        return self._pool.submit(run).result(timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _log_failure(future: Future, ann_id: int) -> None:
    # A failed prefetch is not fatal: the same error reaches the user on the first click.
    if not future.cancelled() and future.exception() is not None:
        log.warning("prepare(%d) failed: %s", ann_id, future.exception())


def editor_from_eval(result: dict) -> tuple[str, str] | None:
    """(editor, why) from an ``exits eval-clicks`` result, or None when it has no comparison.

    Spot-fix edits a pseudo mask, so the ``pseudo`` protocol decides (else ``standard``).
    The click model is chosen only when it needs fewer clicks than GrabCut with the same
    clicks at both 85 % and 90 % IoU and fails on no more objects at either; else GrabCut
    (the model-free editor wins ties).
    """
    protocols = result.get("protocols") or {}
    for name in ("pseudo", "standard"):
        p = protocols.get(name) or {}
        model, grab = p.get("click_model"), p.get("grabcut")
        if not model or not grab or not all(k in model and k in grab for k in ("NoC@85", "NoC@90", "NoF@85", "NoF@90")):
            continue
        wins = (model["NoC@85"] < grab["NoC@85"] and model["NoC@90"] < grab["NoC@90"]
                and model["NoF@85"] <= grab["NoF@85"] and model["NoF@90"] <= grab["NoF@90"])
        figures = (f"{name} protocol, {model.get('objects', '?')} objects: NoC@85 {model['NoC@85']:.2f} vs "
                   f"{grab['NoC@85']:.2f}, NoC@90 {model['NoC@90']:.2f} vs {grab['NoC@90']:.2f}, "
                   f"NoF@85 {model['NoF@85']} vs {grab['NoF@85']}, NoF@90 {model['NoF@90']} vs {grab['NoF@90']} "
                   "(click model vs GrabCut)")
        if wins:
            return "clicks", f"this run's eval-clicks: the click model needs fewer clicks ({figures})"
        return "grabcut", f"this run's eval-clicks: the click model does not beat GrabCut ({figures})"
    return None


def resolve_editor(kind: str, workdir: str | Path) -> tuple[str, str]:
    """(editor, why) for ``kind``; ``auto``: the run's own eval-clicks result
    (:func:`editor_from_eval`) when it measured the click model the run has now, else
    :data:`DEFAULT_EDITOR` when the run's click model hands late clicks to GrabCut (the measured
    combination), GrabCut when it does not or cannot be read; other kinds as given."""
    if kind != "auto":
        return kind, "chosen with --editor"
    run = RunFolder(workdir)
    if not run.click_model.is_file():
        return "grabcut", f"{run.click_model_dir} has no click model (`exits train-clicks --workdir {workdir}` makes one)"
    evaluated = run.click_eval
    if evaluated.is_file() and not choice_is_stale(run):
        try:
            with open(evaluated, encoding="utf-8") as fh:
                choice = editor_from_eval(json.load(fh))
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s); using the default editor", evaluated, exc)
            choice = None
        if choice is not None:
            return choice
    older = f"{evaluated} measured an older click model; " if evaluated.is_file() and choice_is_stale(run) else ""
    after = hand_over_click(run.click_model)
    if after is None:
        return "grabcut", older + f"{run.click_model} cannot be read as a click model"
    if after == 0:
        return "grabcut", older + NO_HAND_OVER_REASON.format(workdir=workdir)
    return DEFAULT_EDITOR, older + DEFAULT_REASON.format(workdir=workdir, after=after)


def choice_is_stale(run: RunFolder) -> bool:
    """The run's eval-clicks result is older than its click model."""
    return run.click_eval.stat().st_mtime < run.click_model.stat().st_mtime


def hand_over_click(model_path: Path) -> int | None:
    """The saved click model's ``grabcut_after`` (0: no hand-over), None when unreadable."""
    try:
        import torch

        payload = torch.load(model_path, map_location="cpu", weights_only=False)
        from exits.interactive.config import ClickModelConfig

        return int(ClickModelConfig.from_dict(payload["config"]).grabcut_after)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to GrabCut, say why
        log.warning("%s: cannot read the click model's settings (%s)", model_path, exc)
        return None


def load_editor(kind: str, workdir: str | Path, catalog: RunCatalog, device: str = "cpu") -> MaskEditor:
    """``grabcut``, ``clicks`` (the trained click model in WORKDIR/click_model) or ``auto``
    (:func:`resolve_editor`).

    Raises:
        EditorUnavailable: unknown kind, or no click model to load.
    """
    workdir = Path(workdir)
    if kind == "auto":
        kind = resolve_editor(kind, workdir)[0]
    if kind == "grabcut":
        return GrabCutEditor(catalog)
    if kind != "clicks":
        raise EditorUnavailable(f"unknown editor {kind!r}: choose auto, clicks or grabcut")
    missing = f"no click model in {RunFolder(workdir).click_model_dir}; run `exits train-clicks --workdir {workdir}`"
    if not RunFolder(workdir).click_model_dir.exists():
        raise EditorUnavailable(missing + " (or use --editor grabcut)")
    try:
        from exits.interactive.predictor import ClickPredictor
    except ImportError as exc:
        raise EditorUnavailable(f"the click model code cannot be imported ({exc}); use --editor grabcut") from exc
    try:
        return ClickPredictor.from_workdir(workdir, device=device)
    except FileNotFoundError as exc:
        raise EditorUnavailable(f"{missing} ({exc})") from exc
