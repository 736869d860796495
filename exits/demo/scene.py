"""One demo scene: photo-textured objects over a photo background, with occluders in front.

Layering, back to front: background, objects in drawing order (a later object hides an
earlier one), occluders (in front of every object). The visible mask of object i is

    V_i = M_i  AND NOT (OR_{j > i} M_j)  AND NOT (OR_k O_k)

with M = object masks, O = occluder masks (alpha >= 0.5 for both).

Occluders are placed on purpose: each object is picked with probability ``p_cut`` and a
bar (a pole across the whole image, a shorter strip, or a pair of parallel bars) is laid
through an interior point of its visible mask, so that a good share of objects end up as
*separated* (two or more visible parts, see ``exits.eval.separated``). A few distractor
occluders (small blobs, thin poles) go anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from exits.eval.separated import count_mask_parts as count_visible_parts
from exits.demo.shapes import bar_alpha, blob_alpha, random_object_alpha
from exits.demo.sources import DEMO_SOURCES, SourceSet
from exits.demo.textures import make_background, texture_from

DEFAULT_P_CUT = 0.3  # gives ~40% separated objects (~14% come from overlaps and distractors alone)
MIN_AREA_FRACTION = 0.01  # objects whose visible area is below this share of the image are not labelled
MAX_CUT_ATTEMPTS = 3


@dataclass(frozen=True)
class SceneObject:
    """A labelled object of a scene: category index into the variant's categories, shape family,
    and its visible (H, W) bool mask."""

    category: int
    family: str
    mask: np.ndarray


def composite(image: np.ndarray, texture: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha blending: out = alpha * texture + (1 - alpha) * image, alpha (H, W), images (H, W, 3)."""
    a = alpha[..., None]
    return a * texture + (1.0 - a) * image


def _interior_point(mask: np.ndarray, rng: np.random.Generator, jitter: float) -> tuple[float, float]:
    """A mask pixel near the centroid (moved by Gaussian jitter, in pixels), as (x, y).

    Snapping to the nearest mask pixel keeps the point inside non-convex shapes (a horse's
    centroid can lie between its legs)."""
    ys, xs = np.nonzero(mask)
    target = np.array([xs.mean(), ys.mean()]) + rng.normal(0.0, jitter, size=2)
    nearest = int(np.argmin((xs - target[0]) ** 2 + (ys - target[1]) ** 2))
    return float(xs[nearest]), float(ys[nearest])


def cutting_occluder(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Alpha of an occluder laid across ``mask`` so that it splits it into parts.

    The bar passes through an interior point p at a random angle; its width is
    U(0.08, 0.22) * d with d = 2 sqrt(area / pi) the mask's equivalent diameter. A strip is
    made long enough to reach past the object's farthest pixel along the bar axis, so it
    always cuts right through; a pole spans the image; a fence is two parallel bars.
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    diameter = 2.0 * np.sqrt(xs.size / np.pi)
    point = _interior_point(mask, rng, jitter=0.12 * diameter)
    angle = rng.uniform(0.0, np.pi)
    width = max(3.0, rng.uniform(0.08, 0.22) * diameter)
    kind = rng.choice(3, p=(0.4, 0.4, 0.2))  # pole, strip, fence
    direction = np.array([np.cos(angle), np.sin(angle)])
    if kind == 0:
        return bar_alpha((h, w), point, angle, width, length=2.0 * (h + w))
    reach = np.abs((xs - point[0]) * direction[0] + (ys - point[1]) * direction[1]).max()
    length = 2.0 * reach + rng.uniform(4.0, 0.5 * diameter + 4.0)
    if kind == 1:
        return bar_alpha((h, w), point, angle, width, length)
    normal = np.array([-direction[1], direction[0]])
    half_gap = rng.uniform(0.12, 0.2) * diameter + width / 2.0
    bars = [bar_alpha((h, w), tuple(np.asarray(point) + sign * half_gap * normal), angle, width, length)
            for sign in (-1.0, 1.0)]
    return np.maximum(bars[0], bars[1])


def distractor_occluder(out_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Alpha of an occluder placed without regard to the objects: a blob or a thin pole."""
    h, w = out_hw
    side = (h + w) / 2.0
    centre = (rng.uniform(0.0, w), rng.uniform(0.0, h))
    if rng.random() < 0.6:
        return blob_alpha(rng, out_hw, centre, radius=rng.uniform(0.05, 0.14) * side)
    return bar_alpha(out_hw, centre, rng.uniform(0.0, np.pi), rng.uniform(3.0, 0.05 * side), 2.0 * (h + w))


def visible_masks(full_masks: list[np.ndarray], occluded: np.ndarray) -> list[np.ndarray]:
    """V_i = M_i minus every later object minus the occluders (later objects are in front)."""
    covered = occluded.copy()
    visible: list[np.ndarray] = [np.zeros_like(occluded)] * len(full_masks)
    for i in range(len(full_masks) - 1, -1, -1):
        visible[i] = full_masks[i] & ~covered
        covered |= full_masks[i]
    return visible


def render_scene(
    rng: np.random.Generator,
    out_hw: tuple[int, int],
    p_cut: float = DEFAULT_P_CUT,
    min_area_fraction: float = MIN_AREA_FRACTION,
    max_objects: int = 4,
    sources: SourceSet = DEMO_SOURCES,
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw one scene.

    Args:
        rng: the scene's own generator (all randomness comes from it).
        out_hw: (H, W) of the image.
        p_cut: probability that an object gets an occluder laid across it on purpose.
        min_area_fraction: objects with fewer visible pixels than this share of H*W are
            left out of the labels (they stay in the picture).
        max_objects: objects per image are drawn uniformly from 1..max_objects.
        sources: photographs for objects, background and occluders (a demo variant).
    Returns:
        ((H, W, 3) uint8 RGB image, labelled objects in drawing order).
    """
    h, w = out_hw
    min_area = min_area_fraction * h * w
    image = make_background(out_hw, rng, sources.backgrounds)

    full_masks: list[np.ndarray] = []
    categories: list[int] = []
    families: list[str] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        alpha, family = random_object_alpha(rng, out_hw)
        mask = alpha >= 0.5
        if not mask.any():
            continue
        category = int(rng.integers(len(sources.categories)))
        ys, xs = np.nonzero(mask)
        texture = texture_from(sources.categories[category], out_hw, rng, scale_range=(0.45, 1.1),
                               dst_centre=(float(xs.mean()), float(ys.mean())))
        image = composite(image, texture, alpha)
        full_masks.append(mask)
        categories.append(category)
        families.append(family)

    occluder_alphas: list[np.ndarray] = []
    occluded = np.zeros((h, w), dtype=bool)
    before_occluders = visible_masks(full_masks, occluded)
    for i in range(len(full_masks)):
        if rng.random() >= p_cut:
            continue
        for _ in range(MAX_CUT_ATTEMPTS):
            current = before_occluders[i] & ~occluded
            if current.sum() < min_area or count_visible_parts(current) >= 2:
                break
            alpha = cutting_occluder(current, rng)
            occluder_alphas.append(alpha)
            occluded |= alpha >= 0.5
    for _ in range(int(rng.choice(3, p=(0.45, 0.4, 0.15)))):
        alpha = distractor_occluder(out_hw, rng)
        occluder_alphas.append(alpha)
        occluded |= alpha >= 0.5

    for alpha in occluder_alphas:
        source = sources.occluders[int(rng.integers(len(sources.occluders)))]
        image = composite(image, texture_from(source, out_hw, rng, scale_range=(0.5, 1.2)), alpha)

    # Camera-like finish: slight blur softens every pasted edge, then sensor noise.
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=rng.uniform(0.3, 0.8))
    image = image + rng.normal(0.0, rng.uniform(0.005, 0.02), size=image.shape).astype(np.float32)
    image_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)

    objects = [
        SceneObject(category=c, family=f, mask=m)
        for c, f, m in zip(categories, families, visible_masks(full_masks, occluded))
        if m.sum() >= min_area
    ]
    return image_u8, objects
