"""Property: whatever is done to ONE record of a valid instances json (or to the file as a
whole), ``load_point_dataset`` either returns, with every untouched annotation among the
objects with its original points and every annotation either kept or rejected under a named
reason, or raises one-line ``DatasetError`` (file-level damage only); never another
exception (project issue 27)."""
from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from exits.data import DatasetError, load_point_dataset
from exits.data.extreme_points import derive_extreme_points
from exits.data.ids import as_int_id
from exits.data.validation import REJECTION_REASONS
from tests.conftest import disk, rle_of

SIZES = {1: (48, 64), 2: (40, 56), 3: (60, 80)}  # image id -> (h, w)
DEEP = "__DEEP_PLACEHOLDER__"
HUGE_DEPTH = 200_000


def _base(root: Path) -> dict:
    """3 images, 3 categories (one name not ASCII), 8 annotations: 6 with extreme_points,
    2 whose points are derived from their mask (an RLE and a polygon)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(7)
    images = []
    for image_id, (h, w) in SIZES.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "images" / f"im{image_id}.png")
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "width": w, "height": h})
    anns = []
    specs = [(1, 1, 20, 20, 9), (2, 1, 45, 25, 8), (3, 2, 20, 20, 10), (4, 2, 40, 22, 9), (5, 3, 30, 30, 12),
             (6, 3, 60, 30, 10), (7, 1, 30, 15, 6), (8, 3, 15, 45, 8)]
    for ann_id, image_id, cx, cy, r in specs:
        h, w = SIZES[image_id]
        m = disk(h, w, cx, cy, r)
        ann = {"id": ann_id, "image_id": image_id, "category_id": 1 + ann_id % 3, "iscrowd": 0,
               "area": int(m.sum()), "bbox": [cx - r, cy - r, 2 * r, 2 * r], "segmentation": rle_of(m)}
        if ann_id == 8:  # a polygon (a diamond) instead of an RLE
            ann["segmentation"] = [[cx, cy - r, cx - r, cy, cx, cy + r, cx + r, cy]]
        if ann_id not in (7, 8):
            ann["extreme_points"] = derive_extreme_points(m).astype(int).tolist()
        anns.append(ann)
    categories = [{"id": 1, "name": "one", "supercategory": "x"}, {"id": 2, "name": "caf\u00e9"},
                  {"id": 3, "name": "three"}]
    return {"info": {"description": "property test"}, "images": images, "annotations": anns,
            "categories": categories}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader_properties")
    data = _base(root)
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    ds = load_point_dataset(path, root / "images")
    assert not ds.rejections and len(ds.objects) == len(data["annotations"])
    points = {o.ann_id: o.extreme_points.tolist() for o in ds.objects}
    return root, data, points


# --------------------------------------------------------------------- mutations

_NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=10),
    st.sampled_from([0, -1, 5.0, 1.5, 2.0, 1e308, -1e308, 2 ** 31, 2 ** 63, 2 ** 63 - 1, 2 ** 70, -(2 ** 64),
                     float("nan"), float("inf"), float("-inf"), 1e-300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2 ** 80), max_value=2 ** 80),
)
_STRINGS = st.one_of(st.sampled_from(["1", "2", "abc", "5.0", "", "NaN", "-1", "im1.png", "../im1.png", "/etc/passwd",
                                      "im\u00e9.png", "\x00"]), st.text(max_size=6))
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, _STRINGS)
_VALUES = st.recursive(_SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=4), kids, max_size=3)),
                       max_leaves=10)
_KEYS = {
    "annotations": ["id", "image_id", "category_id", "extreme_points", "segmentation", "iscrowd", "area", "bbox",
                    "other"],
    "images": ["id", "width", "height", "file_name", "coco_url"],
    "categories": ["id", "name", "supercategory", "frequency"],
}
_LISTS = st.sampled_from(["annotations", "annotations", "annotations", "images", "categories"])
# values aimed at each kind of field (mixed with arbitrary json values)
_ID_VALUES = st.sampled_from(["1", "2", "3", "abc", True, False, 1.5, 2.5, 1.0, 2.0, 3.0, 99, 0, -1, 2 ** 63,
                              2 ** 70, -(2 ** 64), None, float("nan"), 1e300, [1], {"id": 1}])
_FIELD_VALUES = {
    "id": _ID_VALUES, "image_id": _ID_VALUES, "category_id": _ID_VALUES,
    "width": st.sampled_from([64.0, 56.0, 80.0, 64.5, 256.9, 0, -64, True, "64", 2 ** 40, None, float("nan"), 1]),
    "height": st.sampled_from([48.0, 40.0, 60.0, 48.5, 0, -48, False, "48", 2 ** 40, None, float("inf"), 1]),
    "file_name": st.sampled_from(["", "im1.png", "im2.png", "../im1.png", "/etc/hostname", "nope.png", 5, None,
                                  ["im1.png"], "images/../im3.png", "im\x00.png"]),
    "iscrowd": st.sampled_from([0, 1, True, False, None, "0", 0.5, [], 2]),
    "extreme_points": st.one_of(
        st.lists(st.lists(_NUMBERS, min_size=2, max_size=2), min_size=4, max_size=4),
        st.lists(_NUMBERS, min_size=8, max_size=8),
        st.sampled_from([[], [[1, 2]] * 3, [[20, 11], [11, 20], [20, 29], [29, "20"]], "1 2 3 4", {"top": [1, 2]}])),
    "segmentation": st.one_of(
        st.sampled_from([[], None, {}, {"size": [48, 64], "counts": "garbage"}, {"size": [48, 64], "counts": [0, 10]},
                         {"size": [48, 64], "counts": [3072]}, {"size": [64, 48], "counts": [1000, 50, 2022]},
                         [[1, 2, 3]], [["a", "b", "c", "d", "e", "f"]], {"counts": "abc"}]),
        st.lists(st.lists(_NUMBERS, min_size=6, max_size=8), min_size=1, max_size=2)),
}


@st.composite
def record_mutation(draw):
    which = draw(_LISTS)
    index = draw(st.integers(0, {"annotations": 7, "images": 2, "categories": 2}[which]))
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "replace", "deep", "point"]))
    key = draw(st.sampled_from(_KEYS[which]))
    if kind == "point":
        if which != "annotations" or index in (6, 7):
            kind = "set"
        else:
            return ("point", which, index, draw(st.integers(0, 3)), draw(st.integers(0, 1)),
                    draw(st.one_of(_NUMBERS, _SCALARS)))
    if kind == "set":
        aimed = _FIELD_VALUES.get(key)
        value = draw(st.one_of(aimed, aimed, _VALUES) if aimed is not None else _VALUES)
        return ("set", which, index, key, value)
    if kind == "delete":
        return ("delete", which, index, key)
    if kind == "replace":
        return ("replace", which, index, draw(_VALUES))
    return ("deep", which, index, key, draw(st.sampled_from([1, 3, 40, HUGE_DEPTH])))


file_mutation = st.one_of(
    st.tuples(st.just("encoding"), st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be",
                                                     "utf-32", "utf-32-be", "latin-1", "gzip", "gzip-utf-16"])),
    st.tuples(st.just("truncate"), st.floats(min_value=0.0, max_value=0.999)),
)


def _apply(data: dict, mutation) -> tuple[bytes, bool]:
    """The mutated file's bytes, and whether a DatasetError is an acceptable answer."""
    kind = mutation[0]
    if kind in ("encoding", "truncate"):
        text = json.dumps(data, ensure_ascii=False)
        if kind == "truncate":
            raw = text.encode()
            return raw[: int(len(raw) * mutation[1])], True
        enc = mutation[1]
        if enc.startswith("gzip"):
            return gzip.compress(text.encode("utf-16" if enc == "gzip-utf-16" else "utf-8")), False
        return text.encode(enc), enc == "latin-1"  # the non-ASCII category name is not UTF-8 in Latin-1
    which, index = mutation[1], mutation[2]
    records = data[which]
    fatal = False
    if kind == "set":
        records[index][mutation[3]] = mutation[4]
    elif kind == "delete":
        records[index].pop(mutation[3], None)
    elif kind == "replace":
        records[index] = mutation[3]
    elif kind == "deep":
        records[index][mutation[3]] = DEEP
        fatal = mutation[4] >= 500
    elif kind == "point":
        records[index]["extreme_points"][mutation[3]][mutation[4]] = mutation[5]
    text = json.dumps(data)
    if kind == "deep":
        depth = mutation[4]
        text = text.replace(json.dumps(DEEP), "[" * depth + "0" + "]" * depth, 1)
    return text.encode(), fatal


def _affected(base: dict, data: dict, mutation) -> set[int]:
    """Base annotation ids whose outcome the mutation may change: the mutated annotation,
    those on a mutated image / of a mutated category, and those whose id (or image's or
    category's id) the mutation made ambiguous."""
    if mutation[0] in ("encoding", "truncate"):
        return set()
    which, index = mutation[1], mutation[2]
    affected: set[int] = set()

    def dup_ids(records) -> set[int]:
        ids = [as_int_id(r.get("id")) for r in records if isinstance(r, dict)]
        return {i for i in ids if i is not None and ids.count(i) > 1}

    base_anns = base["annotations"]
    if which == "annotations":
        affected.add(base_anns[index]["id"])
        affected |= dup_ids(data["annotations"])
    elif which == "images":
        ids = {base["images"][index]["id"]} | dup_ids(data["images"])
        affected |= {a["id"] for a in base_anns if a["image_id"] in ids}
    else:
        ids = {base["categories"][index]["id"]} | dup_ids(data["categories"])
        affected |= {a["id"] for a in base_anns if a["category_id"] in ids}
    return affected


def _check(base, mutation) -> None:
    root, base_data, base_points = base
    data = copy.deepcopy(base_data)
    raw, may_fail = _apply(data, mutation)
    path = root / "mutated.json"
    path.write_bytes(raw)
    try:
        ds = load_point_dataset(path, root / "images")
    except DatasetError as exc:
        assert may_fail, f"{mutation!r:.300} -> {exc}"
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    n = len(data["annotations"])
    assert ds.n_annotations == n
    assert len(ds.objects) + sum(r.kind == "annotation" for r in ds.rejections) == n, ds.rejections
    assert all(r.reason in REJECTION_REASONS for r in ds.rejections), ds.rejections
    assert all("\n" not in str(r) for r in ds.rejections)
    # rejections.json readers take ann_id None + image_id set as "this image was rejected"
    assert all(r.kind == "image" for r in ds.rejections if r.ann_id is None and r.image_id is not None)
    for o in ds.objects:
        assert all(type(v) is int for v in (o.ann_id, o.image_id, o.category_id)), o
        assert o.image_id in ds.images and o.category_id in ds.categories
    assert len({o.ann_id for o in ds.objects}) == len(ds.objects)
    kept = {o.ann_id: o.extreme_points.tolist() for o in ds.objects}
    affected = _affected(base_data, data, mutation)
    for ann_id, pts in base_points.items():
        if ann_id not in affected:
            assert kept.get(ann_id) == pts, (mutation, ann_id, ds.rejections)
    # the leak boundary: an annotation with extreme_points never depends on its mask
    if mutation[0] in ("set", "delete", "deep") and mutation[1] == "annotations" \
            and mutation[3] in ("segmentation", "area", "bbox", "other") and mutation[2] < 6 and not may_fail:
        ann_id = base_data["annotations"][mutation[2]]["id"]
        assert kept.get(ann_id) == base_points[ann_id]
    # nothing appears that was not in the file
    new_ids = {as_int_id(a.get("id")) for a in data["annotations"] if isinstance(a, dict)}
    assert set(kept) <= new_ids


_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(mutation=record_mutation())
def test_one_mutated_record_is_rejected_or_accepted_and_the_rest_survive(base, mutation):
    _check(base, mutation)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(mutation=file_mutation)
def test_file_level_damage_is_read_or_one_dataset_error(base, mutation):
    _check(base, mutation)


@pytest.mark.parametrize("mutation", [
    ("set", "annotations", 0, "id", "2"),            # the string twin of another object's id
    ("set", "annotations", 0, "id", 2),              # a real duplicate: both rejected
    ("set", "images", 0, "id", 2.0),                 # an image id colliding as a float
    ("set", "categories", 1, "id", True),
    ("deep", "annotations", 3, "extreme_points", HUGE_DEPTH),
    ("deep", "annotations", 6, "segmentation", 40),
    ("set", "annotations", 7, "segmentation", {"size": [60, 80], "counts": "\x00garbage"}),
    ("set", "annotations", 6, "segmentation", [[float("nan")] * 8]),
    ("point", "annotations", 2, 1, 0, 10 ** 30),
    ("set", "images", 2, "file_name", "../instances.json"),
    ("encoding", "utf-32"),
    ("encoding", "latin-1"),
    ("truncate", 0.5),
])
def test_chosen_mutations(base, mutation):
    _check(base, mutation)
