"""``flows.shard_limit``: benchmarks only. Compute a spread-out subset of the shards of point
retrieval (1b) and pseudo labels (1d); every other shard task still runs but writes a
placeholder shard, so the merges, the report and the spot-fix queue see every object.

With ``S`` shards and ``shard_limit = L`` the stride is ``k = ceil(S / L)``: shards
``0, k, 2k, ...`` (at most ``L``) are computed as usual; the others are placeholders:

- points: no retrieved or seed points (``valid = false``): the generator trains those
  objects with the MIL loss alone, as it does for any object where nothing was retrieved;
- pseudo labels: the object's extreme-point box (pixels inclusive, the box baseline) with
  ``score = certainty = point_agreement = 0``, so they sort first in the spot-fix queue.

``bench/bench_scale.py --full`` uses it to push a COCO-sized run through every stage on a
2-core machine; a real run leaves it null (every shard computed).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from exits.config import ExitsConfig
from exits.data.instances_table import read_instances_rows
from exits.run_folder import RunFolder
from exits.stages.shards import shard_ranges, write_shard

__all__ = ["shard_stride", "is_placeholder", "placeholder_points_shard", "placeholder_pseudo_shard"]

log = logging.getLogger(__name__)


def shard_stride(cfg: ExitsConfig, run: RunFolder, stage: str) -> int | None:
    """``ceil(shards / flows.shard_limit)``, or None when every shard is computed."""
    limit = cfg.flows.shard_limit
    shards = len(shard_ranges(run.num_instances(), cfg.flows.shard_size))
    if limit is None or limit >= shards:
        return None
    stride = math.ceil(shards / limit)
    log.warning("%s: flows.shard_limit=%d: computing %d of %d shards (one in %d); the others get placeholders "
                "(benchmarks only, flows/shard_limit.py)", stage, limit, len(range(0, shards, stride)), shards, stride)
    return stride


def is_placeholder(shard: int, stride: int | None) -> bool:
    return stride is not None and shard % stride != 0


def placeholder_points_shard(cfg: ExitsConfig, images: Path, run: RunFolder, start: int, stop: int, out: Path,
                             device: Any, key: str | None = None) -> Path:
    """A ``POINTS_SCHEMA`` shard for rows ``[start, stop)`` with nothing retrieved."""
    from exits.stages.point_retrieval import POINTS_SCHEMA

    ids = read_instances_rows(run.instances, start, stop).column("ann_id")
    k = len(ids)
    empty = pa.array([[]] * k, pa.list_(pa.int32()))
    zeros = pa.array(np.zeros(k, np.int32))
    table = pa.table({"ann_id": ids, "grid": pa.array(np.full(k, cfg.backbone.grid, np.int32)), "seed_fg": empty,
                      "num_seed_bg": zeros, "pseudo_fg": empty, "pseudo_bg": empty, "num_box": zeros,
                      "seed_bg_extra": empty, "valid": pa.array(np.zeros(k, bool))}, schema=POINTS_SCHEMA)
    return write_shard(table, out, key)


def placeholder_pseudo_shard(cfg: ExitsConfig, images: Path, run: RunFolder, start: int, stop: int, out: Path,
                             device: Any, key: str | None = None) -> Path:
    """A ``PSEUDO_SCHEMA`` shard for rows ``[start, stop)``: each object's extreme-point box
    ``[x_left, x_right] x [y_top, y_bottom]`` (inclusive) as its mask, scores 0."""
    import pycocotools.mask as mask_utils

    from exits.stages.pseudo_labels import PSEUDO_SCHEMA

    rows = read_instances_rows(run.instances, start, stop)
    pts = np.asarray(rows.column("extreme_points").to_pylist(), np.float64).reshape(-1, 4, 2).round()
    heights = rows.column("height").to_numpy()
    widths = rows.column("width").to_numpy()
    counts, areas = [], []
    for p, h, w in zip(pts, heights, widths):
        x0, x1, y0, y1 = p[1, 0], p[3, 0], p[0, 1], p[2, 1]
        box = np.array([[x0, y0, x1 - x0 + 1, y1 - y0 + 1]], np.float64)
        rle = mask_utils.frPyObjects(box, int(h), int(w))[0]
        counts.append(rle["counts"].decode("ascii"))
        areas.append(int(mask_utils.area(rle)))
    zeros = np.zeros(rows.num_rows, np.float32)
    cols: dict[str, Any] = {"ann_id": rows.column("ann_id"), "image_id": rows.column("image_id"),
                            "category_id": rows.column("category_id"), "height": rows.column("height"),
                            "width": rows.column("width"), "rle_counts": counts, "area": areas, "score": zeros,
                            "certainty": zeros, "point_agreement": zeros, "num_parts": np.ones(rows.num_rows, np.int32)}
    # the triage signals (and any later optional column): null, "not measured"; the merge keeps score 0
    cols.update({f.name: pa.nulls(rows.num_rows, f.type) for f in PSEUDO_SCHEMA if f.name not in cols})
    return write_shard(pa.table(cols, schema=PSEUDO_SCHEMA), out, key)
