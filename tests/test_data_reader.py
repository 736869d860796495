"""Reading, validation errors (one bad fixture each), and the leak boundary."""
import json
from pathlib import Path

import numpy as np
import pytest

from exits.data import DatasetError, load_point_dataset
from tests.conftest import make_coco


def _load(path: Path, **kw):
    return load_point_dataset(path, path.parent / "images", **kw)


def _edit(path: Path, fn) -> Path:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    return path


def test_reads_all_good_records(tiny_coco):
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert not ds.rejections
    obj = ds.objects[0]
    assert obj.extreme_points.shape == (4, 2)
    assert obj.points_source == "annotated"
    x, y, w, h = obj.bbox
    assert (x, y, x + w - 1, y + h - 1) == (11.0, 11.0, 29.0, 29.0)
    assert not hasattr(obj, "segmentation") and not hasattr(obj, "mask")


@pytest.mark.parametrize(
    "edit, reason, ann_id",
    [
        (lambda d: d["annotations"][0].update(extreme_points=[[20, 11], [11, 20], [20, 29], [70, 20]]), "point_outside_image", 1),
        (lambda d: d["annotations"][0].update(extreme_points=[[20, 11], [20, 15], [20, 29], [20, 18]]), "degenerate_box", 1),
        (lambda d: d["annotations"][0].update(extreme_points=[[20, 15], [11, 11], [20, 29], [29, 20]]), "not_extreme", 1),
        (lambda d: d["annotations"][0].update(extreme_points=[[1, 2], [3, 4]]), "bad_extreme_points", 1),
        (lambda d: d["annotations"][1].update(id=1), "duplicate_id", 1),
        (lambda d: d["annotations"][2].update(category_id=99), "unknown_category", 3),
        (lambda d: d["annotations"][2].update(image_id=42), "unknown_image", 3),
        (lambda d: d["annotations"][2].update(iscrowd=1), "crowd", 3),
    ],
)
def test_each_bad_record_is_rejected_with_reason_and_the_rest_kept(tiny_coco, edit, reason, ann_id):
    ds = _load(_edit(tiny_coco, edit))
    bad = [r for r in ds.rejections if r.reason == reason]
    assert bad, ds.rejections
    assert bad[0].ann_id == ann_id
    assert str(tiny_coco) in str(bad[0]) and f"annotation {ann_id}" in str(bad[0])
    kept = {o.ann_id for o in ds.objects}
    assert kept and ann_id not in kept or reason == "duplicate_id"
    assert len(kept) + sum(r.ann_id is not None for r in ds.rejections) == 3


def test_missing_image_rejects_only_its_objects(tiny_coco):
    (tiny_coco.parent / "images" / "im2.png").unlink()
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2]
    reasons = {(r.reason, r.ann_id) for r in ds.rejections}
    assert ("missing_image", 3) in reasons


def test_corrupt_image_and_size_mismatch(tiny_coco):
    (tiny_coco.parent / "images" / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    ds = _load(tiny_coco)
    assert any(r.reason == "corrupt_image" and r.image_id == 2 for r in ds.rejections)
    assert [o.ann_id for o in ds.objects] == [1, 2]

    _edit(tiny_coco, lambda d: d["images"][0].update(width=65))
    (tiny_coco.parent / "images" / "im2.png").unlink()
    with pytest.raises(DatasetError, match="no valid objects"):
        _load(tiny_coco)


def test_empty_dataset_and_unreadable_file(tmp_path):
    p = tmp_path / "empty.json"
    p.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match="empty.json: no valid objects"):
        load_point_dataset(p, tmp_path)
    p.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_point_dataset(p, tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        load_point_dataset(tmp_path / "nope.json", tmp_path)


def test_points_derived_from_masks_when_absent(tmp_path):
    with_pts = _load(make_coco(tmp_path / "a"))
    derived = _load(make_coco(tmp_path / "b", with_points=False))
    assert [o.points_source for o in derived.objects] == ["derived_from_mask"] * 3
    for a, b in zip(with_pts.objects, derived.objects):
        np.testing.assert_array_equal(a.extreme_points, b.extreme_points)
    with pytest.raises(DatasetError):
        _load(tmp_path / "b" / "instances.json", derive_missing_points=False)


def test_no_points_and_no_mask_is_rejected(tmp_path):
    path = make_coco(tmp_path, with_points=False)
    _edit(path, lambda d: d["annotations"][0].pop("segmentation"))
    ds = _load(path)
    assert [(r.reason, r.ann_id) for r in ds.rejections] == [("no_points", 1)]
    assert "neither extreme_points nor a segmentation" in ds.rejections[0].message


def test_leak_boundary_garbage_segmentation_gives_identical_training_inputs(tmp_path):
    """In extreme-point mode the training side never reads segmentations."""
    clean = _load(make_coco(tmp_path / "clean"))
    garbage = _load(make_coco(tmp_path / "garbage", seg_override={"counts": "@@garbage!!", "size": [1, 1]}))
    dropped = _load(_edit(make_coco(tmp_path / "dropped"), lambda d: [a.pop("segmentation") for a in d["annotations"]]))
    for other in (garbage, dropped):
        assert len(other.objects) == len(clean.objects)
        for a, b in zip(clean.objects, other.objects):
            assert (a.ann_id, a.image_id, a.category_id, a.bbox) == (b.ann_id, b.image_id, b.category_id, b.bbox)
            np.testing.assert_array_equal(a.extreme_points, b.extreme_points)


def test_lvis_format_reads_file_names_from_coco_url(tiny_coco):
    def to_lvis(d):
        for img in d["images"]:
            img["coco_url"] = "http://images.example/val2017/" + img.pop("file_name")
        for c in d["categories"]:
            c["frequency"] = "f"
        for a in d["annotations"]:
            a.pop("iscrowd")
    ds = _load(_edit(tiny_coco, to_lvis))
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert ds.images[1].file_name == "im1.png"
