"""The human step of ``exits loop`` without Prefect: the triage budget, what the reviewer
did, and the loop's final summary.

- :func:`select_budget` picks the masks a reviewer is asked to look at: the K lowest-scoring
  pseudo masks, or those scoring below a threshold, or the K lowest of those.
- :func:`review_outcome` counts the decisions in ``fixes/fixes.jsonl`` (fixed = accepted
  after at least one click, accepted = the pseudo mask confirmed as it is, rejected) and,
  when GT masks exist, the mIoU of the fixed set before and after the fixes.
- :func:`write_loop_summary` writes ``loop/summary.json`` and ``loop/summary.md``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow.parquet as pq

from exits.io import atomic_open, file_digest, read_json_if_exists, write_json
from exits.run_folder import RunFolder

__all__ = ["select_budget", "write_review_queue", "read_review_queue", "review_outcome", "record_detector_metrics",
           "detector_before_after", "write_loop_summary"]


def select_budget(ann_ids: np.ndarray, scores: np.ndarray, budget: int | None,
                  below_score: float | None) -> list[int]:
    """The triage budget: ids of the masks to review, worst score first (ties by id).

    Args:
        ann_ids: (N,) int annotation ids. scores: (N,) float pseudo-mask scores (NaN = unknown,
            ranked worst). budget: K, the most masks to review (None = no count limit).
        below_score: keep only masks with score < below_score (None = no score limit).
    Returns:
        ``ids[order][:K]`` where ``order`` sorts by (score, id) ascending over the masks that
        pass ``below_score``.
    """
    ann_ids = np.asarray(ann_ids, np.int64)
    scores = np.asarray(scores, np.float64)
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((ann_ids, key))
    if below_score is not None:
        order = order[key[order] < below_score]
    if budget is not None:
        order = order[:budget]
    return [int(a) for a in ann_ids[order]]


def write_review_queue(workdir: str | Path, budget: int | None, below_score: float | None) -> dict[str, Any]:
    """Select the budget from ``pseudo_labels.parquet`` (two columns read) and write
    ``loop/review.json``: ``{"ann_ids", "budget", "below_score", "source_blake2b", "scores"}``."""
    run = RunFolder(workdir)
    table = pq.read_table(run.pseudo_parquet, columns=["ann_id", "score"])
    ids = table.column("ann_id").to_numpy()
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    chosen = select_budget(ids, scores, budget, below_score)
    by_id = dict(zip(ids.tolist(), scores.tolist()))
    queue = {"ann_ids": chosen, "budget": budget, "below_score": below_score, "objects": int(len(ids)),
             "source_blake2b": file_digest(run.pseudo_json, memo=False),
             "scores": [None if np.isnan(by_id[a]) else round(float(by_id[a]), 5) for a in chosen]}
    run.loop_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.review_queue, queue, indent=1)
    return queue


def read_review_queue(workdir: str | Path) -> dict[str, Any] | None:
    """``loop/review.json`` or None when there is none.

    Raises:
        ValueError: the file is not valid JSON or has no ``ann_ids`` list (names the file).
    """
    path = RunFolder(workdir).review_queue
    data = read_json_if_exists(path)
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("ann_ids"), list):
        raise ValueError(f"{path}: expected an object with an 'ann_ids' list")
    return data


def review_outcome(workdir: str | Path, budget_ids: Iterable[int] = (), gt: str | Path | None = None) -> dict[str, Any]:
    """What the reviewer decided, from the latest decision per object in ``fixes/fixes.jsonl``.

    ``fixed``: accepted with at least one click (the mask was edited); ``accepted``: the mask
    confirmed as it was; ``rejected``: dropped from the training json. ``in_budget``: how many
    of the triage budget were decided. With ``gt`` (a json with GT masks for these objects):
    ``fixed_miou = {"before", "after", "count"}``, the mean IoU against GT of the fixed
    objects' pseudo masks (before) and of their fixed masks (after).
    """
    from exits.spotfix.store import FixesStore

    run = RunFolder(workdir)
    latest = FixesStore(run.root).latest() if run.fixes_file.is_file() else {}
    fixed = {a: r for a, r in latest.items() if r.decision == "accept" and r.rle is not None and r.clicks}
    budget = set(int(a) for a in budget_ids)
    out: dict[str, Any] = {
        "fixed": len(fixed), "accepted": sum(r.decision == "accept" and not r.clicks for r in latest.values()),
        "rejected": sum(r.decision == "reject" for r in latest.values()),
        "budget": len(budget), "in_budget": sum(a in budget for a in latest), "fixed_miou": None}
    if gt is not None and fixed:
        out["fixed_miou"] = fixed_set_miou(run, {a: r.rle for a, r in fixed.items()}, Path(gt))
    return out


def fixed_set_miou(run: RunFolder, fixes: Mapping[int, dict[str, Any]], gt: Path) -> dict[str, Any] | None:
    """Mean IoU against GT over the fixed objects that have a GT mask:
    before = mean_i IoU(pseudo_i, gt_i), after = mean_i IoU(fix_i, gt_i); None when none has one."""
    from exits.eval.ground_truth import load_gt_masks
    from exits.eval.mask_iou import instance_ious

    truth = load_gt_masks(gt, set(fixes))
    if not truth:
        return None
    pseudo = _pseudo_rles(run, set(truth))
    before = instance_ious(pseudo, truth)
    after = instance_ious({a: fixes[a] for a in truth}, truth)
    return {"before": round(float(np.mean(list(before.values()))), 4),
            "after": round(float(np.mean(list(after.values()))), 4), "count": len(truth), "gt": str(gt)}


def _pseudo_rles(run: RunFolder, ids: set[int]) -> dict[int, dict[str, Any]]:
    """``{ann_id: RLE}`` of the pseudo masks of ``ids`` (from ``pseudo_labels.parquet``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pq.read_table(run.pseudo_parquet, columns=["ann_id", "height", "width", "rle_counts"])
    table = table.filter(pc.is_in(table.column("ann_id"), value_set=pa.array(sorted(ids), pa.int64())))
    rows = table.to_pydict()
    return {int(a): {"size": [int(h), int(w)], "counts": c}
            for a, h, w, c in zip(rows["ann_id"], rows["height"], rows["width"], rows["rle_counts"])}


def record_detector_metrics(workdir: str | Path, train_json: str | Path, decisions: int, gt: str | Path,
                            summary: Mapping[str, Any]) -> dict[str, Any]:
    """Add the detector's metrics on ``gt`` to ``loop/detector_history.json`` under the digest of
    the json it trained on, with the digest of the pseudo labels it came from and how many
    human decisions were merged into it (0 = the pseudo labels as they were), so a loop finds
    the AP of the same pseudo labels without fixes ("before") beside the AP with them ("after").
    Returns the history."""
    run = RunFolder(workdir)
    path = run.detector_history
    history = read_json_if_exists(path) or {}
    entry = history.setdefault(file_digest(train_json, memo=False), {})
    entry.update({"train_json": Path(train_json).name, "source_blake2b": file_digest(run.pseudo_json, memo=False),
                  "decisions": int(decisions), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    entry.setdefault("metrics", {})[str(Path(gt).resolve())] = dict(summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, history, indent=1)
    return history


def detector_before_after(workdir: str | Path, gt: str | Path, train_json: str | Path) -> dict[str, Any]:
    """``{"before": metrics | None, "after": metrics | None}`` on ``gt``, from
    ``loop/detector_history.json``: after = the detector trained on ``train_json`` when human
    decisions were merged into it; before = one trained on the same pseudo labels with no
    decisions merged (a ``--no-review`` loop, or a review that decided nothing)."""
    run = RunFolder(workdir)
    history = read_json_if_exists(run.detector_history) or {}
    key = str(Path(gt).resolve())
    source = file_digest(run.pseudo_json, memo=False)
    current = history.get(file_digest(train_json, memo=False), {})
    plain = [e for e in history.values() if e.get("source_blake2b") == source and e.get("decisions") == 0
             and key in e.get("metrics", {})]
    before = plain[-1]["metrics"][key] if plain else None
    after = current.get("metrics", {}).get(key) if current.get("decisions", 0) > 0 else None
    return {"before": before, "after": after}


def write_loop_summary(workdir: str | Path, summary: Mapping[str, Any]) -> Path:
    """``loop/summary.json`` and a short ``loop/summary.md`` (the report's loop section)."""
    run = RunFolder(workdir)
    run.loop_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.loop_summary, dict(summary), indent=1)
    review = summary.get("review") or {}
    lines = ["# exits loop", "", f"- flow run: `{summary.get('flow_run_id')}`",
             f"- reviewed: {'yes' if summary.get('reviewed') else 'no (--no-review)'}"]
    if review:
        lines.append(f"- triage budget: {review.get('budget', 0)} masks; decided in the budget: {review.get('in_budget', 0)}")
        lines.append(f"- fixed: {review.get('fixed', 0)}, accepted as they were: {review.get('accepted', 0)}, "
                     f"rejected: {review.get('rejected', 0)}")
        fm = review.get("fixed_miou")
        if fm:
            lines.append(f"- mIoU of the {fm['count']} fixed masks against GT: {100 * fm['before']:.1f} before, "
                         f"{100 * fm['after']:.1f} after the fixes")
    if summary.get("miou_all") is not None:
        lines.append(f"- pseudo-mask mIoU (report): {100 * summary['miou_all']:.1f} all, "
                     f"{100 * summary['miou_separated']:.1f} separated")
    ap = summary.get("mask_ap") or {}
    if ap.get("after") is not None or ap.get("before") is not None:
        def fmt(m: Mapping[str, Any] | None) -> str:
            return "–" if not m else f"{m.get('mask_AP', float('nan')):.2f}"
        lines.append(f"- detector mask AP on {Path(str(ap.get('gt'))).name}: {fmt(ap.get('before'))} before fixes, "
                     f"{fmt(ap.get('after'))} after")
    with atomic_open(run.loop_summary_md) as fh:
        fh.write("\n".join(lines) + "\n")
    return run.loop_summary
