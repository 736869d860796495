"""Mask <-> wire formats for the spot-fix page: COCO RLE (stored, exported) and an RGBA PNG
overlay (what the page draws over the image).

RLEs on the wire and in the fixes store are COCO compressed RLE with ``str`` counts,
``{"size": [height, width], "counts": "..."}`` (JSON-safe); pycocotools does the coding.
"""
from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from exits.eval.rle import encode_rle_json as encode_rle  # noqa: F401 - re-exported for the page's modules
from exits.eval.rle import to_rle
from exits.eval.separated import count_parts_rle

OVERLAY_RGBA = (0, 170, 255, 120)


def decode_rle(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """A compressed/uncompressed RLE dict -> (H, W) bool mask, checked against the image size.

    Raises:
        ValueError: malformed RLE, size other than (height, width), or runs that do not
            cover exactly height * width pixels.
    """
    canonical = to_rle(rle)
    if tuple(canonical["size"]) != (height, width):
        raise ValueError(f"mask size {list(canonical['size'])} differs from the image size [{height}, {width}]")
    # pycocotools decodes corrupt counts into garbage instead of raising; re-encoding and
    # comparing the pixel count catches runs that overflow or underflow the image.
    counts = canonical["counts"]
    if not counts or any(c < 48 or c > 111 for c in counts):
        raise ValueError("compressed RLE 'counts' holds characters outside the RLE alphabet")
    runs = _runs(counts)
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, but the image has {height * width}")
    return mask_utils.decode(canonical).astype(bool)


def _runs(counts: bytes) -> list[int]:
    """COCO's LEB128-like run-length decoding (pycocotools' rleFrString), used only to
    validate untrusted RLEs before decoding: pycocotools itself does not check run sums."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("compressed RLE 'counts' ends inside a run")
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("compressed RLE holds a negative run")
        runs.append(x)
    return runs


def rle_area_bbox(rle: dict[str, Any]) -> tuple[float, list[float]]:
    """(area, [x, y, w, h]) of an RLE, as COCO computes them."""
    canonical = to_rle(rle)
    return float(mask_utils.area(canonical)), [float(v) for v in mask_utils.toBbox(canonical)]


def rle_parts(rle: dict[str, Any]) -> int:
    """Visible parts of a mask (the project's separated rule, exits.eval.separated)."""
    return count_parts_rle(to_rle(rle))


def overlay_png(mask: np.ndarray, rgba: tuple[int, int, int, int] = OVERLAY_RGBA) -> bytes:
    """(H, W) mask -> PNG bytes, ``rgba`` on the object and fully transparent elsewhere."""
    m = np.asarray(mask, dtype=bool)
    out = np.zeros((*m.shape, 4), np.uint8)
    r, g, b, a = rgba
    out[m] = (b, g, r, a)  # OpenCV writes BGRA
    ok, buf = cv2.imencode(".png", out, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def overlay_data_url(mask: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(overlay_png(mask)).decode("ascii")
