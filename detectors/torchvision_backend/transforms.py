"""Training augmentations on (image, target) pairs: horizontal flip and scale jitter.

Images are float tensors (3, H, W) in [0, 1]; targets hold ``masks`` (N, H, W) uint8,
``boxes`` (N, 4) float xyxy and ``labels`` (N,). Boxes are always recomputed from the
masks after a geometric change, so they stay the tight box of the mask (as in the dataset).
Randomness comes from an explicit ``torch.Generator`` so a training run can replay the
exact augmentation of any iteration on resume.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Target = dict[str, Any]
# Padding colour for scale jitter: the ImageNet mean the model normalises with, so padded
# pixels become 0 after normalisation instead of a strong black edge.
PAD_RGB = (0.485, 0.456, 0.406)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks in COCO pixel convention.

    box = [x_min, y_min, x_max + 1, y_max + 1] over the mask's pixels (the same box as
    ``pycocotools.mask.toBbox`` in xyxy form). Empty masks give [0, 0, 0, 0].

    Args:
        masks: (N, H, W), non-zero = object.
    Returns:
        (N, 4) float32.
    """
    n = masks.shape[0]
    out = torch.zeros((n, 4), dtype=torch.float32)
    if n == 0:
        return out
    m = masks != 0
    rows = m.any(dim=2)  # (N, H)
    cols = m.any(dim=1)  # (N, W)
    h, w = m.shape[1:]
    ys = torch.arange(h).expand(n, h)
    xs = torch.arange(w).expand(n, w)
    nonempty = rows.any(dim=1)
    big = torch.iinfo(torch.int64).max
    out[:, 0] = torch.where(cols, xs, big).min(dim=1).values.float()
    out[:, 1] = torch.where(rows, ys, big).min(dim=1).values.float()
    out[:, 2] = torch.where(cols, xs, -1).max(dim=1).values.float() + 1
    out[:, 3] = torch.where(rows, ys, -1).max(dim=1).values.float() + 1
    out[~nonempty] = 0.0
    return out


def keep_nonempty(target: Target, boxes: torch.Tensor | None = None) -> Target:
    """Drop objects whose mask became empty (e.g. cropped away).

    ``boxes``: the objects' transformed boxes (N, 4) to keep; ``None`` = tight mask boxes.
    """
    masks = target["masks"]
    keep = (masks.flatten(1) != 0).any(dim=1) if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
    if boxes is not None and boxes.shape[0]:
        keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = dict(target)
    for key in ("masks", "labels", "ann_ids"):
        if key in out:
            out[key] = out[key][keep]
    out["boxes"] = boxes_from_masks(out["masks"]) if boxes is None else boxes[keep]
    return out


def boxes_are_mask_boxes(target: Target) -> bool:
    """True when ``target``'s boxes are exactly the tight boxes of its masks."""
    return bool(torch.equal(target["boxes"], boxes_from_masks(target["masks"])))


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror left-right: x -> W - x for boxes (x1' = W - x2, x2' = W - x1)."""
    out = dict(target)
    out["masks"] = target["masks"].flip(-1)
    boxes = target["boxes"].clone()
    width = image.shape[-1]
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    out["boxes"] = boxes
    return image.flip(-1), out


def scale_jitter(image: torch.Tensor, target: Target, scale: float, generator: torch.Generator) -> tuple[torch.Tensor, Target]:
    """Rescale content by ``scale`` on a canvas of unchanged size (crop or pad back).

    Why a fixed canvas: Mask R-CNN's own transform resizes every image to ``min_size``, which
    would undo a plain resize. Scaling the content and then cropping (scale > 1, random
    window) or padding (scale < 1, bottom/right, mean colour) keeps the canvas size, so the
    objects really appear at different sizes (large-scale-jitter style). Masks use nearest
    interpolation; objects cut away entirely are dropped and boxes recomputed.
    """
    _, h, w = image.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    masks = target["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
    else:
        masks = masks.new_zeros((0, nh, nw))
    # Crop a random window where the scaled image is larger, pad where it is smaller.
    y0 = int(torch.randint(0, nh - h + 1, (1,), generator=generator)) if nh > h else 0
    x0 = int(torch.randint(0, nw - w + 1, (1,), generator=generator)) if nw > w else 0
    img = img[:, y0 : y0 + h, x0 : x0 + w]
    masks = masks[:, y0 : y0 + h, x0 : x0 + w]
    canvas = torch.tensor(PAD_RGB, dtype=image.dtype).view(3, 1, 1).expand(3, h, w).clone()
    canvas[:, : img.shape[1], : img.shape[2]] = img
    mask_canvas = masks.new_zeros((masks.shape[0], h, w))
    mask_canvas[:, : masks.shape[1], : masks.shape[2]] = masks
    out = dict(target)
    out["masks"] = mask_canvas
    if boxes_are_mask_boxes(target):
        return canvas, keep_nonempty(out)
    # Boxes given independently of the masks (extreme-point boxes): map them with the same
    # scale and shift, clipped to the visible content: x' = clip(s x - x0, 0, min(W, nW - x0)).
    boxes = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    boxes -= torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, min(w, nw - x0))
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, min(h, nh - y0))
    return canvas, keep_nonempty(out, boxes)


class TrainAugmentation:
    """Random horizontal flip (p = 0.5) then scale jitter with factor ~ U(low, high)."""

    def __init__(self, hflip: bool = True, scale_range: tuple[float, float] | None = None) -> None:
        self.hflip = hflip
        self.scale_range = scale_range

    def __call__(self, image: torch.Tensor, target: Target, generator: torch.Generator) -> tuple[torch.Tensor, Target]:
        # Draw every random number even when a step is off so the stream does not depend
        # on which augmentations are enabled.
        flip_draw = float(torch.rand((), generator=generator))
        scale_draw = float(torch.rand((), generator=generator))
        if self.hflip and flip_draw < 0.5:
            image, target = hflip(image, target)
        if self.scale_range is not None:
            lo, hi = self.scale_range
            scale = lo + (hi - lo) * scale_draw
            if scale != 1.0:
                image, target = scale_jitter(image, target, scale, generator)
        return image, target
