"""Texture sampling for the demo scenes: random crops of photographs and their jitter.

A texture is a randomly rotated, scaled and possibly mirrored crop of a photograph,
sampled with one affine warp, then colour-jittered. Backgrounds are one or two such crops
(grey photographs tinted a random colour) joined along a smooth random boundary.
"""
from __future__ import annotations

import cv2
import numpy as np

from exits.demo.sources import BACKGROUND_SOURCES, crop_window, is_grey, load_source


def sample_texture(
    source: np.ndarray,
    out_hw: tuple[int, int],
    rng: np.random.Generator,
    window: tuple[float, float, float, float] = (0.2, 0.8, 0.2, 0.8),
    scale_range: tuple[float, float] = (0.5, 1.1),
    dst_centre: tuple[float, float] | None = None,
) -> np.ndarray:
    """Warp a random crop of ``source`` onto an (H, W) canvas.

    Output pixel p maps to source pixel  q = c_src + (1/s) R(theta) F (p - c_dst),
    with s ~ U(scale_range) (output pixels per source pixel), theta ~ U(0, 2 pi),
    F = diag(+-1, 1) a random mirror, c_src drawn inside ``window`` (fractions y0, y1, x0,
    x1 of the source) and c_dst = ``dst_centre`` (x, y) or the canvas centre. Pixels that
    fall outside the source are mirrored back in (BORDER_REFLECT_101).

    Args:
        source: (h, w, 3) float32 image.
        out_hw: (H, W) of the result.
    Returns:
        (H, W, 3) float32 texture.
    """
    h, w = out_hw
    sh, sw = source.shape[:2]
    y0, y1, x0, x1 = window
    c_src = np.array([rng.uniform(x0, x1) * sw, rng.uniform(y0, y1) * sh])
    s = rng.uniform(*scale_range)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    c_dst = np.array([w / 2.0, h / 2.0]) if dst_centre is None else np.asarray(dst_centre, dtype=np.float64)
    cos, sin = np.cos(theta), np.sin(theta)
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag([mirror, 1.0]) / s
    offset = c_src - linear @ c_dst
    matrix = np.hstack([linear, offset[:, None]]).astype(np.float64)
    return cv2.warpAffine(
        source, matrix, (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT_101,
    )


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Mild photometric jitter: saturation, contrast, per-channel gain and brightness.

    Saturation x1 = grey + t (x - grey) (grey = per-pixel channel mean), contrast
    x2 = m + k (x1 - m) (m = global mean, unchanged by the saturation step), gain and
    brightness x3 = g * x2 + b; clipped to [0, 1]. t ~ U(1 -/+ 0.25 s), k ~ U(1 -/+ 0.2 s),
    g_c ~ U(1 -/+ 0.12 s), b ~ U(-/+ 0.08 s), s = ``strength``. The three steps are one
    affine colour map x3 = A x + c, A = diag(g) k (t I + (1 - t) J / 3),
    c = g (1 - k) m + b, applied with a single cv2.transform.
    Mild on purpose: a category must stay recognisable by its photograph.
    """
    t = rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength)
    k = rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength)
    gains = rng.uniform(1 - 0.12 * strength, 1 + 0.12 * strength, size=3)
    brightness = rng.uniform(-0.08 * strength, 0.08 * strength)
    mean = float(image.mean())
    linear = np.diag(gains) @ (k * (t * np.eye(3) + (1.0 - t) * np.full((3, 3), 1.0 / 3.0)))
    offset = gains * (1.0 - k) * mean + brightness
    matrix = np.hstack([linear, offset[:, None]]).astype(np.float32)
    out = cv2.transform(np.ascontiguousarray(image, dtype=np.float32), matrix)
    return np.clip(out, 0.0, 1.0, out=out)


def tint(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour a grey image: x' = x * c, c a random colour with max channel 1, min >= 0.35."""
    colour = rng.uniform(0.35, 1.0, size=3)
    colour = (colour / colour.max()).astype(np.float32)
    return image * colour


def texture_from(name: str, out_hw: tuple[int, int], rng: np.random.Generator,
                 scale_range: tuple[float, float] = (0.5, 1.1),
                 dst_centre: tuple[float, float] | None = None,
                 jitter: float = 1.0) -> np.ndarray:
    """A jittered texture from the named photograph (grey photographs get a random tint)."""
    texture = sample_texture(load_source(name), out_hw, rng, crop_window(name), scale_range, dst_centre)
    if is_grey(name):
        texture = tint(texture, rng)
    return colour_jitter(texture, rng, jitter)


def smooth_region(out_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random smooth soft region in [0, 1], covering roughly 25-60% of the canvas.

    Low-resolution Gaussian noise, upsampled bicubically, thresholded at a random quantile
    and blurred, so the boundary between two background photographs is a soft curve.
    """
    h, w = out_hw
    grid = rng.standard_normal((int(rng.integers(2, 5)), int(rng.integers(2, 6)))).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    level = np.quantile(field, rng.uniform(0.4, 0.75))
    region = (field > level).astype(np.float32)
    return cv2.GaussianBlur(region, (0, 0), sigmaX=rng.uniform(1.0, 4.0))


def make_background(out_hw: tuple[int, int], rng: np.random.Generator,
                    sources: tuple[str, ...] = BACKGROUND_SOURCES) -> np.ndarray:
    """(H, W, 3) float32 background: a crop of one background photograph (from
    ``sources``), often joined with a crop of a second one along a smooth random boundary."""
    first, second = rng.choice(len(sources), size=2, replace=False)
    background = texture_from(sources[int(first)], out_hw, rng, scale_range=(0.6, 1.3))
    if rng.random() < 0.7:
        other = texture_from(sources[int(second)], out_hw, rng, scale_range=(0.6, 1.3))
        region = smooth_region(out_hw, rng)[..., None]
        background = region * other + (1.0 - region) * background
    return background.astype(np.float32)
