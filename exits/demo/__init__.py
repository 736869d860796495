"""Demo data set: photo-textured objects with occluders, built only from scikit-image's
bundled photographs, written as images + COCO instances json (train and val)."""
from exits.demo.dataset import generate_demo_dataset
from exits.eval.separated import count_mask_parts as count_visible_parts

__all__ = ["generate_demo_dataset", "count_visible_parts"]
