"""Heavy features, computed once per object: the generator ViT's patch tokens of the crop.

:class:`ObjectFeatures` holds what the decoder needs for one object besides the clicks:
the crop window, the crop image and the encoder's patch tokens. :class:`FeatureCache` is a
small LRU of them (the web page prepares the queued objects ahead of the person's clicks).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from exits.data.crops import CropWindow, crop_images

__all__ = ["ObjectFeatures", "FeatureCache", "encode_crops"]


@dataclass(frozen=True)
class ObjectFeatures:
    """Cached inputs of one object: tokens (h*w, C) float32, image (3, S, S) in [0, 1], and
    ``window_image`` (3, h, w) the window's native pixels (the click constraint can work at
    the image's resolution instead of the resampled crop's, ``crf_resolution: window``);
    ``derived`` what the predictor derives from them once per object, by key: the click
    constraint's CRF kernels (:class:`exits.interactive.constrain.CrfKernels`) and the
    decoder's click-independent inputs (:class:`exits.interactive.decoder.StaticInputs`)."""

    ann_id: int
    window: CropWindow
    image_size: tuple[int, int]  # (H, W) of the full image
    tokens: torch.Tensor
    grid: tuple[int, int]
    crop: torch.Tensor
    window_image: torch.Tensor | None = None
    derived: dict = field(default_factory=dict, compare=False, repr=False)


@torch.no_grad()
def encode_crops(encoder: nn.Module, crops: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch tokens (K, h*w, C) float32 and the grid (h, w) of (K, 3, S, S) crops in [0, 1]
    (``encoder`` = a :class:`exits.models.mask_model.MaskModel`, used through ``encode``)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out, grid = [], (0, 0)
    for i in range(0, len(crops), batch_size):
        tokens, grid = encoder.encode(crops[i:i + batch_size].to(device))
        out.append(tokens.float().cpu())
    return torch.cat(out), tuple(grid)


def object_features(encoder: nn.Module, ann_id: int, image: torch.Tensor, window: CropWindow) -> ObjectFeatures:
    """Crop one object of ``image`` (3, H, W) and encode it."""
    crop = crop_images(image, [window]).clamp_(0, 1)
    tokens, grid = encode_crops(encoder, crop)
    return ObjectFeatures(ann_id=int(ann_id), window=window, image_size=(int(image.shape[1]), int(image.shape[2])),
                          tokens=tokens[0], grid=grid, crop=crop[0],
                          window_image=image[:, window.y0:window.y0 + window.height,
                                             window.x0:window.x0 + window.width].clamp(0, 1).contiguous())


class FeatureCache:
    """LRU cache ann_id -> :class:`ObjectFeatures` with at most ``capacity`` entries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[int, ObjectFeatures] = OrderedDict()
        # A web server may prefetch (prepare) on one thread while a click is served on another.
        self._lock = threading.RLock()

    def __contains__(self, ann_id: int) -> bool:
        return int(ann_id) in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, ann_id: int, make: Callable[[], ObjectFeatures]) -> ObjectFeatures:
        """The cached entry (marked most recent), else ``make()`` stored, evicting the oldest."""
        key = int(ann_id)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = make()
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return value
