"""Training-side data: extreme points, validation, crops, the instances table.

Nothing in this package returns a GT mask (see ``records`` for the leak boundary).

Names are imported on first use (PEP 562): ``crops`` loads torch (~7 s on a cold 2-core
machine), which ``exits validate`` and the id/image helpers never need.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CropWindow": "crops", "crop_images": "crops", "crop_window": "crops", "paste_mask": "crops",
    "box_from_extreme_points": "extreme_points", "derive_extreme_points": "extreme_points",
    "load_point_dataset": "reader",
    "ImageRecord": "records", "ObjectRecord": "records", "PointDataset": "records", "Rejection": "records",
    "DatasetError": "validation",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
