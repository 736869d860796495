"""Bad input to the annotation reader (project issue 27): every bad record is rejected with a
named reason, every unusable file ends in one DatasetError line naming the file; never a
traceback, never silently wrong output."""
from __future__ import annotations

import codecs
import errno
import gzip
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exits.data import DatasetError, load_point_dataset
from exits.data.validation import REJECTION_REASONS, ValidationSummary
from exits.eval.ground_truth import GtFormatError, read_gt_json
from exits.io.json_stream import JsonFileError, open_json_text
from tests.conftest import make_coco


def _load(path: Path, **kw):
    return load_point_dataset(path, path.parent / "images", **kw)


def _data(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _edit(path: Path, fn) -> Path:
    data = _data(path)
    fn(data)
    return _write(path, data)


def _reasons(ds) -> list[tuple[str, str, int | None, int | None]]:
    return [(r.kind, r.reason, r.ann_id, r.image_id) for r in ds.rejections]


def _points(ds) -> dict[int, list]:
    return {o.ann_id: o.extreme_points.tolist() for o in ds.objects}


def _one_line_error(exc_info, path: Path) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------- ids


def test_string_id_one_does_not_collide_with_int_one(tiny_coco, caplog):
    """The scenario of issue 27: int ids plus one "1". Before, "1" and 1 were counted apart
    as ids, then both became object 1: two objects with id 1 (a mask lands on the other)."""
    data = _data(tiny_coco)
    original = _points(_load(tiny_coco))
    clone = dict(data["annotations"][2], id="1")  # image 2, another object's points
    data["annotations"].append(clone)
    _write(tiny_coco, data)
    with caplog.at_level(logging.INFO, logger="exits.data.reader"):
        ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert _points(ds) == original  # object 1 untouched, nothing of the "1" record in it
    assert [type(o.ann_id) for o in ds.objects] == [int, int, int]
    # the record is named exactly: its raw id (rejections.json keeps "1" apart from 1) and position
    assert _reasons(ds) == [("annotation", "bad_id", "1", 2)]
    rej = ds.rejections[0]
    assert rej.index == 3 and "'1'" in rej.message and "string" in rej.message and not rej.has_int_ann_id
    assert f"{tiny_coco} annotations[3] (id '1') (image 2): [bad_id]" in str(rej)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "bad_id" in r.getMessage()]
    assert warned and "annotations[3]" in warned[0].getMessage()
    summary = ValidationSummary.of(4, 3, ds.rejections)
    assert summary.rejected_by_reason == {"bad_id": 1}
    assert ds.n_annotations == 4


@pytest.mark.parametrize("bad", ["1", "abc", True, False, 1.5, 2 ** 70, -(2 ** 64), float("nan"), [1], {"id": 1}])
def test_annotation_id_not_an_integer_is_bad_id(tiny_coco, bad):
    data = _data(tiny_coco)
    data["annotations"].append(dict(data["annotations"][1], id=bad))
    _write(tiny_coco, data)
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    listed = bad if not isinstance(bad, (list, dict)) and bad == bad else None  # lists / NaN: not listable
    assert [(r.reason, r.index, r.ann_id, r.image_id) for r in ds.rejections] == [
        ("bad_id", 3, listed, 1 if listed is not None else None)]
    assert type(ds.rejections[0].ann_id) is type(listed)  # True stays True, never 1


def test_float_id_without_fraction_is_the_integer(tiny_coco):
    _edit(tiny_coco, lambda d: d["annotations"][2].update(id=5.0, image_id=2.0, category_id=2.0))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 5]
    obj = ds.objects[2]
    assert (type(obj.ann_id), type(obj.image_id), type(obj.category_id)) == (int, int, int)
    assert (obj.image_id, obj.category_id) == (2, 2)
    assert not ds.rejections


@pytest.mark.parametrize("key", ["image_id", "category_id"])
@pytest.mark.parametrize("bad", ["2", True, 2.5, 2 ** 70])
def test_annotation_references_that_are_not_integers_are_bad_id(tiny_coco, key, bad):
    _edit(tiny_coco, lambda d: d["annotations"][2].update({key: bad}))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2]
    assert [(r.reason, r.ann_id, r.image_id) for r in ds.rejections] == [("bad_id", 3, None)]
    assert key in ds.rejections[0].message


@pytest.mark.parametrize("key", ["image_id", "category_id"])
def test_annotation_without_a_reference_is_bad_annotation(tiny_coco, key):
    _edit(tiny_coco, lambda d: d["annotations"][2].pop(key))
    ds = _load(tiny_coco)
    assert [(r.reason, r.ann_id) for r in ds.rejections] == [("bad_annotation", 3)]
    assert key in ds.rejections[0].message


def test_annotation_without_id_does_not_reject_its_image(tiny_coco):
    """rejections.json readers take ann_id None + image_id set as 'the image was rejected'."""
    _edit(tiny_coco, lambda d: d["annotations"][0].pop("id"))
    ds = _load(tiny_coco)
    assert _reasons(ds) == [("annotation", "bad_annotation", None, None)]
    assert "image 1" in ds.rejections[0].message


def test_string_image_id_does_not_replace_the_int_image(tiny_coco):
    data = _data(tiny_coco)
    data["images"].append(dict(data["images"][0], id="1", width=640, height=480))
    _write(tiny_coco, data)
    ds = _load(tiny_coco)
    assert (ds.images[1].width, ds.images[1].height) == (64, 48)
    assert list(ds.images) == [1, 2]
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert _reasons(ds) == [("image", "bad_id", None, None)]
    assert ds.rejections[0].index == 2 and str(ds.rejections[0]).startswith(f"{tiny_coco} images[2]: [bad_id]")


def test_image_with_bad_id_leaves_its_annotations_unknown(tiny_coco):
    _edit(tiny_coco, lambda d: d["images"][1].update(id=2.5))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2]
    assert _reasons(ds) == [("image", "bad_id", None, None), ("annotation", "unknown_image", 3, 2)]


# ------------------------------------------------------------------------ categories


def test_category_id_abc_is_bad_id_not_a_crash(tiny_coco):
    _edit(tiny_coco, lambda d: d["categories"].append({"id": "abc", "name": "x"}))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert [(r.kind, r.reason, r.index) for r in ds.rejections] == [("category", "bad_id", 2)]
    assert "'abc'" in ds.rejections[0].message


@pytest.mark.parametrize("bad", [{"name": "noid"}, "cat", 7, None])
def test_malformed_category_is_rejected_not_a_crash(tiny_coco, bad):
    _edit(tiny_coco, lambda d: d["categories"].append(bad))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert [(r.kind, r.reason, r.index) for r in ds.rejections] == [("category", "bad_category_record", 2)]
    assert set(ds.categories) == {1, 2}


def test_category_with_a_bad_id_rejects_its_annotations_only_by_their_own_reference(tiny_coco):
    _edit(tiny_coco, lambda d: d["categories"][1].update(id="2"))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [2]  # anns 1 and 3 are category 2
    assert [(r.kind, r.reason, r.ann_id) for r in ds.rejections] == [
        ("category", "bad_id", None), ("annotation", "unknown_category", 1), ("annotation", "unknown_category", 3)]


def test_duplicate_category_ids_are_rejected_and_so_are_their_annotations(tiny_coco):
    _edit(tiny_coco, lambda d: d["categories"].append({"id": 2, "name": "deux"}))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [2]
    assert set(ds.categories) == {1}
    assert [(r.kind, r.reason, r.category_id, r.ann_id) for r in ds.rejections] == [
        ("category", "duplicate_id", 2, None), ("category", "duplicate_id", 2, None),
        ("annotation", "unknown_category", None, 1), ("annotation", "unknown_category", None, 3)]
    assert str(ds.rejections[0]).startswith(f"{tiny_coco} category 2: [duplicate_id]")
    assert "more than once" in ds.rejections[2].message


def test_category_name_must_be_a_string(tiny_coco):
    _edit(tiny_coco, lambda d: d["categories"][0].update(name=["one"]))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 3]
    assert [(r.kind, r.reason, r.category_id, r.ann_id) for r in ds.rejections] == [
        ("category", "bad_category_record", 1, None), ("annotation", "unknown_category", None, 2)]


# ---------------------------------------------------------------------- image records


@pytest.mark.parametrize("key", ["width", "height"])
@pytest.mark.parametrize("bad", [256.9, 64.5, True, "64", -64, 0, None, [64], 2 ** 40, float("inf")])
def test_image_size_must_be_a_positive_integer(tiny_coco, key, bad):
    _edit(tiny_coco, lambda d: d["images"][1].update({key: bad}))
    ds = _load(tiny_coco, check_images=False)
    assert [o.ann_id for o in ds.objects] == [1, 2]
    assert _reasons(ds) == [("image", "bad_image_record", None, 2), ("annotation", "unknown_image", 3, 2)]
    assert key in ds.rejections[0].message and "positive integer" in ds.rejections[0].message


def test_image_size_missing_is_bad_image_record(tiny_coco):
    _edit(tiny_coco, lambda d: d["images"][1].pop("height"))
    ds = _load(tiny_coco)
    assert _reasons(ds)[0] == ("image", "bad_image_record", None, 2)


def test_image_size_float_without_fraction_is_accepted(tiny_coco):
    _edit(tiny_coco, lambda d: d["images"][1].update(width=64.0, height=48.0))
    ds = _load(tiny_coco)
    assert (ds.images[2].width, ds.images[2].height) == (64, 48)
    assert type(ds.images[2].width) is int
    assert not ds.rejections


@pytest.mark.parametrize("bad", ["", 5, None, ["im2.png"], "im\x002.png"])
def test_file_name_must_be_a_non_empty_string(tiny_coco, bad):
    _edit(tiny_coco, lambda d: d["images"][1].update(file_name=bad))
    ds = _load(tiny_coco)
    assert _reasons(ds) == [("image", "bad_image_record", None, 2), ("annotation", "unknown_image", 3, 2)]
    assert "file_name" in ds.rejections[0].message


@pytest.mark.parametrize("check_images", [True, False])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_file_name_outside_the_image_folder(tiny_coco, how, check_images):
    images = tiny_coco.parent / "images"
    outside = tiny_coco.parent / "secret.png"
    (images / "im2.png").rename(outside)
    if how == "dotdot":
        name = "../secret.png"
    elif how == "absolute":
        name = str(outside)
    else:
        (images / "link.png").symlink_to(outside)
        name = "link.png"
    _edit(tiny_coco, lambda d: d["images"][1].update(file_name=name))
    ds = _load(tiny_coco, check_images=check_images)
    assert [o.ann_id for o in ds.objects] == [1, 2]
    assert _reasons(ds) == [("image", "outside_image_dir", None, 2), ("annotation", "outside_image_dir", 3, 2)]
    assert repr(name) in ds.rejections[0].message


def test_file_names_in_sub_folders_are_fine(tiny_coco):
    images = tiny_coco.parent / "images"
    (images / "sub" / "deeper").mkdir(parents=True)
    (images / "im2.png").rename(images / "sub" / "deeper" / "im2.png")
    (images / "sub" / "link.png").symlink_to(images / "im1.png")  # a link within the folder
    _edit(tiny_coco, lambda d: (d["images"][1].update(file_name="sub/deeper/../deeper/im2.png"),
                                d["images"][0].update(file_name="sub/link.png")))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3] and not ds.rejections


# ---------------------------------------------------------------------- image files


def _as_jpeg(tiny_coco: Path, truncate: bool) -> Path:
    images = tiny_coco.parent / "images"
    arr = np.asarray(Image.open(images / "im2.png").convert("RGB"))
    Image.fromarray(arr).save(images / "im2.jpg", quality=90)
    if truncate:
        raw = (images / "im2.jpg").read_bytes()
        (images / "im2.jpg").write_bytes(raw[: len(raw) // 2])
    return _edit(tiny_coco, lambda d: d["images"][1].update(file_name="im2.jpg"))


def test_truncated_jpeg_is_corrupt_image(tiny_coco):
    ds = _load(_as_jpeg(tiny_coco, truncate=False))
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    ds = _load(_as_jpeg(tiny_coco, truncate=True))
    assert [o.ann_id for o in ds.objects] == [1, 2]
    assert _reasons(ds) == [("image", "corrupt_image", None, 2), ("annotation", "corrupt_image", 3, 2)]
    assert "im2.jpg" in ds.rejections[0].message and "truncated" in ds.rejections[0].message


def test_truncated_image_is_not_opened_when_check_images_is_off(tiny_coco):
    ds = _load(_as_jpeg(tiny_coco, truncate=True), check_images=False)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]


def test_sixteen_bit_grey_png_is_accepted(tiny_coco):
    images = tiny_coco.parent / "images"
    grey = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(grey).save(images / "im2.png")
    assert Image.open(images / "im2.png").mode.startswith("I")
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3] and not ds.rejections


def test_float_image_is_unsupported(tiny_coco):
    images = tiny_coco.parent / "images"
    Image.fromarray(np.zeros((48, 64), np.float32)).save(images / "im2.tif")
    _edit(tiny_coco, lambda d: d["images"][1].update(file_name="im2.tif"))
    ds = _load(tiny_coco)
    assert _reasons(ds) == [("image", "unsupported_image", None, 2), ("annotation", "unsupported_image", 3, 2)]
    assert "mode F" in ds.rejections[0].message


def test_image_checks_run_in_threads_and_report_in_image_order(tmp_path, monkeypatch):
    """Decoding every image costs more than verify: a thread pool does it; the rejections
    still come out in the order of the images list, whatever order the threads finish in."""
    import threading
    import time

    import exits.data.validation as validation

    path = make_coco(tmp_path)
    data = _data(path)
    for i in range(3, 11):  # images 3..10 without objects, every even one corrupt
        data["images"].append(dict(data["images"][0], id=i, file_name=f"im{i}.png"))
        target = tmp_path / "images" / f"im{i}.png"
        target.write_bytes((tmp_path / "images" / "im1.png").read_bytes()[: 100 if i % 2 == 0 else None])
    _write(path, data)
    threads: set[str] = set()
    real = validation.decode_check

    def slow_decode(p):
        threads.add(threading.current_thread().name)
        n = int(Path(p).stem[2:])
        time.sleep(0.02 * (11 - n))  # early images finish last
        return real(p)

    monkeypatch.setattr(validation, "decode_check", slow_decode)
    monkeypatch.setattr(validation, "image_check_workers", lambda: 4)
    ds = _load(path)
    assert [(r.reason, r.image_id) for r in ds.rejections] == [("corrupt_image", i) for i in (4, 6, 8, 10)]
    assert len(threads) > 1 and threading.current_thread().name not in threads


def test_image_size_mismatch_still_reported(tiny_coco):
    _edit(tiny_coco, lambda d: d["images"][1].update(width=65))
    ds = _load(tiny_coco)
    assert _reasons(ds)[0] == ("image", "image_size_mismatch", None, 2)
    assert "64x48" in ds.rejections[0].message and "65x48" in ds.rejections[0].message


# ------------------------------------------------------------------------ annotations


def test_annotation_that_is_a_string_is_rejected(tiny_coco):
    _edit(tiny_coco, lambda d: d["annotations"].insert(1, "not an annotation"))
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert [(r.kind, r.reason, r.index, r.ann_id, r.image_id) for r in ds.rejections] == [
        ("annotation", "bad_annotation", 1, None, None)]


@pytest.mark.parametrize("bad", [
    [["20", 11], [11, 20], [20, 29], [29, 20]],   # a string for a number
    [[True, 11], [11, 20], [20, 29], [29, 20]],   # a bool for a number
    [[[[20]], 11], [11, 20], [20, 29], [29, 20]],  # nesting
    "20 11 11 20 20 29 29 20",
    {"top": [20, 11]},
    [[10 ** 400, 11], [11, 20], [20, 29], [29, 20]],  # does not fit a float
    [[float("nan"), 11], [11, 20], [20, 29], [29, 20]],
])
def test_malformed_extreme_points_are_bad_extreme_points(tiny_coco, bad):
    data = _data(tiny_coco)
    data["annotations"][0]["extreme_points"] = bad
    _write(tiny_coco, data)
    ds = _load(tiny_coco)
    assert [o.ann_id for o in ds.objects] == [2, 3]
    assert [(r.reason, r.ann_id) for r in ds.rejections] == [("bad_extreme_points", 1)]


def test_flat_extreme_points_still_accepted(tiny_coco):
    data = _data(tiny_coco)
    pts = data["annotations"][0]["extreme_points"]
    data["annotations"][0]["extreme_points"] = [v for p in pts for v in p]
    ds = _load(_write(tiny_coco, data))
    assert _points(ds)[1] == pts and not ds.rejections


@pytest.mark.parametrize("value, kept", [(0, True), (False, True), (None, True), (1, False), ("0", None), ([], None)])
def test_iscrowd_values(tiny_coco, value, kept):
    _edit(tiny_coco, lambda d: d["annotations"][2].update(iscrowd=value))
    ds = _load(tiny_coco)
    if kept:
        assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    else:
        reason = "crowd" if kept is False else "bad_annotation"
        assert [(r.reason, r.ann_id) for r in ds.rejections] == [(reason, 3)]


def test_rle_of_another_size_than_its_image_gives_no_points(tmp_path):
    path = make_coco(tmp_path, with_points=False)
    data = _data(path)
    rle = data["annotations"][2]["segmentation"]
    data["annotations"][2]["segmentation"] = {"size": [rle["size"][1], rle["size"][0]], "counts": rle["counts"]}
    ds = _load(_write(path, data))
    assert [(r.reason, r.ann_id) for r in ds.rejections] == [("no_points", 3)]
    assert "size" in ds.rejections[0].message


@pytest.mark.parametrize("segmentation, fragment", [
    ([[1e308, 1, 2, 3, 4, 5]], "far outside"),  # crashed the process in pycocotools (segfault)
    ([[3e9, 1, 2, 3, 4, 5]], "far outside"),    # exhausted memory in pycocotools
    ([[float("nan")] * 6], "non-finite"),
    ([[1, 2, 3]], "pairs"),
    ([["1", "2", "3", "4", "5", "6"]], "pairs"),
    ({"size": [48, 64], "counts": [1.5, 3070.5]}, "integers"),  # pycocotools decoded 3140 of 3072 pixels
    ({"size": [48, 64], "counts": [-5, 3077]}, "integers"),
    ({"size": [48, 64], "counts": [100, 20]}, "add up"),
    ({"size": [48, 64], "counts": 17}, "neither"),
])
def test_malformed_segmentations_give_no_points_not_a_crash(tmp_path, segmentation, fragment):
    path = make_coco(tmp_path, with_points=False)
    _edit(path, lambda d: d["annotations"][0].update(segmentation=segmentation))
    ds = _load(path)
    assert [o.ann_id for o in ds.objects] == [2, 3]
    assert [(r.reason, r.ann_id) for r in ds.rejections] == [("no_points", 1)]
    assert fragment in ds.rejections[0].message


def test_rejection_stays_backward_compatible():
    """rejections.json is ``asdict`` of each Rejection; its readers (stage 1d's
    rejected_image_ids) take ann_id None + image_id set as a rejected image."""
    from dataclasses import asdict

    from exits.data import Rejection

    old = Rejection("f.json", "missing_image", "gone", image_id=3)  # as older code built them
    assert old.kind == "image" and str(old) == "f.json (image 3): [missing_image] gone"
    assert Rejection("f.json", "crowd", "c", ann_id=4, image_id=3).kind == "annotation"
    keys = set(asdict(old))
    assert {"file", "reason", "message", "ann_id", "image_id"} <= keys
    assert keys - {"file", "reason", "message", "ann_id", "image_id"} == {"category_id", "record", "index"}


def test_only_image_records_look_like_rejected_images(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"] += [dict(data["annotations"][0], id="9"), "x", {"image_id": 1, "category_id": 1}]
    data["images"][1]["width"] = 1.5
    data["categories"].append({"id": 1, "name": "again"})
    ds = _load(_write(tiny_coco, data))
    looks_like_image = [r for r in ds.rejections if r.ann_id is None and r.image_id is not None]
    assert [(r.kind, r.image_id) for r in looks_like_image] == [("image", 2)]


def test_every_reason_used_is_documented(tiny_coco):
    assert {"bad_id", "duplicate_id", "bad_image_record", "bad_category_record", "outside_image_dir",
            "corrupt_image", "unsupported_image", "bad_annotation"} <= set(REJECTION_REASONS)


# ------------------------------------------------------------------ the file itself


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def test_deeply_nested_annotation_is_one_dataset_error(tiny_coco):
    text = tiny_coco.read_text().replace('"iscrowd": 0', f'"iscrowd": {_deep(200_000)}', 1)
    tiny_coco.write_text(text)
    with pytest.raises(DatasetError) as info:
        _load(tiny_coco)
    msg = _one_line_error(info, tiny_coco)
    assert "nested too deeply" in msg and "at character" in msg


def test_number_with_too_many_digits_is_one_dataset_error(tiny_coco):
    tiny_coco.write_text(tiny_coco.read_text().replace('"iscrowd": 0', '"iscrowd": ' + "9" * 5000, 1))
    with pytest.raises(DatasetError) as info:
        _load(tiny_coco)
    assert "digits" in _one_line_error(info, tiny_coco)


def _latin1(tiny_coco: Path) -> int:
    data = _data(tiny_coco)
    data["categories"][0]["name"] = "caf\u00e9"
    text = json.dumps(data, ensure_ascii=False)
    raw = text.encode("latin-1")
    tiny_coco.write_bytes(raw)
    return raw.index(b"\xe9")


def test_latin1_file_says_not_utf8_where_and_how_to_convert(tiny_coco):
    offset = _latin1(tiny_coco)
    with pytest.raises(DatasetError) as info:
        _load(tiny_coco)
    msg = _one_line_error(info, tiny_coco)
    assert "not UTF-8" in msg and f"byte offset {offset}" in msg and "0xe9" in msg and "iconv" in msg


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_utf8_bom_and_utf16_utf32_files_are_read(tiny_coco, encoding):
    expected = _points(_load(tiny_coco))
    data = _data(tiny_coco)
    data["categories"][0]["name"] = "caf\u00e9 \U0001f600"
    tiny_coco.write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))
    ds = _load(tiny_coco)
    assert _points(ds) == expected
    assert ds.categories[1].name == "caf\u00e9 \U0001f600"


@pytest.mark.parametrize("name", ["instances.json", "instances.json.gz"])
def test_gzip_file_is_read_transparently(tiny_coco, name):
    expected = _points(_load(tiny_coco))
    text = tiny_coco.read_text()
    target = tiny_coco.parent / name
    target.write_bytes(gzip.compress(text.encode()))
    assert _points(_load(target)) == expected
    # gzip of a UTF-16 file: the encoding is detected after decompressing
    target.write_bytes(gzip.compress(text.encode("utf-16")))
    assert _points(_load(target)) == expected


def test_truncated_gzip_is_one_dataset_error(tiny_coco):
    raw = gzip.compress(tiny_coco.read_bytes())
    tiny_coco.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError) as info:
        _load(tiny_coco)
    assert "gzip" in _one_line_error(info, tiny_coco)


@pytest.mark.parametrize("magic, what", [(b"PK\x03\x04", "zip"), (b"BZh9", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                                         (b"\x28\xb5\x2f\xfd", "zstd")])
def test_other_archives_say_what_they_are(tiny_coco, magic, what):
    tiny_coco.write_bytes(magic + b"\x00" * 40)
    with pytest.raises(DatasetError) as info:
        _load(tiny_coco)
    assert what in _one_line_error(info, tiny_coco)


def test_directory_is_one_dataset_error(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_point_dataset(tmp_path, tmp_path)
    assert "is a directory" in _one_line_error(info, tmp_path)


def test_permission_denied_is_one_dataset_error(tiny_coco, monkeypatch):
    import builtins

    import exits.io.json_stream as js

    real_open = builtins.open

    def denied(file, *a, **k):
        if Path(file) == tiny_coco:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(js, "open", denied, raising=False)
    with pytest.raises(DatasetError) as info:
        _load(tiny_coco)
    msg = _one_line_error(info, tiny_coco)
    assert "Permission denied" in msg and "EACCES" in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found"):
        load_point_dataset(tmp_path / "nope.json", tmp_path)
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        load_point_dataset(tmp_path / "empty.json", tmp_path)
    assert "empty" in _one_line_error(info, tmp_path / "empty.json")


@pytest.mark.parametrize("text", ['{"images": [], "categories": [], "annotations": [1, 2', "[]", "{}",
                                  '{"images": 5, "categories": [], "annotations": []}',
                                  '{"images": [], "categories": [], "annotations": {}}'])
def test_broken_files_are_one_dataset_error(tmp_path, text):
    p = tmp_path / "broken.json"
    p.write_text(text)
    with pytest.raises(DatasetError) as info:
        load_point_dataset(p, tmp_path)
    _one_line_error(info, p)


def test_non_object_records_in_head_lists_do_not_crash_format_detection(tiny_coco):
    data = _data(tiny_coco)
    data["images"].insert(0, 17)
    data["categories"].insert(0, "x")
    ds = _load(_write(tiny_coco, data))
    assert [o.ann_id for o in ds.objects] == [1, 2, 3]
    assert [(r.kind, r.reason) for r in ds.rejections] == [("image", "bad_image_record"),
                                                           ("category", "bad_category_record")]


# ---------------------------------------------------- the same opening for --gt files


def test_open_json_text_is_shared_by_the_gt_reader(tiny_coco):
    data = _data(tiny_coco)
    tiny_coco.write_bytes(gzip.compress(json.dumps(data).encode("utf-16")))
    with open_json_text(tiny_coco) as fh:
        assert json.load(fh) == data
    assert read_gt_json(tiny_coco) == data
    tiny_coco.write_bytes(codecs.BOM_UTF8 + json.dumps(data).encode())
    assert read_gt_json(tiny_coco) == data


def test_gt_reader_errors_are_one_line(tiny_coco, tmp_path):
    _latin1(tiny_coco)
    with pytest.raises(GtFormatError) as info:
        read_gt_json(tiny_coco)
    assert "not UTF-8" in _one_line_error(info, tiny_coco)
    with pytest.raises(GtFormatError) as info:
        read_gt_json(tmp_path)
    assert "is a directory" in _one_line_error(info, tmp_path)
    tiny_coco.write_text('{"annotations": [' + _deep(100_000) + "]}")
    with pytest.raises(GtFormatError) as info:
        read_gt_json(tiny_coco)
    assert "nested too deeply" in _one_line_error(info, tiny_coco)


def test_json_file_error_is_a_value_error(tmp_path):
    with pytest.raises(JsonFileError):
        open_json_text(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_json_text(tmp_path / "nope.json")


def test_gt_side_uses_the_same_id_rule_and_refuses_far_out_polygons():
    """The report's GT reader: "1" / True are not image ids, a category without an integer id
    names nothing, and a polygon far outside its image is an error (pycocotools would crash
    the process at 1e308 or exhaust memory at 4e8) instead of being rasterised."""
    from exits.eval.ground_truth import GtFormatError, category_names_from_coco, gt_instances_from_coco
    from exits.eval.rle import segmentation_to_rle

    square = [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]]
    ann = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square}
    ok = gt_instances_from_coco({"images": [{"id": 1.0, "height": 10, "width": 10}], "annotations": [ann]})
    assert ok[1].area == 36.0 and (ok[1].height, ok[1].width) == (10, 10)
    for bad_id in ("1", True, 1.5):
        with pytest.raises(GtFormatError, match="integer id"):
            gt_instances_from_coco({"images": [{"id": bad_id, "height": 10, "width": 10}], "annotations": [ann]})
    names = category_names_from_coco({"categories": [{"id": 3, "name": "a"}, {"name": "no id"}, {"id": "abc"}, "x"]})
    assert names == {3: "a"}
    for far in (1e308, 4e8, -1e6):
        with pytest.raises(ValueError, match="far outside"):
            segmentation_to_rle([[0.0, 0.0, far, 0.0, far, 5.0]], 10, 10)


def test_readme_lists_every_rejection_reason():
    from pathlib import Path

    from exits.data.validation import REJECTION_REASONS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Validation**"):readme.index("**GT masks never reach training.**")]
    assert [r for r in REJECTION_REASONS if f"| `{r}` |" not in section] == []
