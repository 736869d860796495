"""Demo data generator: COCO validity, mask/box/extreme-point consistency, separated share,
determinism, offline sources, and the visible-parts rule."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from exits.data.extreme_points import derive_extreme_points
from exits.demo import count_visible_parts, generate_demo_dataset
from exits.demo import shapes, sources
from exits.demo.dataset import cut_probability

IMAGE_SIZE = (96, 128)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_small")
    summary = generate_demo_dataset(out, n_train=6, n_val=3, seed=0, image_size=IMAGE_SIZE)
    return out, summary


def _load(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "instances.json").read_text()), json.loads((out / "val.json").read_text())


# ---------------------------------------------------------------- files and COCO validity
def test_coco_files_load_and_ids_are_unique_across_splits(small_set):
    out, summary = small_set
    train_coco, val_coco = COCO(str(out / "instances.json")), COCO(str(out / "val.json"))
    assert len(train_coco.getImgIds()) == 6 and len(val_coco.getImgIds()) == 3
    train, val = _load(out)
    image_ids = [im["id"] for im in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(image_ids)) == len(image_ids) == 9
    assert len(set(ann_ids)) == len(ann_ids) > 0
    assert train["categories"] == val["categories"]
    assert [c["name"] for c in train["categories"]] == list(sources.CATEGORY_SOURCES)
    assert {c["id"] for c in train["categories"]} == set(range(1, len(sources.CATEGORY_SOURCES) + 1))
    names = [im["file_name"] for im in train["images"] + val["images"]]
    assert len(set(names)) == 9
    assert all(n.startswith("train_") for n in names[:6]) and all(n.startswith("val_") for n in names[6:])
    for name in names:
        pixels = cv2.imread(str(out / "images" / name))
        assert pixels is not None and pixels.shape == (*IMAGE_SIZE, 3)
    assert summary["train"]["images"] == 6 and summary["val"]["images"] == 3
    assert summary["train"]["objects"] == len(train["annotations"])
    assert summary["val"]["objects"] == len(val["annotations"])


def test_every_mask_decodes_with_matching_area_bbox_and_parts(small_set):
    out, _ = small_set
    for data in _load(out):
        assert data["annotations"], "each split must carry GT masks"
        images = {im["id"]: im for im in data["images"]}
        for ann in data["annotations"]:
            im = images[ann["image_id"]]
            seg = ann["segmentation"]
            assert isinstance(seg, dict) and isinstance(seg["counts"], str)
            mask = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
            assert mask.shape == (im["height"], im["width"])
            assert ann["area"] == int(mask.sum()) > 0
            assert ann["area"] >= 0.01 * im["height"] * im["width"]
            np.testing.assert_array_equal(ann["bbox"], mask_util.toBbox(mask_util.encode(np.asfortranarray(mask))))
            assert ann["iscrowd"] == 0
            assert ann["num_parts"] == count_visible_parts(mask)


def test_extreme_points_lie_on_mask_and_span_the_bbox(small_set):
    out, _ = small_set
    for data in _load(out):
        for ann in data["annotations"]:
            seg = ann["segmentation"]
            mask = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
            points = ann["extreme_points"]
            assert len(points) == 4 and all(isinstance(v, int) for p in points for v in p)
            for x, y in points:
                assert mask[y, x] == 1
            (xt, yt), (xl, yl), (xb, yb), (xr, yr) = points
            bx, by, bw, bh = ann["bbox"]
            assert (xl, yt) == (bx, by)
            assert (xr, yb) == (bx + bw - 1, by + bh - 1)
            np.testing.assert_array_equal(points, derive_extreme_points(mask))


def test_visible_masks_of_one_image_do_not_overlap(small_set):
    out, _ = small_set
    for data in _load(out):
        by_image: dict[int, np.ndarray] = {}
        for ann in data["annotations"]:
            seg = ann["segmentation"]
            mask = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(np.int32)
            by_image[ann["image_id"]] = by_image.get(ann["image_id"], 0) + mask
        assert all(int(total.max()) == 1 for total in by_image.values())


# ---------------------------------------------------------------- separated share
def test_each_split_has_at_least_30_percent_separated_objects(tmp_path):
    summary = generate_demo_dataset(tmp_path, n_train=30, n_val=15, seed=1, image_size=IMAGE_SIZE)
    train, val = _load(tmp_path)
    for split, data in (("train", train), ("val", val)):
        n_sep = sum(count_visible_parts(mask_util.decode(a["segmentation"])) >= 2 for a in data["annotations"])
        assert len(data["annotations"]) >= 25
        assert n_sep / len(data["annotations"]) >= 0.30
        assert summary[split]["separated"] == n_sep
        assert summary[split]["separated_share"] == pytest.approx(n_sep / len(data["annotations"]))


def test_cut_probability_steers_towards_the_target_share():
    assert cut_probability(0, 0) == pytest.approx(0.3)
    assert cut_probability(10, 1) > cut_probability(10, 4) > cut_probability(10, 7)
    assert cut_probability(10, 0) == pytest.approx(0.8)
    assert cut_probability(10, 10) == pytest.approx(0.1)


# ---------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_demo_dataset(a, n_train=3, n_val=2, seed=5, image_size=IMAGE_SIZE)
    generate_demo_dataset(b, n_train=3, n_val=2, seed=5, image_size=IMAGE_SIZE)
    generate_demo_dataset(c, n_train=3, n_val=2, seed=6, image_size=IMAGE_SIZE)
    for name in ("instances.json", "val.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    images_a = sorted(p.name for p in (a / "images").iterdir())
    assert images_a == ["train_000001.jpg", "train_000002.jpg", "train_000003.jpg", "val_000001.jpg", "val_000002.jpg"]
    for name in images_a:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    assert not any(p.name.endswith(".tmp") for p in a.rglob("*"))


def test_progress_bar_and_empty_val_split(tmp_path, capsys):
    summary = generate_demo_dataset(tmp_path, n_train=1, n_val=0, seed=2, image_size=IMAGE_SIZE, progress=True)
    assert "demo data" in capsys.readouterr().err
    val = COCO(str(tmp_path / "val.json"))
    assert val.getImgIds() == []
    assert (summary["val"]["images"], summary["val"]["objects"], summary["val"]["separated"]) == (0, 0, 0)
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, seed=-1)


# ---------------------------------------------------------------- sources and shapes
def test_sources_load_offline_and_roles_are_disjoint(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("demo sources must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    sources.load_source.cache_clear()
    for name in sources.ALL_SOURCES:
        image = sources.load_source(name)
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
        assert max(image.shape[:2]) <= sources.MAX_SOURCE_SIDE and min(image.shape[:2]) >= 64
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.02
    roles = [set(sources.CATEGORY_SOURCES), set(sources.BACKGROUND_SOURCES), set(sources.OCCLUDER_SOURCES)]
    assert sum(len(r) for r in roles) == len(set().union(*roles))
    assert 4 <= len(sources.CATEGORY_SOURCES) <= 6
    assert not sources.is_grey("coffee") and sources.is_grey("brick")


def test_object_shapes_have_the_requested_extent():
    rng = np.random.default_rng(0)
    h, w = 192, 256
    for _ in range(20):
        alpha, family = shapes.random_object_alpha(rng, (h, w), size_range=(0.3, 0.6))
        ys, xs = np.nonzero(alpha >= 0.5)
        assert family in shapes.OBJECT_FAMILIES and ys.size > 0
        assert alpha.min() >= 0.0 and alpha.max() <= 1.0
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert extent <= 0.6 * (h + w) / 2 + 2


# ---------------------------------------------------------------- visible-parts rule
def test_count_visible_parts_rule():
    m = np.zeros((40, 40), dtype=np.uint8)
    assert count_visible_parts(m) == 0
    m[2:12, 2:12] = 1
    assert count_visible_parts(m) == 1
    m[20:30, 20:30] = 1  # second 100-px part
    assert count_visible_parts(m) == 2
    m[12:20, 12:20] = np.eye(8, dtype=np.uint8)  # a diagonal chain joins them under 8-connectivity
    assert count_visible_parts(m) == 1
    # a crumb below 16 px does not count even though it is > 5% of the area
    crumb = np.zeros((40, 40), dtype=np.uint8)
    crumb[0:10, 0:10] = 1
    crumb[30:33, 30:35] = 1  # 15 px
    assert count_visible_parts(crumb) == 1
    assert count_visible_parts(crumb, min_part_pixels=15) == 2
    # a 16-px part is below 5% of a 400-px object
    big = np.zeros((60, 60), dtype=np.uint8)
    big[0:20, 0:20] = 1
    big[40:44, 40:44] = 1
    assert count_visible_parts(big) == 1
    assert count_visible_parts(big, min_part_fraction=0.01) == 2
    assert count_visible_parts(big.astype(bool)) == 1
