"""Object and occluder shapes for the demo scenes, rendered as anti-aliased alpha maps.

Objects: smooth star-convex blobs, ellipses, rounded polygons, and the horse silhouette
that ships with scikit-image (thin legs that occluders readily cut off). Occluders: bars
(long "poles" crossing the whole image or shorter "strips") and small blobs.

Every shape is an (H, W) float32 alpha in [0, 1] with anti-aliased edges; the binary mask
of a shape is ``alpha >= 0.5`` (the composite uses the alpha, the labels the mask).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

OBJECT_FAMILIES: tuple[str, ...] = ("blob", "ellipse", "polygon", "horse")
OBJECT_FAMILY_WEIGHTS: tuple[float, ...] = (0.35, 0.25, 0.25, 0.15)
_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point vertices: 1/16 pixel


def rasterize_polygon(points: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Anti-aliased fill of a closed polygon given as (N, 2) [x, y] pixel coordinates.

    Returns an (H, W) float32 alpha in [0, 1].
    """
    h, w = out_hw
    canvas = np.zeros((h, w), dtype=np.uint8)
    fixed = np.round(np.asarray(points, dtype=np.float64) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [fixed], 255, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)
    return canvas.astype(np.float32) / 255.0


def _rotate(offsets: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return offsets @ np.array([[cos, sin], [-sin, cos]])


def star_blob_contour(rng: np.random.Generator, radius: float, n_points: int = 96) -> np.ndarray:
    """Smooth star-convex contour, (N, 2) offsets from the centre.

    r(phi) = radius * (1 + sum_{k=2..5} a_k cos(k phi + b_k)) / max_phi(...), with
    a_k ~ U(0, 0.3 / (k - 1)) so low frequencies dominate and r stays > 0; then a random
    anisotropic stretch and rotation.
    """
    phi = np.linspace(0.0, 2.0 * np.pi, n_points, endpoint=False)
    r = np.ones_like(phi)
    for k in range(2, 6):
        r += rng.uniform(0.0, 0.3 / (k - 1)) * np.cos(k * phi + rng.uniform(0.0, 2.0 * np.pi))
    r = radius * r / r.max()
    offsets = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    offsets[:, 1] *= rng.uniform(0.65, 1.0)
    return _rotate(offsets, rng.uniform(0.0, np.pi))


def ellipse_contour(rng: np.random.Generator, radius: float, n_points: int = 96) -> np.ndarray:
    """Ellipse with semi-axes radius and radius * U(0.45, 1), at a random angle."""
    phi = np.linspace(0.0, 2.0 * np.pi, n_points, endpoint=False)
    offsets = np.stack([radius * np.cos(phi), radius * rng.uniform(0.45, 1.0) * np.sin(phi)], axis=1)
    return _rotate(offsets, rng.uniform(0.0, np.pi))


def chaikin_smooth(points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Chaikin corner cutting on a closed polygon: each edge (p, q) is replaced by the points
    3/4 p + 1/4 q and 1/4 p + 3/4 q; repeated, corners become rounded arcs."""
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


def rounded_polygon_contour(rng: np.random.Generator, radius: float) -> np.ndarray:
    """Polygon with 3-7 jittered vertices on a circle of ``radius``, corners rounded."""
    n = int(rng.integers(3, 8))
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, size=n)) * (2.0 * np.pi / n) + rng.uniform(0.0, 2.0 * np.pi)
    radii = radius * rng.uniform(0.75, 1.0, size=n)
    vertices = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return chaikin_smooth(vertices, iterations=3)


@functools.lru_cache(maxsize=1)
def _horse_silhouette() -> np.ndarray:
    """The scikit-image horse (black on white in the file), as a tight float32 alpha crop."""
    import skimage.data as skdata

    horse = ~skdata.horse()
    ys, xs = np.nonzero(horse)
    crop = horse[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32)
    crop.setflags(write=False)
    return crop


def horse_alpha(rng: np.random.Generator, out_hw: tuple[int, int], centre: tuple[float, float],
                diameter: float) -> np.ndarray:
    """The horse silhouette scaled so its longer side is ``diameter``, centred at ``centre``
    (x, y), rotated by up to +-25 degrees and mirrored at random."""
    h, w = out_hw
    src = _horse_silhouette()
    sh, sw = src.shape
    s = diameter / max(sh, sw)
    theta = rng.uniform(-0.44, 0.44)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    cos, sin = np.cos(theta), np.sin(theta)
    # dst -> src: q = c_src + (1/s) R F (p - c_dst), as in textures.sample_texture.
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag([mirror, 1.0]) / s
    offset = np.array([sw / 2.0, sh / 2.0]) - linear @ np.asarray(centre, dtype=np.float64)
    matrix = np.hstack([linear, offset[:, None]])
    return cv2.warpAffine(src, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def random_object_alpha(rng: np.random.Generator, out_hw: tuple[int, int],
                        size_range: tuple[float, float] = (0.3, 0.6)) -> tuple[np.ndarray, str]:
    """One object shape: family drawn from OBJECT_FAMILIES, extent U(size_range) times the
    mean image side, centre in the middle 70% of the image.

    Returns:
        ((H, W) float32 alpha, family name).
    """
    h, w = out_hw
    diameter = rng.uniform(*size_range) * (h + w) / 2.0
    centre = (rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h)
    family = OBJECT_FAMILIES[int(rng.choice(len(OBJECT_FAMILIES), p=OBJECT_FAMILY_WEIGHTS))]
    if family == "horse":
        return horse_alpha(rng, out_hw, centre, diameter), family
    radius = diameter / 2.0
    if family == "blob":
        offsets = star_blob_contour(rng, radius)
    elif family == "ellipse":
        offsets = ellipse_contour(rng, radius)
    else:
        offsets = rounded_polygon_contour(rng, radius)
    return rasterize_polygon(offsets + np.asarray(centre), out_hw), family


def bar_alpha(out_hw: tuple[int, int], through: tuple[float, float], angle: float,
              width: float, length: float) -> np.ndarray:
    """A straight bar (rotated rectangle) centred on ``through`` (x, y), long axis at
    ``angle`` radians, with the given width and length in pixels."""
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    c = np.asarray(through, dtype=np.float64)
    half_l, half_w = direction * length / 2.0, normal * width / 2.0
    corners = np.stack([c - half_l - half_w, c + half_l - half_w, c + half_l + half_w, c - half_l + half_w])
    return rasterize_polygon(corners, out_hw)


def blob_alpha(rng: np.random.Generator, out_hw: tuple[int, int], centre: tuple[float, float],
               radius: float) -> np.ndarray:
    """A small star-convex occluder blob of the given radius at ``centre`` (x, y)."""
    return rasterize_polygon(star_blob_contour(rng, radius, n_points=64) + np.asarray(centre), out_hw)
