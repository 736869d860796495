"""Training-side data: extreme points, validation, crops, the instances table.

Nothing in this package returns a GT mask (see ``records`` for the leak boundary).
"""
from exits.data.crops import CropWindow, crop_images, crop_window, paste_mask
from exits.data.extreme_points import box_from_extreme_points, derive_extreme_points
from exits.data.reader import load_point_dataset
from exits.data.records import ImageRecord, ObjectRecord, PointDataset, Rejection
from exits.data.validation import DatasetError

__all__ = [
    "CropWindow", "DatasetError", "ImageRecord", "ObjectRecord", "PointDataset", "Rejection",
    "box_from_extreme_points", "crop_images", "crop_window", "derive_extreme_points",
    "load_point_dataset", "paste_mask",
]
