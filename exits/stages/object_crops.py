"""Object crops as a torch Dataset: the input of every stage-1 model.

Each item is one object of the instances table: the resized crop around its extreme-point
box, the extreme points and the box in crop coordinates, and the box as a crop mask. No GT
mask is ever read here (training side of the leak boundary).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from exits.data.crops import CropWindow, crop_images
from exits.data.images import image_file, read_rgb
from exits.data.instances_table import table_windows


def load_image_tensor(path: str | Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    arr = read_rgb(path)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def box_in_crop(points: np.ndarray, window: CropWindow) -> np.ndarray:
    """Extreme-point box as pixel-edge coordinates [x0, y0, x1, y1] in the crop.

    The box covers image pixels x_l..x_r, i.e. edges [x_l, x_r + 1); edges map by
    u = (x - x0) * S / w (no half-pixel shift for edges).
    """
    sx, sy = window.scale
    x0 = (points[1, 0] - window.x0) * sx
    x1 = (points[3, 0] + 1 - window.x0) * sx
    y0 = (points[0, 1] - window.y0) * sy
    y1 = (points[2, 1] + 1 - window.y0) * sy
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def box_mask(box: np.ndarray, size: int) -> torch.Tensor:
    """(S, S) float mask of crop pixels whose centre lies inside ``box`` (edge coords)."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    inside_x = (c >= box[0]) & (c <= box[2])
    inside_y = (c >= box[1]) & (c <= box[3])
    return (inside_y[:, None] & inside_x[None, :]).float()


class ObjectCropDataset(Dataset):
    """Crops of the objects in ``table`` (rows of the instances table).

    With ``cache=True`` all crops are made once, image by image (one decode per image, all
    its objects cropped in one ``roi_align`` call), and kept as uint8: 27 KB per object at
    96 px. With ``cache=False`` each item decodes its image (small LRU cache), for shards too
    large to hold.
    """

    def __init__(self, table: pa.Table, image_dir: str | Path, crop_size: int, *, cache: bool = True,
                 progress: bool = False):
        self.image_dir = Path(image_dir)
        self.size = crop_size
        self.windows = table_windows(table, crop_size)
        cols = table.select(["ann_id", "image_id", "file_name", "extreme_points"]).to_pydict()
        self.ann_ids: list[int] = cols["ann_id"]
        self.file_names: list[str] = cols["file_name"]
        self.points_image = [np.asarray(p, dtype=np.float64).reshape(4, 2) for p in cols["extreme_points"]]
        self.points_crop = np.stack([w.image_to_crop(p) for w, p in zip(self.windows, self.points_image)]).astype(np.float32) \
            if len(self.windows) else np.zeros((0, 4, 2), np.float32)
        self.boxes = np.stack([box_in_crop(p, w) for w, p in zip(self.windows, self.points_image)]) \
            if len(self.windows) else np.zeros((0, 4), np.float32)
        self._load = lru_cache(maxsize=8)(lambda name: load_image_tensor(image_file(self.image_dir, name)))
        self._crops: torch.Tensor | None = self._crop_all(progress) if cache else None

    def _crop_all(self, progress: bool) -> torch.Tensor:
        out = torch.zeros((len(self), 3, self.size, self.size), dtype=torch.uint8)
        by_file: dict[str, list[int]] = {}
        for i, name in enumerate(self.file_names):
            by_file.setdefault(name, []).append(i)
        for name, rows in tqdm(by_file.items(), desc="cropping objects", disable=not progress, unit="img"):
            img = load_image_tensor(image_file(self.image_dir, name))
            crops = crop_images(img, [self.windows[i] for i in rows])
            out[rows] = crops.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return out

    def __len__(self) -> int:
        return len(self.windows)

    def crop(self, i: int) -> torch.Tensor:
        """(3, S, S) float crop in [0, 1]."""
        if self._crops is not None:
            return self._crops[i].float().div_(255.0)
        return crop_images(self._load(self.file_names[i]), [self.windows[i]])[0].clamp_(0, 1)

    def __getitem__(self, i: int) -> dict:
        return {
            "index": i,
            "image": self.crop(i),
            "points": torch.from_numpy(self.points_crop[i]),
            "box": torch.from_numpy(self.boxes[i]),
            "box_mask": box_mask(self.boxes[i], self.size),
        }
