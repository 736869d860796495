"""Reference pseudo-mask baselines that need no training: the box, GrabCut, a dense CRF.

They are what EXITS is measured against (bench/bench_stage1.py, and the "parts" table of a
run's report, :mod:`exits.report.parts`): (a) the extreme-point box filled as a mask,
(b) OpenCV GrabCut initialised from the box with the extreme points as sure foreground,
(c) a fully connected CRF (pydensecrf) over a box prior with the extreme points as sure
foreground. :func:`peer_masks` computes any of them for a list of objects (each image read
once), the one loop both callers use.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from exits.data.crops import CropWindow
from exits.grabcut import ensure_background, is_foreground, run_grabcut

# The peers by name, in the order reports and benchmarks list them.
PEERS = ("box", "grabcut", "densecrf")


def box_mask_full(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of the box spanned by the extreme points (pixel indices inclusive)."""
    p = np.asarray(points).round().astype(int)
    m = np.zeros((height, width), np.uint8)
    m[p[0, 1]:p[2, 1] + 1, p[1, 0]:p[3, 0] + 1] = 1
    return m


def grabcut_mask(image_rgb: np.ndarray, points: np.ndarray, window: CropWindow, *, iters: int = 5,
                 point_radius: int = 2) -> np.ndarray:
    """GrabCut inside the crop window; returns an (H, W) uint8 mask of the whole image.

    Init: outside the extreme-point box = sure background, inside = probable foreground,
    a disk of ``point_radius`` px around each extreme point = sure foreground.
    """
    h, w = image_rgb.shape[:2]
    x0, y0, ww, wh = window.as_list()
    p = np.asarray(points).round().astype(int) - np.array([x0, y0])
    init = np.full((wh, ww), cv2.GC_BGD, np.uint8)
    init[p[0, 1]:p[2, 1] + 1, p[1, 0]:p[3, 0] + 1] = cv2.GC_PR_FGD
    for x, y in p:
        cv2.circle(init, (int(x), int(y)), point_radius, int(cv2.GC_FGD), -1)
    # With the box filling the window GrabCut has no background: its border becomes some.
    if not run_grabcut(image_rgb, ensure_background(init), x0, y0, iters=iters):
        return box_mask_full(points, h, w)  # degenerate colour statistics (e.g. a flat crop)
    out = np.zeros((h, w), np.uint8)
    out[y0:y0 + wh, x0:x0 + ww] = is_foreground(init)
    return out


# Box-prior dense CRF peer. Chosen once on the demo split, then fixed for every split: a
# weak FG prior inside the box lets the bilateral kernel carve out regions that look like
# the outside; the kernel reach scales with the window so small and large objects are
# treated alike. Demo sweep (mIoU all / separated): box_prob 0.5 -> 32.0/24.0 (the CRF
# wipes the box), 0.53 -> 80.0/69.7, 0.55 -> 80.4/68.9, 0.6 -> 77.7/64.4, 0.7 -> 73.5/58.5;
# sxy_bilateral_frac 0.1/0.5 and srgb 8/20 and compat_bilateral 5/20 at box_prob 0.6 were
# no better than 0.2 / 13 / 10.
DENSE_PEER_PARAMS: dict[str, float] = {"box_prob": 0.55, "iters": 10, "sxy_gauss": 3.0,
                                       "compat_gauss": 3.0, "sxy_bilateral_frac": 0.2, "srgb": 13.0,
                                       "compat_bilateral": 10.0}


def dense_crf_box_mask(image_rgb: np.ndarray, points: np.ndarray, window: CropWindow, *, point_radius: int = 2,
                       **params: float) -> np.ndarray:
    """Dense CRF (pydensecrf) over a flat box prior inside the crop window, at image resolution.

    Prior p(fg): 0 outside the extreme-point box (sure BG), ``box_prob`` inside, 1 in a disk
    of ``point_radius`` px around each extreme point (sure FG); the energy and kernels of
    ``exits.crf.image_refine.box_prior_crf`` (the refinement EXITS's stage 1d uses, there
    with the generator's probability as the prior). Returns (H, W) uint8.
    """
    from exits.crf.image_refine import box_prior_crf

    p = {**DENSE_PEER_PARAMS, **params}
    crf = {"iters": int(p["iters"]), "sxy_gauss": p["sxy_gauss"], "compat_gauss": p["compat_gauss"],
           "sxy_frac": p["sxy_bilateral_frac"], "srgb": p["srgb"], "compat_bilateral": p["compat_bilateral"]}
    return box_prior_crf(image_rgb, window, points, p["box_prob"], point_radius=point_radius, **crf).astype(np.uint8)


@dataclass(frozen=True)
class PeerObject:
    """What a peer needs of one object: its image file, extreme points (4, 2) [x, y] (top,
    left, bottom, right), the crop window [x0, y0, width, height] stage 1 used (from the
    instances table) and the image size."""

    ann_id: int
    file_name: str
    extreme_points: np.ndarray
    crop_box: tuple[int, int, int, int]
    height: int
    width: int

    def window(self) -> CropWindow:
        """The crop window (the peers work at image resolution: the resize ``size`` is unused,
        set to the window's longer side)."""
        x0, y0, w, h = (int(v) for v in self.crop_box)
        return CropWindow(x0, y0, w, h, size=max(w, h, 1))


def peer_mask(kind: str, obj: PeerObject, image_rgb: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8 mask of ``obj`` by peer ``kind`` (one of :data:`PEERS`); ``image_rgb``
    (H, W, 3) uint8 is needed by all but "box"."""
    if kind == "box":
        return box_mask_full(obj.extreme_points, obj.height, obj.width)
    if kind not in PEERS:
        raise ValueError(f"unknown peer {kind!r}: expected one of {', '.join(PEERS)}")
    if image_rgb is None:
        raise ValueError(f"peer {kind!r} needs the image of annotation {obj.ann_id}")
    fn = grabcut_mask if kind == "grabcut" else dense_crf_box_mask
    return fn(image_rgb, obj.extreme_points, obj.window())


def peer_masks(objects: Sequence[PeerObject], images: str | Path, kinds: Iterable[str] = PEERS,
               ) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, float]]:
    """Masks of ``objects`` by each peer of ``kinds``, as COCO RLE (``counts`` a str).

    Objects are visited grouped by image file, so each image is read once
    (:func:`exits.data.images.read_rgb`, the stages' reader; only when a peer other than
    "box" is asked for) and one image is held at a time.

    Returns:
        ``{kind: {ann_id: rle}}`` and ``{kind: seconds per object}`` (compute time only).
    Raises:
        FileNotFoundError, exits.data.images.ImageReadError: an image cannot be read.
        ValueError: an image's size differs from the object's (names the file).
    """
    from exits.data.images import image_file, read_rgb
    from exits.eval.rle import encode_rle_json

    kinds = list(kinds)
    for kind in kinds:
        if kind not in PEERS:
            raise ValueError(f"unknown peer {kind!r}: expected one of {', '.join(PEERS)}")
    needs_image = any(k != "box" for k in kinds)
    out: dict[str, dict[int, dict[str, Any]]] = {k: {} for k in kinds}
    seconds = dict.fromkeys(kinds, 0.0)
    image, image_name = None, None
    for obj in sorted(objects, key=lambda o: (o.file_name, o.ann_id)):
        if needs_image and obj.file_name != image_name:
            path = image_file(images, obj.file_name)
            image, image_name = read_rgb(path), obj.file_name
            if image.shape[:2] != (obj.height, obj.width):
                raise ValueError(f"{path}: image is {image.shape[1]}x{image.shape[0]} px but annotation "
                                 f"{obj.ann_id} expects {obj.width}x{obj.height}")
        for kind in kinds:
            t0 = time.perf_counter()
            mask = peer_mask(kind, obj, image)
            seconds[kind] += time.perf_counter() - t0
            out[kind][int(obj.ann_id)] = encode_rle_json(mask)
    n = max(1, len(objects))
    return out, {k: v / n for k, v in seconds.items()}


def peer_objects_of_table(table: Any) -> list[PeerObject]:
    """:class:`PeerObject` of each row of an instances table (``exits.data.instances_table``:
    ann_id, file_name, extreme_points, crop_box, height, width), in row order."""
    cols = table.select(["ann_id", "file_name", "extreme_points", "crop_box", "height", "width"]).to_pydict()
    return [PeerObject(ann_id=int(a), file_name=str(f), extreme_points=np.asarray(p, np.float64).reshape(4, 2),
                       crop_box=tuple(int(v) for v in c), height=int(h), width=int(w))
            for a, f, p, c, h, w in zip(cols["ann_id"], cols["file_name"], cols["extreme_points"], cols["crop_box"],
                                        cols["height"], cols["width"])]
