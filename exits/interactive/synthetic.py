"""A procedurally generated labelled set for click training (``train_source="synthetic"``).

Interactive segmenters (RITM, InterFormer) are trained on a labelled set unrelated to the
data they later fix. Here that set comes from the demo-data generator
(:func:`exits.demo.generate_demo_dataset`) run with another seed: new scenes of
photo-textured objects, occluders and separated parts, with exact masks. The run's own
images and GT are never read. Objects per image vary (about 2.4 on average), so
``ceil(n / 2) + 8`` images are drawn and the first ``n`` objects kept by the caller.

The set is written once per (variant, seed, images) to ``<cache_dir>/seed<S>_img<N>/``
(``holdout_seed<S>_img<N>/`` for the holdout photographs) and reused.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["synthetic_training_json"]

OBJECTS_PER_IMAGE_LOWER = 2.0


def synthetic_training_json(cache_dir: str | Path, n_objects: int, seed: int, variant: str = "demo"
                            ) -> tuple[Path, Path]:
    """(COCO json path, image folder) of a generated set with at least ~``n_objects`` objects,
    built from the photographs of demo-data ``variant`` ("demo" or "holdout")."""
    from exits.demo import generate_demo_dataset

    n_images = int(math.ceil(n_objects / OBJECTS_PER_IMAGE_LOWER)) + 8
    name = f"seed{int(seed)}_img{n_images}" if variant == "demo" else f"{variant}_seed{int(seed)}_img{n_images}"
    out = Path(cache_dir) / name
    json_path = out / "instances.json"
    if not json_path.is_file():
        summary = generate_demo_dataset(out, n_train=n_images, n_val=0, seed=int(seed), variant=variant)
        json_path = Path(summary["train"]["json"])
    data = json.loads(json_path.read_text(encoding="utf-8"))
    return json_path, out / str(data.get("info", {}).get("image_dir", "images"))
