"""Shared fixtures: tiny hand-made COCO datasets written to tmp folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from exits.data.extreme_points import derive_extreme_points  # noqa: E402


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def mask_forms(root: Path, h: int = 40, w: int = 50) -> tuple[list[float], dict, dict]:
    """A black ``root/a.png`` (h x w) and one 20 x 20 square as a polygon, as the same
    compressed RLE (str counts), and an empty RLE: the segmentation forms dataset readers
    must accept."""
    from PIL import Image

    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "a.png")
    poly = [10.0, 5.0, 30.0, 5.0, 30.0, 25.0, 10.0, 25.0]
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    empty = mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0]
    return poly, {"size": rle["size"], "counts": rle["counts"].decode()}, {"size": [h, w], "counts": empty["counts"].decode()}


def make_coco(root: Path, *, with_points: bool = True, seg_override=None) -> Path:
    """Two 64x48 images, three objects (one split into two parts). Returns the json path."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = 48, 64
    masks = {
        1: (1, disk(h, w, 20, 20, 9)),
        2: (1, ((disk(h, w, 45, 30, 8) | disk(h, w, 45, 12, 6)) & (np.arange(h)[:, None] != 21)).astype(np.uint8)),
        3: (2, disk(h, w, 30, 24, 12)),
    }
    images = []
    for image_id in (1, 2):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(img_dir / f"im{image_id}.png")
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "width": w, "height": h})
    anns = []
    for ann_id, (image_id, m) in masks.items():
        ann = {"id": ann_id, "image_id": image_id, "category_id": 1 + (ann_id % 2), "iscrowd": 0,
               "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle_of(m))],
               "segmentation": rle_of(m) if seg_override is None else seg_override}
        if with_points:
            ann["extreme_points"] = derive_extreme_points(m).astype(int).tolist()
        anns.append(ann)
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    return make_coco(tmp_path)


def pytest_configure(config):
    config.addinivalue_line("markers", "prefect: runs Prefect flows against the session's Prefect test server")


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """ONE Prefect test server (``prefect_test_harness``: temporary SQLite database, local API
    subprocess) for the whole session, started by the first test that needs it; yields its API URL.

    Tests marked ``@pytest.mark.prefect`` get it automatically. Subprocesses a test starts
    reach it through ``PREFECT_API_URL`` (the URL yielded here).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    # Start-up takes ~10 s on 2 cores (database migrations); allow for a loaded CI machine.
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(autouse=True)
def _prefect_for_marked_tests(request):
    if request.node.get_closest_marker("prefect"):
        request.getfixturevalue("prefect_server")
