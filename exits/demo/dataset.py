"""Write the demo data set: images plus COCO instances json for a train and a val split.

Layout of ``out_dir``::

    images/train_000001.jpg ... images/val_000001.jpg   (one folder for both splits)
    instances.json    COCO instances, train split
    val.json          COCO instances, held-out val split

``file_name`` in the json is relative to ``out_dir/images``. Image ids and annotation ids
are unique across both files. Each annotation carries the visible ground-truth mask as
compressed RLE, its area and box, ``extreme_points`` derived from that mask (ExtremeNet
order top, left, bottom, right; [x, y] ints) and ``num_parts`` (visible parts under the
separated rule of ``exits.eval.separated``).

Every image has its own generator seeded with (seed, split, index), so a data set is
byte-identical for a seed. The only link between images of a split is the probability of
cutting objects on purpose, steered towards TARGET_SEPARATED_SHARE (see cut_probability).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_util
from tqdm import tqdm

from exits import __version__
from exits.data.extreme_points import derive_extreme_points
from exits.eval.separated import DEFAULT_MIN_PART_FRACTION, DEFAULT_MIN_PART_PIXELS
from exits.eval.separated import count_mask_parts as count_visible_parts
from exits.demo.scene import DEFAULT_P_CUT, render_scene
from exits.demo.sources import DEMO_SOURCES, SourceSet, source_set
from exits.io import write_bytes, write_json

SPLITS: tuple[tuple[str, int, str], ...] = (("train", 0, "instances.json"), ("val", 1, "val.json"))
IMAGE_DIR = "images"
JPEG_QUALITY = 92
TARGET_SEPARATED_SHARE = 0.4


def cut_probability(n_objects: int, n_separated: int, target: float = TARGET_SEPARATED_SHARE) -> float:
    """Probability of cutting an object on purpose in the next image of a split.

    A proportional controller on the split's running separated share:
    p = clip(p0 + 2 (target - n_separated / n_objects), 0.1, 0.8), p0 = DEFAULT_P_CUT.
    p0 alone gives about 40% separated objects on average, but a 30-image split scatters
    by about +-6 points; steering keeps every split near the target, so the ">= 30%
    separated" promise holds for small splits too. Everything else in an image comes from
    the image's own seed; the split's history moves only this probability.
    """
    if n_objects == 0:
        return DEFAULT_P_CUT
    return float(np.clip(DEFAULT_P_CUT + 2.0 * (target - n_separated / n_objects), 0.1, 0.8))


def demo_categories(sources: SourceSet = DEMO_SOURCES) -> list[dict[str, Any]]:
    """COCO categories: one per texture photograph, ids 1..K in the variant's category order."""
    return [{"id": i + 1, "name": name, "supercategory": "skimage_photo"} for i, name in enumerate(sources.categories)]


def annotation_from_mask(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """COCO annotation of a visible mask: RLE, area, bbox, extreme points, part count.

    Args:
        mask: (H, W) bool, non-empty.
    """
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_util.area(rle))
    if area == 0:
        raise ValueError(f"annotation {ann_id}: empty mask")
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    extreme = derive_extreme_points(mask).astype(np.int64)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": area,
        "bbox": bbox,
        "iscrowd": 0,
        "extreme_points": [[int(x), int(y)] for x, y in extreme],
        "num_parts": count_visible_parts(mask),
    }


def encode_jpeg(image_rgb: np.ndarray) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 RGB image."""
    ok, buffer = cv2.imencode(".jpg", np.ascontiguousarray(image_rgb[..., ::-1]),
                              [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buffer.tobytes()


def generate_demo_dataset(
    out_dir: str | Path,
    n_train: int = 100,
    n_val: int = 30,
    seed: int = 0,
    image_size: tuple[int, int] = (192, 256),
    progress: bool = False,
    variant: str = "demo",
) -> dict[str, Any]:
    """Generate the demo data set into ``out_dir`` (see module docstring for the layout).

    Args:
        out_dir: output folder (created).
        n_train, n_val: images per split.
        seed: non-negative integer; the same seed gives byte-identical files.
        image_size: (H, W) of every image.
        progress: show a tqdm progress bar.
        variant: "demo" (the default photographs) or "holdout" (other photographs in every
            role, for judging a method on data it was not tuned on; see
            ``exits.demo.sources.HOLDOUT_SOURCES``).
    Returns:
        Summary: {"out_dir", "categories": [names], "train": {...}, "val": {...}} with, per
        split, "images", "objects", "separated" (objects with >= 2 visible parts),
        "separated_share" and "json" (the file written).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n_train < 0 or n_val < 0:
        raise ValueError("n_train and n_val must be >= 0")
    height, width = (int(v) for v in image_size)
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    sources = source_set(variant)
    categories = demo_categories(sources)
    summary: dict[str, Any] = {"out_dir": str(out), "categories": [c["name"] for c in categories]}

    image_id, ann_id = 1, 1
    counts = {"train": n_train, "val": n_val}
    with tqdm(total=n_train + n_val, disable=not progress, desc="demo data", unit="img") as bar:
        for split, split_code, json_name in SPLITS:
            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            n_separated = 0
            for index in range(1, counts[split] + 1):
                rng = np.random.default_rng([seed, split_code, index])
                p_cut = cut_probability(len(annotations), n_separated)
                image, objects = render_scene(rng, (height, width), p_cut=p_cut, sources=sources)
                file_name = f"{split}_{index:06d}.jpg"
                write_bytes(out / IMAGE_DIR / file_name, encode_jpeg(image))
                images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
                for obj in objects:
                    annotations.append(annotation_from_mask(obj.mask, ann_id, image_id, obj.category + 1))
                    n_separated += int(annotations[-1]["num_parts"] >= 2)
                    ann_id += 1
                image_id += 1
                bar.update(1)
            info = {
                "description": "exits demo data: photo-textured objects with occluders, "
                               "built from images bundled in scikit-image",
                "version": __version__,
                "split": split,
                "seed": seed,
                "variant": variant,
                "image_dir": IMAGE_DIR,
                "category_sources": list(sources.categories),
                "background_sources": list(sources.backgrounds),
                "occluder_sources": list(sources.occluders),
                "separated_rule": {"min_part_pixels": DEFAULT_MIN_PART_PIXELS, "min_part_fraction": DEFAULT_MIN_PART_FRACTION},
            }
            write_json(out / json_name, {"info": info, "licenses": [], "images": images,
                                         "annotations": annotations, "categories": categories})
            summary[split] = {
                "images": len(images),
                "objects": len(annotations),
                "separated": n_separated,
                "separated_share": n_separated / len(annotations) if annotations else 0.0,
                "json": str(out / json_name),
            }
    return summary
