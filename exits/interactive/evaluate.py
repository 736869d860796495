"""Robot-user evaluation of the click model against GrabCut (same clicker, same objects).

Protocols:
  ``pseudo``   start from the run's pseudo mask and edit it;
  ``scratch``  no mask at the start (IoU 0 before the first click);
  both stop a curve early once IoU >= ``stop_iou`` (0.95) or no error is left (the
  project's spot-fix protocol: a person stops when the mask is good);
  ``standard`` the papers' protocol (RITM / InterFormer tables): from scratch, always
  ``max_clicks`` (20) clicks, no early stop, NoF@t = objects never reaching t in 20.
At each step the robot (:func:`exits.interactive.robot.next_click`, RITM convention)
clicks on the current error of the *whole image* (GT and prediction are full-image masks,
IoU is over the whole image), the method predicts with all clicks so far and its previous
output, and the IoU is recorded. The methods themselves work in the object's crop window
(the extreme-point box plus margin), which the papers' whole-image models do not have.
Metrics: :func:`exits.interactive.metrics.summarize_curves`.

GT masks are read only here, through :mod:`exits.eval.ground_truth` (the leak boundary).
Objects are those of the run with a GT mask and a pseudo mask, ordered as the spot-fix
queue orders them (lowest pseudo ``score`` first); objects the click model trained on are
left out by default.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from exits.data.images import image_file
from exits.eval.ground_truth import load_gt_masks
from exits.eval.rle import decode_rle
from exits.interactive.clicks import Click
from exits.interactive.config import INFERENCE_ONLY
from exits.interactive.data import decode_segmentation
from exits.interactive.grabcut import grabcut_from_clicks
from exits.interactive.metrics import mask_iou, summarize_curves
from exits.interactive.model_io import CLICK_MODEL_PATH, load_click_model
from exits.run_folder import RunFolder
from exits.interactive.predictor import ClickPredictor
from exits.interactive.robot import next_click
from exits.io import write_json
from exits.stages.object_crops import load_image_tensor

__all__ = ["robot_curve", "run_eval_clicks", "PROTOCOLS"]

PROTOCOLS = ("scratch", "pseudo", "standard")
DEFAULT_PROTOCOLS = ("scratch", "pseudo")
PredictFn = Callable[[list[Click], "np.ndarray | None"], np.ndarray]


def robot_curve(predict: PredictFn, gt: np.ndarray, init_mask: np.ndarray | None, max_clicks: int = 20,
                stop_iou: float | None = 0.95) -> tuple[list[float], list[Click]]:
    """IoU after 0..k clicks (k <= max_clicks) and the robot's clicks, for one object."""
    gt = np.asarray(gt, bool)
    pred = np.zeros_like(gt) if init_mask is None else np.asarray(init_mask, bool)
    ious = [mask_iou(pred, gt) if init_mask is not None else 0.0]
    clicks: list[Click] = []
    clicked = np.zeros_like(gt)
    prev = None if init_mask is None else pred
    for _ in range(max_clicks):
        if stop_iou is not None and ious[-1] >= stop_iou:
            break
        click = next_click(gt, pred, clicked)
        if click is None:
            break
        clicked[int(click[1]), int(click[0])] = True
        clicks.append(click)
        pred = np.asarray(predict(list(clicks), prev), bool)
        prev = pred
        ious.append(mask_iou(pred, gt))
    return ious, clicks


def _select_objects(predictor: ClickPredictor, pseudo: dict[int, dict], gt_ids: set[int], exclude: set[int],
                    ann_ids: Sequence[int] | None, num_objects: int | None, offset: int = 0) -> list[int]:
    if ann_ids is not None:
        return [int(a) for a in ann_ids]
    ids = [a for a in predictor.objects if a in pseudo and a in gt_ids and a not in exclude]
    ids.sort(key=lambda a: (float(pseudo[a].get("score", 0.0)), a))
    ids = ids[offset:]
    return ids[:num_objects] if num_objects else ids


def run_eval_clicks(workdir: str | Path, gt_json: str | Path, *, out_path: str | Path | None = None,
                    model_path: str | Path | None = None, ann_ids: Sequence[int] | None = None,
                    num_objects: int | None = 40, object_offset: int = 0, max_clicks: int = 20,
                    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
                    progressive: bool | None = None, with_grabcut: bool = True, exclude_trained: bool = True,
                    stop_iou: float | None = 0.95, device: str = "cpu", keep_curves: bool = False,
                    constraint: str | None = None, inference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate and write a json (default WORKDIR/click_model/eval_clicks.json).

    Result: {"settings", "ann_ids", "protocols": {protocol: {"click_model": metrics,
    "grabcut": metrics}}, "seconds_per_click": {...}} with metrics NoC@85, NoC@90, NoF@85,
    NoF@90, mIoU@k (see :mod:`exits.interactive.metrics`). ``object_offset`` skips the first
    objects of the queue (e.g. 40: the next 40 objects, a split for tuning inference settings
    apart from the 40 the benchmark reports on). ``constraint`` overrides the
    model's click constraint (none / disk / crf / grabcut) for this evaluation; ``inference``
    overrides other settings that act only after the decoder
    (:data:`exits.interactive.config.INFERENCE_ONLY`, e.g. ``{"crf_resolution": "window"}``).
    """
    workdir = Path(workdir)
    bad = sorted(set(protocols) - set(PROTOCOLS))
    if bad:
        raise ValueError(f"unknown protocols {bad}; choose from {list(PROTOCOLS)}")
    model_path = Path(model_path) if model_path is not None else workdir / CLICK_MODEL_PATH
    predictor = ClickPredictor.from_workdir(workdir, device=device, model_path=model_path)
    if progressive is not None:
        predictor.progressive = bool(progressive)
    if constraint is not None:
        predictor.constraint = str(constraint)
    if inference:
        bad_keys = sorted(set(inference) - set(INFERENCE_ONLY))
        if bad_keys:
            raise ValueError(f"not inference-only settings: {bad_keys}; choose from {list(INFERENCE_ONLY)}")
        predictor.decoder.config = dataclasses.replace(predictor.decoder.config, **inference)
        predictor.constraint = predictor.decoder.config.constraint if constraint is None else predictor.constraint
        predictor.progressive = predictor.decoder.config.progressive if progressive is None else predictor.progressive
    _, payload = load_click_model(model_path)
    trained = set(int(a) for a in payload.get("extra", {}).get("train_ann_ids", [])) if exclude_trained else set()
    pseudo_json = json.loads(RunFolder(workdir).pseudo_json.read_text(encoding="utf-8"))
    pseudo = {int(a["id"]): a for a in pseudo_json["annotations"]}
    gt = load_gt_masks(gt_json, set(predictor.objects))
    ids = _select_objects(predictor, pseudo, set(gt), trained, ann_ids, num_objects, object_offset)
    radius_of = lambda info: predictor.decoder.config.disk_radius * max(info.window.width, info.window.height) / info.window.size  # noqa: E731

    curves: dict[str, dict[str, list[list[float]]]] = {p: {"click_model": [], "grabcut": []} for p in protocols}
    timing = {"click_model": [0.0, 0], "grabcut": [0.0, 0]}
    for ann_id in ids:
        info = predictor.objects[ann_id]
        h, w = info.image_size
        gt_mask = decode_rle(gt[ann_id].rle)
        image_rgb = None
        pts = info.extreme_points
        box = np.array([pts[1, 0], pts[0, 1], pts[3, 0], pts[2, 1]])
        for protocol in protocols:
            init = decode_segmentation(pseudo[ann_id]["segmentation"], h, w) if protocol == "pseudo" else None
            if protocol == "pseudo" and init is None:
                init = np.zeros((h, w), bool)

            def model_fn(clicks: list[Click], prev: np.ndarray | None, _a: int = ann_id) -> np.ndarray:
                t = time.perf_counter()
                out = predictor.predict(_a, clicks, prev)
                timing["click_model"][0] += time.perf_counter() - t
                timing["click_model"][1] += 1
                return out

            predictor.prepare(ann_id)
            stop = None if protocol == "standard" else stop_iou
            curves[protocol]["click_model"].append(robot_curve(model_fn, gt_mask, init, max_clicks, stop)[0])
            if with_grabcut:
                if image_rgb is None:
                    image_rgb = (load_image_tensor(image_file(predictor.images_dir, info.file_name)).permute(1, 2, 0).numpy()
                                 * 255).round().astype(np.uint8)

                def grabcut_fn(clicks: list[Click], prev: np.ndarray | None, _i: Any = info, _img: Any = image_rgb) -> np.ndarray:
                    t = time.perf_counter()
                    out = grabcut_from_clicks(_img, clicks, _i.window, prev, box=box, radius=radius_of(_i))
                    timing["grabcut"][0] += time.perf_counter() - t
                    timing["grabcut"][1] += 1
                    return out

                curves[protocol]["grabcut"].append(robot_curve(grabcut_fn, gt_mask, init, max_clicks, stop)[0])

    result: dict[str, Any] = {
        "settings": {"workdir": str(workdir), "gt_json": str(gt_json), "model_path": str(model_path),
                     "max_clicks": max_clicks, "object_offset": object_offset, "stop_iou": stop_iou,
                     "progressive": predictor.progressive, "constraint": predictor.constraint,
                     "inference": dict(inference or {}), "protocols": list(protocols),
                     "exclude_trained": exclude_trained, "robot": "RITM: farthest point from error boundary, padded EDT"},
        "ann_ids": ids,
        "protocols": {p: {m: summarize_curves(c, max_clicks, thresholds=(0.85, 0.9)) for m, c in v.items() if c}
                      for p, v in curves.items()},
        "seconds_per_click": {m: (t / n if n else None) for m, (t, n) in timing.items()},
    }
    if keep_curves:
        result["curves"] = curves
    write_json(out_path if out_path is not None else RunFolder(workdir).click_eval, result, indent=2)
    return result
