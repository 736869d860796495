"""Object crops as a torch Dataset: the input of every stage-1 model.

Each item is one object of the instances table: the resized crop around its extreme-point
box, the extreme points and the box in crop coordinates, and the box as a crop mask. No GT
mask is ever read here (training side of the leak boundary).

Two datasets give the same items:

* :class:`ObjectCropDataset` crops every object up front and holds the crops as uint8 (and
  per-object Python lists): for a shard (1b, 1d: ``flows.shard_size`` objects).
* :class:`StreamingCropDataset` cuts each crop when the item is read (in DataLoader worker
  processes with ``optim.num_workers``) and holds per object only two numpy arrays: for the
  training stages 1a and 1c over the whole table. Its crops are bitwise those of the cached
  dataset (same ``roi_align`` call per window, same uint8 rounding), so training on either
  gives the same weights.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from exits.data.crops import CropWindow, crop_images
from exits.data.images import image_file, read_rgb
from exits.data.instances_table import table_windows
from exits.io.parquet_rows import ROW_GROUP_ROWS


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


def to_uint8(crops: torch.Tensor) -> torch.Tensor:
    """Float crops in [0, 1] -> uint8 (round half to even, clamped): the one rounding both
    crop datasets apply, so their items are bitwise equal."""
    return crops.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


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
            out[rows] = to_uint8(crops)
        return out

    def __len__(self) -> int:
        return len(self.windows)

    def geometry(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Extreme points (B, 4, 2) and boxes (B, 4) in crop pixels of objects ``index``, float32."""
        index = np.asarray(index, dtype=np.int64)
        return self.points_crop[index], self.boxes[index]

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


class StreamingCropDataset(Dataset):
    """Crops of every object of the instances table, cut when an item is read.

    What it holds per object is two numpy arrays and nothing else: ``windows`` (K, 5) int64
    rows [image, x0, y0, width, height] (image = row of ``image_names``, the table's file
    names once each as one Arrow string array) and ``extreme_points`` (K, 4, 2) float64:
    104 bytes per object (89 MB for COCO's 860k objects, against 786 KB per object for the
    cached crops at 512 px). The table is read row group by row group, never whole.

    An item decodes its image (``read_rgb``, into a per-process LRU of decoded images of at
    most ``image_cache_mb`` MB, so objects of a recently seen image do not decode it again)
    and cuts its window with the same ``roi_align`` call and uint8 rounding as
    :class:`ObjectCropDataset` with ``cache=True``: items are bitwise equal. With
    ``optim.num_workers`` > 0 the DataLoader's worker processes do this (each its own LRU).
    """

    COLUMNS = ("file_name", "extreme_points", "crop_box")

    def __init__(self, instances: str | Path | pa.Table, image_dir: str | Path, crop_size: int, *,
                 image_cache_mb: float = 64.0):
        self.image_dir = Path(image_dir)
        self.size = int(crop_size)
        self.image_cache_bytes = int(image_cache_mb * 2**20)
        if isinstance(instances, pa.Table):
            num_rows, batches = instances.num_rows, instances.select(list(self.COLUMNS)).to_batches(ROW_GROUP_ROWS)
        else:
            pf = pq.ParquetFile(instances)
            num_rows = pf.metadata.num_rows
            batches = pf.iter_batches(batch_size=ROW_GROUP_ROWS, columns=list(self.COLUMNS))
        self.windows, self.extreme_points, self.image_names = self._read(batches, num_rows)
        self._images: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._image_bytes = 0

    @staticmethod
    def _read(batches: Iterable[pa.RecordBatch], num_rows: int) -> tuple[np.ndarray, np.ndarray, pa.StringArray]:
        windows = np.zeros((num_rows, 5), np.int64)
        points = np.zeros((num_rows, 4, 2), np.float64)
        image_ids: dict[str, int] = {}  # file name -> image row: only while reading
        row = 0
        for batch in batches:
            n = batch.num_rows
            if row + n > num_rows:
                raise ValueError(f"instances table has more than its {num_rows} rows")
            names = batch.column("file_name").dictionary_encode()
            lookup = np.array([image_ids.setdefault(name, len(image_ids)) for name in names.dictionary.to_pylist()],
                              np.int64)
            windows[row:row + n, 0] = lookup[names.indices.to_numpy(zero_copy_only=False)]
            windows[row:row + n, 1:] = batch.column("crop_box").flatten().to_numpy(zero_copy_only=False).reshape(n, 4)
            points[row:row + n] = batch.column("extreme_points").flatten().to_numpy(zero_copy_only=False).reshape(n, 4, 2)
            row += n
        if row != num_rows:
            raise ValueError(f"instances table has {row} rows, its metadata says {num_rows}")
        return windows, points, pa.array(list(image_ids), pa.string())

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, i: int) -> CropWindow:
        _, x0, y0, w, h = (int(v) for v in self.windows[i])
        return CropWindow(x0, y0, w, h, size=self.size)

    def file_name(self, i: int) -> str:
        return self.image_names[int(self.windows[i, 0])].as_py()

    def _object_geometry(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        win, p = self.window(i), self.extreme_points[i]
        return win.image_to_crop(p).astype(np.float32), box_in_crop(p, win)

    def geometry(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Extreme points (B, 4, 2) and boxes (B, 4) in crop pixels of objects ``index``, float32
        (the values :class:`ObjectCropDataset` holds for them)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        points = np.zeros((len(index), 4, 2), np.float32)
        boxes = np.zeros((len(index), 4), np.float32)
        for b, i in enumerate(index):
            points[b], boxes[b] = self._object_geometry(int(i))
        return points, boxes

    def _image(self, k: int) -> torch.Tensor:
        img = self._images.get(k)
        if img is not None:
            self._images.move_to_end(k)
            return img
        img = load_image_tensor(image_file(self.image_dir, self.image_names[k].as_py()))
        self._images[k] = img
        self._image_bytes += img.numel() * img.element_size()
        while self._image_bytes > self.image_cache_bytes and len(self._images) > 1:
            _, old = self._images.popitem(last=False)
            self._image_bytes -= old.numel() * old.element_size()
        return img

    def crop(self, i: int) -> torch.Tensor:
        """(3, S, S) float crop in [0, 1], rounded through uint8 like the cached dataset's."""
        img = self._image(int(self.windows[i, 0]))
        return to_uint8(crop_images(img, [self.window(i)]))[0].float().div_(255.0)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        points, box = self._object_geometry(i)
        with one_torch_thread():
            return {
                "index": i,
                "image": self.crop(i),
                "points": torch.from_numpy(points),
                "box": torch.from_numpy(box),
                "box_mask": box_mask(box, self.size),
            }


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with one torch thread, then restore the count.

    One object's crop is far too small for intra-op threads: with 2 threads on a busy 2-core
    machine an item took 20-30 ms instead of 1.3 ms (thread hand-offs), which would have made
    streaming in the training process (``num_workers: 0``, the demo) slower than the cache.
    DataLoader workers already run with one thread. The values do not depend on the count
    (every output pixel is computed on its own)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
