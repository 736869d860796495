"""Stage 1b: retrieve pseudo FG/BG points for every object with the frozen extractor.

Per batch of crops: S = head/layer-mean attention over patch tokens (B, n, n) ->
Sinkhorn -> T = (A + A^T)/2 -> random walks from P_FG and P_BG -> thresholds. The result
is one Parquet row per object with its patch indices (the labels of the point loss).
BG seeds from the image's other objects (``exits.propagation.neighbours``) are stored in
``seed_bg_extra`` so the generator's point loss uses the same seeds as the retrieval. A
shard takes them from all the objects of its images in the instances table
(:func:`image_neighbours`), so they do not depend on where the shard boundaries fall.
Dataset-wide runs compute it per shard of objects (``exits.stages.shards``) and merge the
shard files into ``points.parquet`` with :func:`merge_points`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from exits.data.instances_table import read_image_rows, table_windows
from exits.io import atomic_path
from exits.stages.shards import ROW_GROUP_ROWS, iter_shards, read_rows, write_table_streaming
from exits.models import similarity_matrix
from exits.propagation import retrieve_points, seed_masks
from exits.propagation.appearance import mix_similarity
from exits.propagation.neighbours import NeighbourObjects, neighbour_bg_seeds
from exits.stages.object_crops import box_in_crop

log = logging.getLogger(__name__)

POINTS_SCHEMA = pa.schema(
    [
        ("ann_id", pa.int64()),
        ("grid", pa.int32()),
        ("seed_fg", pa.list_(pa.int32())),   # P_FG: patches of the moved-in extreme points
        ("num_seed_bg", pa.int32()),          # |P_BG|: patches outside the box (not stored: derivable)
        ("pseudo_fg", pa.list_(pa.int32())),  # retrieved foreground patches (P^_FG)
        ("pseudo_bg", pa.list_(pa.int32())),  # retrieved background patches (P^_BG)
        ("num_box", pa.int32()),              # |P_Box|
        ("seed_bg_extra", pa.list_(pa.int32())),  # BG seeds from the image's other objects (in P_BG)
        ("valid", pa.bool_()),                # both seed sets non-empty (else nothing is retrieved)
    ]
)


@dataclass(frozen=True)
class RetrievalParams:
    grid: int
    crop_size: int
    delta_px: float
    alpha: int
    tau_fg: float
    tau_bg: float
    sinkhorn_iters: int
    normalize: bool
    layers: tuple[int, ...]
    batch_size: int
    appearance_weight: float = 0.0
    appearance_sigma: float = 0.05
    raw_scale: str = "uniform"
    min_mass: float = 0.0
    neighbour_bg: str = "fallback"   # none | fallback (only objects with no BG seed) | always


def image_neighbours(instances: Path, table: pa.Table, start: int, stop: int,
                     crop_size: int) -> tuple[list[int], NeighbourObjects]:
    """The image id of each of a shard's objects (``table`` = rows ``[start, stop)`` of the
    instances table at ``instances``) and the other objects of the same images outside the
    shard, read with :func:`exits.data.instances_table.read_image_rows` (only the row groups
    holding them). Their crop points and boxes are computed as ``ObjectCropDataset``'s."""
    groups = [int(i) for i in table.column("image_id").to_pylist()]
    rows, found = read_image_rows(instances, sorted(set(groups)), ["image_id", "extreme_points", "crop_box"])
    outside = np.flatnonzero((rows < start) | (rows >= stop))
    found = found.take(pa.array(outside, type=pa.int64()))
    windows = table_windows(found, crop_size)
    points = [np.asarray(p, dtype=np.float64).reshape(4, 2) for p in found.column("extreme_points").to_pylist()]
    points_crop = np.stack([w.image_to_crop(p) for w, p in zip(windows, points)]).astype(np.float32) \
        if windows else np.zeros((0, 4, 2), np.float32)
    boxes = np.stack([box_in_crop(p, w) for w, p in zip(windows, points)]) if windows else np.zeros((0, 4), np.float32)
    others = NeighbourObjects(groups=[int(i) for i in found.column("image_id").to_pylist()], windows=windows,
                              points_crop=points_crop, boxes_crop=boxes)
    return groups, others


@torch.no_grad()
def retrieve_dataset_points(model: torch.nn.Module, dataset: torch.utils.data.Dataset, params: RetrievalParams,
                            device: torch.device, progress: bool = True, groups: list | None = None,
                            others: NeighbourObjects | None = None) -> pa.Table:
    """One row per dataset item (in order): seeds and retrieved patch indices.

    Neighbour BG seeds (``params.neighbour_bg``) come from the objects with the same
    ``groups`` key (default: the dataset's file names) among the dataset's objects and
    ``others`` (a shard: :func:`image_neighbours`, the image's objects outside it)."""
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=params.batch_size, shuffle=False)
    rows: dict[str, list] = {name: [] for name in POINTS_SCHEMA.names}
    ann_ids = getattr(dataset, "ann_ids")
    extra_all = None
    if params.neighbour_bg != "none":
        extra_all = neighbour_bg_seeds(dataset.file_names if groups is None else groups, dataset.windows,
                                       dataset.points_crop, dataset.boxes, params.grid, params.delta_px, others=others)
    for batch in tqdm(loader, desc="retrieving points", disable=not progress, unit="batch"):
        images = batch["image"].to(device)
        S = similarity_matrix(model, images, layers=params.layers).float()
        S = mix_similarity(S, images, params.grid, params.appearance_weight, params.appearance_sigma)
        extra = extra_all[batch["index"]] if extra_all is not None else None
        seeds = seed_masks(batch["points"].to(device), batch["box"].to(device), params.crop_size, params.grid,
                           params.delta_px, extra_bg=extra, extra_bg_only_if_empty=params.neighbour_bg == "fallback")
        ret = retrieve_points(S, seeds, alpha=params.alpha, tau_fg=params.tau_fg, tau_bg=params.tau_bg,
                              sinkhorn_iters=params.sinkhorn_iters, normalize=params.normalize,
                              raw_scale=params.raw_scale, min_mass=params.min_mass)
        outside = seed_masks(batch["points"], batch["box"], params.crop_size, params.grid, params.delta_px).bg.numpy()
        fg, bg = ret.pseudo_fg.cpu().numpy(), ret.pseudo_bg.cpu().numpy()
        seed_fg, seed_bg, box = seeds.fg.cpu().numpy(), seeds.bg.cpu().numpy(), seeds.box.cpu().numpy()
        for j, idx in enumerate(batch["index"].tolist()):
            rows["ann_id"].append(int(ann_ids[idx]))
            rows["grid"].append(params.grid)
            rows["seed_fg"].append(np.flatnonzero(seed_fg[j]).astype(np.int32).tolist())
            rows["num_seed_bg"].append(int(seed_bg[j].sum()))
            rows["pseudo_fg"].append(np.flatnonzero(fg[j]).astype(np.int32).tolist())
            rows["pseudo_bg"].append(np.flatnonzero(bg[j]).astype(np.int32).tolist())
            rows["num_box"].append(int(box[j].sum()))
            rows["seed_bg_extra"].append(np.flatnonzero(seed_bg[j] & ~outside[j]).astype(np.int32).tolist())
            rows["valid"].append(bool(ret.valid[j]))
    table = pa.table(rows, schema=POINTS_SCHEMA)
    stats = retrieval_stats(table)
    log.info("point retrieval: %d objects, %.1f%% with no BG seed outside the box, %.1f%% invalid (no seed set), "
             "%.1f%% with nothing retrieved (MIL only), %.1f FG / %.1f BG points per object",
             stats["objects"], 100 * stats["share_no_box_bg_seed"], 100 * stats["share_invalid"],
             100 * stats["share_no_retrieval"], stats["fg_per_object"], stats["bg_per_object"])
    return table


def retrieval_stats(table: pa.Table) -> dict[str, float]:
    """Shares of objects without seeds / without any retrieved point, and points per object."""
    n = max(1, table.num_rows)
    fg = [len(v) for v in table.column("pseudo_fg").to_pylist()]
    bg = [len(v) for v in table.column("pseudo_bg").to_pylist()]
    extra = [len(v) for v in table.column("seed_bg_extra").to_pylist()]
    no_box_bg = [s - e == 0 for s, e in zip(table.column("num_seed_bg").to_pylist(), extra)]
    return {
        "objects": table.num_rows,
        "share_no_box_bg_seed": sum(no_box_bg) / n,
        "share_invalid": sum(not v for v in table.column("valid").to_pylist()) / n,
        "share_no_retrieval": sum(a + b == 0 for a, b in zip(fg, bg)) / n,
        "fg_per_object": sum(fg) / n,
        "bg_per_object": sum(bg) / n,
    }


def write_points(table: pa.Table, path: Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    return path


def read_points(path: Path) -> pa.Table:
    return pq.read_table(path, schema=POINTS_SCHEMA)


def read_points_rows(path: Path, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of ``points.parquet`` (a shard's), reading only their row groups."""
    return read_rows(path, start, stop).select(POINTS_SCHEMA.names).cast(POINTS_SCHEMA)


def merge_points(shards: list[Path], path: Path) -> Path:
    """Concatenate point shards (in order) into ``points.parquet``, written atomically, one
    shard in memory at a time (row groups of ``ROW_GROUP_ROWS``)."""
    write_table_streaming(iter_shards(shards, POINTS_SCHEMA), Path(path), POINTS_SCHEMA)
    return Path(path)
