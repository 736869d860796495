"""A small synthetic run folder for the spot-fix tests (no trained model, no demo data).

Images: textured grey background with saturated coloured objects, so GrabCut separates
them. Each pseudo mask is the true shape with a known defect (or exact), with a score.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from exits.data.crops import crop_window
from exits.data.extreme_points import derive_extreme_points
from exits.data.instances_table import SCHEMA

H, W = 72, 96


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def disk(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def true_masks() -> dict[int, tuple[int, int, np.ndarray, tuple[int, int, int]]]:
    """{ann_id: (image_id, category_id, true mask, RGB colour)}."""
    square = np.zeros((H, W), bool)
    square[30:50, 62:82] = True
    return {
        1: (1, 1, disk(28, 34, 15), (220, 30, 30)),
        2: (1, 2, square, (30, 200, 40)),
        3: (2, 1, disk(25, 36, 9) | disk(62, 36, 9), (30, 60, 230)),
        4: (2, 2, disk(80, 14, 7), (240, 220, 20)),
    }


def pseudo_masks(truth: dict) -> dict[int, np.ndarray]:
    """Object 1 misses its right half (the worst, score 0.30); the others are exact."""
    out = {k: v[2].copy() for k, v in truth.items()}
    out[1][:, 28:] = False
    return out


SCORES = {1: 0.30, 2: 0.90, 3: 0.55, 4: 0.70}


def make_run(root: Path) -> Path:
    """Write ROOT/images/*.png and the run folder ROOT/run/ (pseudo_labels.json,
    instances.parquet, run.json). Returns the run folder."""
    img_dir, run = root / "images", root / "run"
    img_dir.mkdir(parents=True)
    run.mkdir()
    rng = np.random.default_rng(0)
    truth = true_masks()
    canvases = {i: (110 + rng.integers(-25, 25, (H, W, 1)) + np.zeros((1, 1, 3))).clip(0, 255) for i in (1, 2)}
    for image_id, _, mask, colour in truth.values():
        canvases[image_id][mask] = np.asarray(colour) + rng.integers(-10, 10, (int(mask.sum()), 3))
    images = []
    for image_id, arr in canvases.items():
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(img_dir / f"im{image_id}.png")
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "width": W, "height": H})
    pseudo = pseudo_masks(truth)
    anns, rows = [], {name: [] for name in SCHEMA.names}
    for ann_id, (image_id, cat, mask, _) in truth.items():
        pts = derive_extreme_points(mask.astype(np.uint8))
        rle = rle_of(pseudo[ann_id])
        anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                     "segmentation": rle, "area": float(mask_utils.area(rle)),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "extreme_points": pts.astype(int).tolist(), "score": SCORES[ann_id],
                     "num_parts": 99})  # input-json value, must not be used for "separated"
        win = crop_window(pts, W, H, margin=0.15, min_margin_px=4, size=32)
        for key, value in (("ann_id", ann_id), ("image_id", image_id), ("category_id", cat),
                           ("file_name", f"im{image_id}.png"), ("width", W), ("height", H),
                           ("bbox", anns[-1]["bbox"]), ("extreme_points", pts.reshape(-1).tolist()),
                           ("crop_box", win.as_list()), ("split", "train"), ("points_source", "given")):
            rows[key].append(value)
    data = {"info": {}, "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "round"}, {"id": 2, "name": "other"}]}
    (run / "pseudo_labels.json").write_text(json.dumps(data))
    pq.write_table(pa.table(rows, schema=SCHEMA), run / "instances.parquet")
    (run / "run.json").write_text(json.dumps({"images": str(img_dir), "annotations": None, "gt": None}))
    return run
