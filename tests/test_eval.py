"""Tests for exits.eval: GT loading, per-object IoU, separated objects, mIoU summaries."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from exits.eval import (
    GtFormatError,
    GtInstance,
    count_mask_parts,
    count_parts_rle,
    format_summary_markdown,
    gt_instances_from_coco,
    instance_ious,
    load_gt_masks,
    load_separated_ids,
    per_object_table,
    read_gt_json,
    category_names_from_coco,
    separated_ann_ids,
    separated_from_parts,
    summarize_miou,
)
from exits.eval.rle import decode_rle, encode_mask


def brute_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def uncompressed_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a (possibly empty) background run."""
    flat = mask.ravel(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


def make_inst(ann_id, mask, category_id=1, image_id=1, area=None, iscrowd=False) -> GtInstance:
    rle = encode_mask(mask)
    return GtInstance(
        ann_id=ann_id,
        image_id=image_id,
        category_id=category_id,
        rle=rle,
        area=float(mask.sum()) if area is None else float(area),
        height=mask.shape[0],
        width=mask.shape[1],
        iscrowd=iscrowd,
    )


# ---------------------------------------------------------------- ground truth


def _coco_json(tmp_path, anns, with_iscrowd=True):
    images = [{"id": 7, "height": 20, "width": 30, "file_name": "a.jpg"}]
    cats = [{"id": 3, "name": "dog"}, {"id": 4, "name": "cat"}]
    full = []
    for a in anns:
        a = {"image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1], **a}
        if with_iscrowd:
            a.setdefault("iscrowd", 0)
        full.append(a)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": full, "categories": cats}))
    return path


def test_polygon_uncompressed_and_compressed_rle_load_to_same_mask(tmp_path):
    poly = [[3.0, 2.0, 20.0, 2.0, 20.0, 12.0, 11.0, 16.0, 3.0, 12.0], [24.0, 3.0, 28.0, 3.0, 28.0, 9.0]]
    # Reference mask from pycocotools' own COCO.annToMask on the polygon.
    ref_path = _coco_json(tmp_path, [{"id": 1, "segmentation": poly, "area": 1.0}])
    ref = COCO(str(ref_path)).annToMask(COCO(str(ref_path)).anns[1]).astype(bool)
    assert ref.sum() > 150  # both polygons rasterised

    compressed = encode_mask(ref)
    anns = [
        {"id": 1, "segmentation": poly, "area": 1.0},
        {"id": 2, "segmentation": {"size": [20, 30], "counts": uncompressed_counts(ref)}, "iscrowd": 1, "area": 1.0},
        {"id": 3, "segmentation": {"size": [20, 30], "counts": compressed["counts"].decode("ascii")}, "area": 1.0},
    ]
    gt = load_gt_masks(_coco_json(tmp_path, anns))
    assert sorted(gt) == [1, 2, 3]
    for inst in gt.values():
        assert isinstance(inst.rle["counts"], bytes)
        assert (inst.height, inst.width) == (20, 30)
        assert inst.image_id == 7 and inst.category_id == 3
        np.testing.assert_array_equal(decode_rle(inst.rle), ref)
    assert gt[2].iscrowd is True and gt[1].iscrowd is False
    assert gt[1].area == 1.0  # the json's area field is kept (what COCOeval buckets by)


def test_lvis_style_json_without_iscrowd_and_area_fallback(tmp_path):
    mask = np.zeros((20, 30), bool)
    mask[4:9, 5:15] = True
    rle = encode_mask(mask)
    path = _coco_json(
        tmp_path, [{"id": 11, "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()}}], with_iscrowd=False
    )
    gt = load_gt_masks(path)
    assert gt[11].iscrowd is False
    assert gt[11].area == 50.0  # no area field: pixel count
    data = read_gt_json(path)
    assert category_names_from_coco(data) == {3: "dog", 4: "cat"}


def test_skips_missing_empty_and_degenerate_segmentations_and_filters_ids(tmp_path):
    good = [[1.0, 1.0, 10.0, 1.0, 10.0, 10.0, 1.0, 10.0]]
    anns = [
        {"id": 1, "segmentation": good},
        {"id": 2},
        {"id": 3, "segmentation": []},
        {"id": 4, "segmentation": [[1.0, 1.0, 5.0, 5.0]]},  # a line: no area (pycocotools would read a box)
        {"id": 5, "segmentation": good},
    ]
    path = _coco_json(tmp_path, anns)
    assert sorted(load_gt_masks(path)) == [1, 5]
    assert sorted(load_gt_masks(path, ann_ids={5, 2, 99})) == [5]


@pytest.mark.parametrize(
    "segmentation, fragment",
    [
        ([[1.0, 1.0, 10.0, 1.0, 10.0]], "odd number"),
        ([[1.0, "a", 10.0, 1.0, 10.0, 10.0]], "non-numeric"),
        ({"size": [20, 30], "counts": [5, 5]}, "sum to 10"),
        ({"size": [10, 30], "counts": "abc"}, "differs from the image size"),
        ({"size": [20, 30], "counts": 5}, "str or bytes"),
        ("polygon", "list of polygons or an RLE"),
    ],
)
def test_malformed_segmentation_error_names_file_and_annotation(tmp_path, segmentation, fragment):
    path = _coco_json(tmp_path, [{"id": 42, "segmentation": segmentation}])
    with pytest.raises(GtFormatError) as info:
        load_gt_masks(path)
    msg = str(info.value)
    assert str(path) in msg and "annotation 42" in msg and fragment in msg


def test_polygon_on_unknown_image_and_duplicate_ids_error():
    data = {"images": [], "annotations": [{"id": 1, "image_id": 9, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}]}
    with pytest.raises(GtFormatError, match="annotation 1 .*height and width"):
        gt_instances_from_coco(data, source="x.json")
    mask = encode_mask(np.ones((4, 4), bool))
    seg = {"size": [4, 4], "counts": mask["counts"].decode()}
    dup = {"annotations": [{"id": 1, "image_id": 9, "category_id": 1, "segmentation": seg}] * 2}
    with pytest.raises(GtFormatError, match="more than once"):
        gt_instances_from_coco(dup, source="x.json")


# ---------------------------------------------------------------- IoU


def test_instance_ious_match_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    pred, gt, masks = {}, {}, {}
    ann_id = 0
    # Two image sizes and more pairs than one pycocotools block, so grouping and the
    # diagonal pick are both exercised.
    for shape in [(17, 23), (9, 40)]:
        for k in range(40):
            ann_id += 1
            density_a, density_b = rng.uniform(0.0, 0.6, size=2)
            a = rng.random(shape) < density_a
            b = rng.random(shape) < density_b
            if k == 0:
                a[:] = False
                b[:] = False  # empty union
            elif k == 1:
                a[:] = False  # empty prediction, non-empty GT
                b[0, 0] = True
            elif k == 2:
                b[:] = False  # empty GT, non-empty prediction
                a[1, 1] = True
            elif k == 3:
                b = a.copy()
            pred[ann_id] = encode_mask(a)
            gt[ann_id] = make_inst(ann_id, b)
            masks[ann_id] = (a, b)
    ious = instance_ious(pred, gt)
    assert sorted(ious) == sorted(gt)
    for i, (a, b) in masks.items():
        assert ious[i] == pytest.approx(brute_iou(a, b), abs=1e-12), i
    assert ious[1] == 1.0 and ious[2] == 0.0 and ious[3] == 0.0 and ious[4] == 1.0


def test_instance_ious_missing_prediction_str_counts_and_size_mismatch():
    a = np.zeros((8, 8), bool)
    a[2:6, 2:6] = True
    b = np.zeros((8, 8), bool)
    b[2:6, 4:8] = True
    rle_a = encode_mask(a)
    pred = {1: {"size": [8, 8], "counts": rle_a["counts"].decode()}, 99: rle_a}
    gt = {1: encode_mask(b), 2: encode_mask(b)}
    ious = instance_ious(pred, gt)
    assert ious == {1: pytest.approx(8 / 24), 2: 0.0}  # 99 has no GT: ignored
    uncompressed = {1: {"size": [8, 8], "counts": uncompressed_counts(a)}}
    assert instance_ious(uncompressed, {1: encode_mask(b)})[1] == pytest.approx(8 / 24)
    with pytest.raises(ValueError, match="annotation 1"):
        instance_ious({1: encode_mask(np.ones((8, 9), bool))}, {1: encode_mask(b)})


# ---------------------------------------------------------------- separated


def _blob(mask, y0, x0, h, w):
    mask[y0 : y0 + h, x0 : x0 + w] = True
    return mask


def test_count_mask_parts_hand_made():
    one = _blob(np.zeros((30, 30), bool), 2, 2, 8, 8)
    assert count_mask_parts(one) == 1
    two = _blob(one.copy(), 15, 15, 6, 6)
    assert count_mask_parts(two) == 2
    speck = _blob(one.copy(), 20, 20, 2, 2)  # 4 px < 16 px floor
    assert count_mask_parts(speck) == 1
    diagonal = np.zeros((30, 30), bool)
    _blob(diagonal, 0, 0, 5, 5)
    _blob(diagonal, 5, 5, 5, 5)  # touches (4, 4) only at a corner
    assert count_mask_parts(diagonal) == 1
    assert count_mask_parts(diagonal, min_part_pixels=1) == 1
    # 4-connected would see 2 parts: check the corner is the only link.
    assert not diagonal[4, 5] and not diagonal[5, 4]
    # Fraction floor: a 20-px part is over 16 px but under 5% of 420 px.
    frac = _blob(np.zeros((40, 40), bool), 0, 0, 20, 20)
    _blob(frac, 30, 30, 4, 5)
    assert count_mask_parts(frac) == 1
    assert count_mask_parts(frac, min_part_fraction=0.04) == 2
    assert count_mask_parts(np.zeros((5, 5), bool)) == 0
    assert count_parts_rle(encode_mask(two)) == 2
    assert count_parts_rle(encode_mask(speck)) == 1
    assert count_parts_rle(encode_mask(np.zeros((5, 5), bool))) == 0


def test_separated_ann_ids_rule():
    one = _blob(np.zeros((30, 30), bool), 2, 2, 8, 8)
    two = _blob(one.copy(), 15, 15, 6, 6)
    speck = _blob(one.copy(), 20, 20, 2, 2)
    three = _blob(two.copy(), 22, 2, 5, 5)
    gt = {
        1: make_inst(1, one),
        2: make_inst(2, two),
        3: make_inst(3, speck),
        4: make_inst(4, three),
        5: make_inst(5, two, iscrowd=True),
    }
    assert separated_ann_ids(gt) == {2, 4}
    assert separated_ann_ids(gt, min_part_pixels=4) == {2, 3, 4}
    # Crowd regions are never separated, even with counted parts handed in.
    assert separated_from_parts({1: 1, 2: 2, 5: 2}, gt) == {2}


def test_load_separated_ids_formats(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("[3, 1, 2]")
    assert load_separated_ids(p) == {1, 2, 3}
    p.write_text(json.dumps({"ann_ids": [5]}))
    assert load_separated_ids(p) == {5}
    p.write_text(json.dumps({"annotation_ids": [6, 7], "note": "x"}))
    assert load_separated_ids(p) == {6, 7}
    t = tmp_path / "ids.txt"
    t.write_text("10\n\n  11  \n# comment\n12 # trailing\n")
    assert load_separated_ids(t) == {10, 11, 12}


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('[1, "2"]', "entry 1"),
        ("[1, true]", "entry 1"),
        ('{"ids": [1]}', "none of the keys"),
        ('{"ann_ids": 3}', "JSON list"),
        ("[1, 2", "not valid JSON"),
        ("1\n2\nx3\n", "line 3"),
        ("1\n2.5\n", "line 2"),
    ],
)
def test_load_separated_ids_bad_files(tmp_path, content, fragment):
    p = tmp_path / "bad.txt"
    p.write_text(content)
    with pytest.raises(ValueError) as info:
        load_separated_ids(p)
    assert str(p) in str(info.value) and fragment in str(info.value)


def test_load_separated_ids_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_separated_ids(tmp_path / "nope.txt")


# ---------------------------------------------------------------- mIoU summary


def _summary_fixture():
    m = np.zeros((4, 4), bool)
    m[0, 0] = True  # masks are irrelevant to the summary; areas are given
    gt = {
        1: make_inst(1, m, category_id=1, area=100.0),  # small
        2: make_inst(2, m, category_id=1, area=2000.0),  # medium
        3: make_inst(3, m, category_id=1, area=50000.0),  # large
        4: make_inst(4, m, category_id=2, area=1024.0),  # medium (32² is not small)
        5: make_inst(5, m, category_id=2, area=9216.0),  # large (96² is not medium)
        6: make_inst(6, m, category_id=2, area=10.0, iscrowd=True),
    }
    ious = {1: 0.2, 2: 0.6, 3: 0.9, 4: 0.5, 5: 0.7, 6: 0.1}
    separated = {2, 3, 5, 77}  # 77 is not evaluated: ignored
    return ious, gt, separated


def test_summarize_miou_matches_hand_computation():
    ious, gt, separated = _summary_fixture()
    s = summarize_miou(ious, gt, separated, {1: "person"})
    json.dumps(s)  # plain JSON-able
    assert s["iou_unit"] == "fraction"
    assert s["crowd_excluded"] == 1
    assert s["all"] == {"count": 5, "miou": pytest.approx((0.2 + 0.6 + 0.9 + 0.5 + 0.7) / 5)}
    assert s["separated"] == {"count": 3, "miou": pytest.approx((0.6 + 0.9 + 0.7) / 3)}
    assert s["non_separated"] == {"count": 2, "miou": pytest.approx((0.2 + 0.5) / 2)}
    small, medium, large = (s["per_size"][b] for b in ("small", "medium", "large"))
    assert small == {"count": 1, "miou": pytest.approx(0.2), "separated_count": 0, "separated_miou": None}
    assert medium["count"] == 2 and medium["miou"] == pytest.approx(0.55)
    assert medium["separated_count"] == 1 and medium["separated_miou"] == pytest.approx(0.6)
    assert large["count"] == 2 and large["miou"] == pytest.approx(0.8)
    assert large["separated_count"] == 2 and large["separated_miou"] == pytest.approx(0.8)
    c1, c2 = s["per_category"]
    assert c1["category_id"] == 1 and c1["name"] == "person"
    assert c1["count"] == 3 and c1["miou"] == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert c1["separated_count"] == 2 and c1["separated_miou"] == pytest.approx(0.75)
    assert c2["name"] == "2" and c2["count"] == 2 and c2["miou"] == pytest.approx(0.6)
    assert c2["separated_count"] == 1 and c2["separated_miou"] == pytest.approx(0.7)

    with_crowd = summarize_miou(ious, gt, separated, include_crowd=True)
    assert with_crowd["all"]["count"] == 6 and with_crowd["crowd_excluded"] == 0
    assert with_crowd["per_size"]["small"]["miou"] == pytest.approx(0.15)


def test_summarize_miou_empty_and_unknown_ids():
    ious, gt, _ = _summary_fixture()
    s = summarize_miou({}, gt, set())
    assert s["all"] == {"count": 0, "miou": None} and s["per_category"] == []
    with pytest.raises(KeyError, match="no GT instance"):
        summarize_miou({123: 0.5}, gt, set())


def test_per_object_table_and_markdown():
    two = _blob(_blob(np.zeros((30, 30), bool), 2, 2, 8, 8), 15, 15, 6, 6)
    one = _blob(np.zeros((30, 30), bool), 2, 2, 8, 8)
    gt = {10: make_inst(10, two, category_id=5, image_id=3), 11: make_inst(11, one, category_id=5, image_id=3)}
    ious = {11: 0.25, 10: 0.75}
    rows = per_object_table(ious, gt, {10})
    assert [r["ann_id"] for r in rows] == [10, 11]
    assert rows[0] == {
        "ann_id": 10, "image_id": 3, "category_id": 5, "area": 100.0, "size": "small",
        "iscrowd": False, "parts": 2, "separated": True, "iou": 0.75,
    }
    assert rows[1]["parts"] == 1 and rows[1]["separated"] is False
    assert per_object_table(ious, gt, set(), parts={10: 7, 11: 1})[0]["parts"] == 7

    md = format_summary_markdown(summarize_miou(ious, gt, {10}, {5: "a|b"}))
    assert "| All | 2 | 50.0 |" in md
    assert "| Separated | 1 | 75.0 |" in md
    assert "| Non-separated | 1 | 25.0 |" in md
    assert "| Large | 0 | – |" in md
    assert "| a\\|b | 2 | 50.0 | 1 | 75.0 |" in md
    ious2, gt2, sep2 = _summary_fixture()
    md2 = format_summary_markdown(summarize_miou(ious2, gt2, sep2), max_categories=1)
    assert "1 more categories" in md2 and "1 crowd regions not evaluated" in md2


def test_part_count_agrees_with_scipy_labelling():
    """The OpenCV labelling must agree with a plain scipy 8-connected reference."""
    from scipy import ndimage

    def reference(mask, floor, frac):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        return int(np.count_nonzero(sizes >= max(floor, frac * mask.sum()))) if mask.any() else 0

    rng = np.random.default_rng(3)
    for _ in range(30):
        mask = rng.random((40, 50)) < rng.uniform(0.02, 0.4)
        mask = np.logical_and(mask, rng.random((40, 50)) < 0.9)
        for floor, frac in [(16, 0.05), (1, 0.0), (4, 0.2)]:
            assert count_mask_parts(mask, floor, frac) == reference(mask, floor, frac)

# ---------------------------------------------------------------- streaming forms (the report's)


def test_summarize_miou_columns_equals_summarize_miou_exactly():
    """The column form (the streaming report's) gives the same dict, float for float: every
    mean adds the same IoUs in the same order (by ann id), crowd left out, NaN area large."""
    from exits.eval import summarize_miou_columns

    rng = np.random.default_rng(11)
    n = 5000
    ids = np.sort(rng.choice(10**7, n, replace=False))
    m = np.zeros((4, 4), bool)
    m[0, 0] = True
    area = rng.choice([10.0, 1023.9, 1024.0, 5000.0, 9215.5, 9216.0, 1e6, float("nan")], n)
    cat = rng.integers(1, 40, n)
    crowd = rng.random(n) < 0.05
    iou = rng.random(n)
    iou[::97] = 0.0
    sep = rng.random(n) < 0.3
    gt = {int(i): make_inst(int(i), m, category_id=int(c), area=float(a), iscrowd=bool(k))
          for i, c, a, k in zip(ids, cat, area, crowd)}
    ious = {int(i): float(v) for i, v in zip(ids, iou)}
    separated = {int(i) for i in ids[sep]}
    names = {c: f"cat{c}" for c in range(1, 30)}  # some ids without a name
    for include_crowd in (False, True):
        want = summarize_miou(ious, gt, separated, names, include_crowd=include_crowd)
        got = summarize_miou_columns(iou, crowd, sep, area, cat, names, include_crowd=include_crowd)
        assert json.dumps(got) == json.dumps(want)


def test_streamed_gt_masks_equal_the_loaded_json_whatever_the_key_order(tmp_path):
    """load_gt_masks streams the json (GtJsonStream); annotations before images (read twice),
    categories last, gzip: the same instances as gt_instances_from_coco of the loaded dict,
    the same errors for a repeated id and for a file that is not an instances json."""
    import gzip

    from exits.eval import GtJsonStream

    poly = [[2.0, 2.0, 20.0, 2.5, 20.0, 18.0, 3.0, 17.0]]
    rle = encode_mask(np.pad(np.ones((5, 6), bool), ((3, 22), (4, 20))))
    rle = {"size": rle["size"], "counts": rle["counts"].decode()}
    anns = [{"id": 3, "image_id": 1, "category_id": 1, "segmentation": poly, "area": 12.5},
            {"id": 1, "image_id": 2, "category_id": 2, "segmentation": rle, "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": []}]
    images = [{"id": 1, "height": 30, "width": 30}, {"id": 2, "height": 30, "width": 30}]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    data = {"images": images, "categories": cats, "annotations": anns}
    want = gt_instances_from_coco(data, source="x")
    for name, text in (("plain.json", json.dumps(data)),
                       ("late.json", json.dumps({"annotations": anns, "info": {}, "images": images, "categories": cats}))):
        path = tmp_path / name
        path.write_text(text)
        assert load_gt_masks(path) == want
        gz = tmp_path / (name + ".gz")
        gz.write_bytes(gzip.compress(text.encode()))
        assert load_gt_masks(gz, ann_ids={1, 99}) == {1: want[1]}
        stream = GtJsonStream(path)
        assert [a["id"] for a in stream.annotations()] == [3, 1, 2]
        assert stream.category_names == {1: "a", 2: "b"} and stream.sizes == {1: (30, 30), 2: (30, 30)}
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(dict(data, annotations=anns + [dict(anns[0])])))
    with pytest.raises(GtFormatError, match="annotation id 3 appears more than once"):
        load_gt_masks(dup)
    for bad in ("[1, 2]", '{"images": []}', '{"annotations": 5}'):
        path = tmp_path / "bad.json"
        path.write_text(bad)
        with pytest.raises(GtFormatError, match="expected a COCO/LVIS json object with an 'annotations' list"):
            load_gt_masks(path)
    (tmp_path / "broken.json").write_text('{"images": [], "annotations": [{"id": 1,')
    with pytest.raises(GtFormatError, match="broken.json: not valid JSON"):
        load_gt_masks(tmp_path / "broken.json")
