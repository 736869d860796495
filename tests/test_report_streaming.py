"""The streaming report (GT json streamed, pseudo masks read in row groups, metrics.parquet
written incrementally, summary from its columns) equals the in-memory reference
(:func:`exits.report.build.build_report_in_memory`, the report as it was before streaming)
on demo runs: every number of summary.json (byte for byte), every row of metrics.parquet,
report.md, report.html, the figures and the gallery PNGs.

Scenarios: the demo run as the pipeline reports it; an official-style separated id list; an
awkward GT file (gzip, keys out of order: annotations before images and categories,
annotations shuffled, polygons and RLEs mixed, a crowd region, an object without a mask,
objects without ``area``, a category without a name, a GT object nobody predicted) with NaN
scores, tiny pseudo row groups and tiny stream batches, a points.parquet and every object in
the gallery; the json fallback (pseudo_labels.json newer than the Parquet file). Plus the same
errors for a duplicated GT id, no GT mask at all and a size mismatch, and the streaming parts
counter against the decode-and-label one on random masks.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from exits.stages import pseudo_label_files
from exits.stages.pseudo_labels import encode_rle, write_pseudo_labels

from tests.test_report import perturb as _perturb, prepared_demo_run

SCENARIOS = ("demo", "separated_ids", "awkward_gt", "json_fallback")


def _polygons(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[float(v) + 0.25 for v in c.reshape(-1)] for c in contours if len(c) >= 3]


def _points_table(ann_ids: list[int], seed: int = 0) -> pa.Table:
    from exits.stages.point_retrieval import POINTS_SCHEMA

    rng = np.random.default_rng(seed)
    k = len(ann_ids)

    def lists(count: int) -> pa.Array:
        lengths = rng.integers(0, count + 1, k)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 64, offsets[-1]).astype(np.int32)))

    return pa.table({"ann_id": pa.array(ann_ids, pa.int64()), "grid": pa.array(np.full(k, 8, np.int32)),
                     "seed_fg": lists(4), "num_seed_bg": pa.array(rng.integers(0, 6, k).astype(np.int32)),
                     "pseudo_fg": lists(5), "pseudo_bg": lists(3), "num_box": pa.array(rng.integers(1, 40, k).astype(np.int32)),
                     "seed_bg_extra": lists(2), "valid": pa.array(rng.random(k) > 0.2)}, schema=POINTS_SCHEMA)


def build_scenario(root: Path, name: str) -> dict:
    """A run folder under ``root`` for scenario ``name``; returns the write_report kwargs."""
    assert name in SCENARIOS
    data, ann_json, work = prepared_demo_run(root, n_train=16, seed=3)
    coco = json.loads(ann_json.read_text())
    rng = np.random.default_rng(7)
    rows, scores = [], {}
    for k, ann in enumerate(coco["annotations"]):
        gt = mask_utils.decode(ann["segmentation"]).astype(bool)
        pred = _perturb(gt, ann["id"])
        if k == 2:
            pred[:] = False  # an empty pseudo mask
        score = float(rng.uniform(0.2, 1.0))
        if name == "awkward_gt" and k % 5 == 1:
            score = float("nan")
        rows.append({"ann_id": ann["id"], "rle": encode_rle(pred), "area": int(pred.sum())})
        scores[ann["id"]] = {"score": score, "certainty": score, "agreement": score}
    saved = pseudo_label_files.ROW_GROUP_ROWS
    pseudo_label_files.ROW_GROUP_ROWS = 4  # several row groups in pseudo_labels.parquet
    try:
        write_pseudo_labels(ann_json, rows, scores, work)
    finally:
        pseudo_label_files.ROW_GROUP_ROWS = saved
    kwargs: dict = {"workdir": work, "publish": False}
    if name == "separated_ids":
        ids = [a["id"] for a in coco["annotations"]][1::3]
        (root / "separated.txt").write_text("# official list\n" + "\n".join(str(i) for i in ids + [10**9]) + "\n")
        kwargs["separated_ids"] = root / "separated.txt"
        kwargs["n_worst"] = 5
    elif name == "json_fallback":
        later = os.stat(work / "pseudo_labels.parquet").st_mtime_ns + 10**9
        os.utime(work / "pseudo_labels.json", ns=(later, later))
    elif name == "awkward_gt":
        from exits.stages.point_retrieval import write_points

        anns = coco["annotations"]
        write_points(_points_table([a["id"] for a in anns]), work / "points.parquet")
        out = []
        for k, ann in enumerate(anns):
            ann = dict(ann)
            mask = mask_utils.decode(ann["segmentation"])
            if k % 3 == 0:
                polys = _polygons(mask)
                if polys:
                    ann["segmentation"] = polys
            if k == 4:
                ann["iscrowd"] = 1
            if k == 5:
                ann["segmentation"] = []  # no GT mask: counted as without_gt_mask
            if k % 4 == 3:
                ann.pop("area", None)
            out.append(ann)
        extra = dict(anns[0], id=max(a["id"] for a in anns) + 100)  # in the GT only: not evaluated
        out.append(extra)
        order = rng.permutation(len(out))
        out = [out[i] for i in order]
        cats = [c for c in coco["categories"] if c["id"] != anns[0]["category_id"]]  # shown by its id
        text = json.dumps({"annotations": out, "categories": cats, "info": {"x": 1}, "images": coco["images"]})
        gt = root / "gt_awkward.json.gz"
        gt.write_bytes(gzip.compress(text.encode()))
        kwargs["gt"] = gt
        kwargs["n_worst"] = len(out) + 3  # every scored object in the gallery
    return kwargs


def report_outputs(work: Path) -> dict[str, bytes]:
    """Every file of WORKDIR/report/ by relative path (metrics.parquet as its rows)."""
    out = {}
    base = work / "report"
    for path in sorted(base.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(base))] = path.read_bytes()
    return out


def assert_tables_equal(got: pa.Table, want: pa.Table) -> None:
    assert got.schema == want.schema
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        a, b = got[name].to_pylist(), want[name].to_pylist()
        if pa.types.is_floating(want.schema.field(name).type):
            np.testing.assert_array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), err_msg=name)
            assert [x is None for x in a] == [x is None for x in b], name
        else:
            assert a == b, name


def assert_same_report(work: Path, reference: dict[str, bytes]) -> None:
    got = report_outputs(work)
    assert sorted(got) == sorted(reference)
    for name, data in reference.items():
        if name == "metrics.parquet":
            assert_tables_equal(pq.read_table(work / "report" / name), pq.read_table(pa.BufferReader(data)))
        else:
            assert got[name] == data, name


@pytest.mark.parametrize("name", SCENARIOS)
def test_streaming_report_equals_in_memory_reference(name, tmp_path, monkeypatch):
    from exits.report import build as build_mod
    from exits.report import streaming

    kwargs = build_scenario(tmp_path, name)
    work = kwargs["workdir"]
    want_summary = build_mod.build_report_in_memory(**kwargs)
    reference = report_outputs(work)
    shutil.rmtree(work / "report")
    if name == "awkward_gt":
        monkeypatch.setattr(streaming, "BATCH_OBJECTS", 5)  # many batches, each across row groups
    got_summary = build_mod.build_report(**kwargs)
    assert json.dumps(got_summary) == json.dumps(want_summary)
    assert_same_report(work, reference)
    if name == "awkward_gt":
        s = got_summary
        assert s["objects"]["without_gt_mask"] == 1 and s["objects"]["crowd"] == 1
        assert s["retrieval"]["objects"] > 0
        assert any(c["name"] == str(c["category_id"]) for c in s["per_category"])


def test_streaming_report_over_a_stale_report_folder_replaces_it(tmp_path):
    """A second report over the same folder (e.g. after fixes) gives the same files, and the
    temporary files of the streaming pass are gone."""
    from exits.report.build import build_report

    kwargs = build_scenario(tmp_path, "demo")
    build_report(**kwargs)
    first = report_outputs(kwargs["workdir"])
    build_report(**kwargs)
    assert report_outputs(kwargs["workdir"]) == first
    assert not [p for p in kwargs["workdir"].rglob("*") if p.name.startswith(".") and p.is_file()]


def _gt_variant(tmp_path: Path, edit) -> tuple[dict, Path]:
    kwargs = build_scenario(tmp_path, "demo")
    coco = json.loads((tmp_path / "data" / "instances.json").read_text())
    edit(coco)
    gt = tmp_path / "gt_edit.json"
    gt.write_text(json.dumps(coco))
    return kwargs, gt


@pytest.mark.parametrize("fault", ["duplicate_id", "no_gt_mask", "size_mismatch"])
def test_streaming_report_raises_what_the_reference_raises(fault, tmp_path):
    from exits.report.build import build_report, build_report_in_memory

    def edit(coco: dict) -> None:
        anns = coco["annotations"]
        if fault == "duplicate_id":
            anns.insert(3, dict(anns[1]))
        elif fault == "no_gt_mask":
            for a in anns:
                a["segmentation"] = []
        else:
            h, w = anns[2]["segmentation"]["size"]
            anns[2]["segmentation"] = mask_utils.encode(np.asfortranarray(np.ones((h + 1, w), np.uint8)))
            anns[2]["segmentation"]["counts"] = anns[2]["segmentation"]["counts"].decode()
            img = next(i for i in coco["images"] if i["id"] == anns[2]["image_id"])
            img["height"] = h + 1  # a consistent GT json, just not the pseudo masks' size

    kwargs, gt = _gt_variant(tmp_path, edit)
    with pytest.raises(ValueError) as want:
        build_report_in_memory(**kwargs, gt=gt)
    with pytest.raises(ValueError) as got:
        build_report(**kwargs, gt=gt)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
    assert not (kwargs["workdir"] / "report" / "metrics.parquet").exists()


def _brute_parts(mask: np.ndarray, min_px: int, frac: float) -> int:
    """8-connected parts with area >= max(min_px, frac * area), by scipy (independent of cv2)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel())[1:]
    return int(np.count_nonzero(areas >= max(float(min_px), frac * mask.sum()))) if mask.any() else 0


def test_fast_parts_count_equals_decode_and_label():
    """count_parts_rle (runs drawn inside the mask's box only, transposed) = labelling the
    whole decoded mask, on random blobs, diagonals, border-touching, empty and full masks."""
    from exits.eval.separated import count_mask_parts, count_parts_rle

    rng = np.random.default_rng(0)
    masks = [np.zeros((9, 7), bool), np.ones((9, 7), bool), np.eye(12, dtype=bool), np.eye(12, dtype=bool)[::-1],
             np.zeros((1, 1), bool), np.ones((1, 1), bool), np.zeros((0, 5), bool)]
    for _ in range(300):
        h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        m = rng.random((h, w)) < rng.uniform(0.02, 0.9)
        if rng.random() < 0.5:
            m = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if rng.random() < 0.3:
            m[: int(rng.integers(0, h + 1))] = False
        masks.append(m)
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        for px, frac in ((16, 0.05), (1, 0.0), (3, 0.2)):
            want = _brute_parts(m, px, frac)
            if m.size:
                assert count_mask_parts(m, px, frac) == want
                full = mask_utils.decode(rle)  # the whole mask, as the old count did
                assert count_mask_parts(full, px, frac) == want
            assert count_parts_rle(rle, px, frac) == want
            assert count_parts_rle({"size": rle["size"], "counts": rle["counts"].decode()}, px, frac) == want


def _synthetic_coco(root: Path, scale: float, row_group_size: int = 1000) -> tuple[Path, Path]:
    """bench_scale's COCO-like json (8-vertex polygons) at ``scale`` and a pseudo-label table
    whose masks are those polygons moved one pixel right."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_scale

    bench_scale.generate_dataset(root, "coco", scale)
    data = json.loads((root / "annotations.json").read_text())
    cols: dict[str, list] = {"ann_id": [], "height": [], "width": [], "rle_counts": [], "score": []}
    for k, ann in enumerate(data["annotations"]):
        poly = [[v + (1.0 if i % 2 == 0 else 0.0) for i, v in enumerate(ann["segmentation"][0])]]
        rle = mask_utils.merge(mask_utils.frPyObjects(poly, 480, 640))
        for key, value in (("ann_id", ann["id"]), ("height", 480), ("width", 640),
                           ("rle_counts", rle["counts"].decode()), ("score", (k * 0.37) % 1.0)):
            cols[key].append(value)
    pseudo = root / "pseudo.parquet"
    pq.write_table(pa.table(cols), pseudo, row_group_size=row_group_size)
    return root / "annotations.json", pseudo


def test_streaming_pass_memory_is_flat_in_the_number_of_objects(tmp_path, monkeypatch):
    """Python-heap peak (tracemalloc: numpy columns and every Python object) of the streaming
    pass grows by well under 1/10 of the in-memory evaluation's per object, and by less than
    200 bytes per object (numpy columns, the json's image list), from 1.7k to 6.9k objects."""
    import tracemalloc

    from exits.report import streaming
    from exits.report.evaluation import evaluate_predictions

    from exits.io import json_stream

    monkeypatch.setattr(streaming, "BATCH_OBJECTS", 256)
    monkeypatch.setattr(json_stream, "_CHUNK", 1 << 16)  # the text buffer bounded below these files' sizes
    peaks: dict[str, list[tuple[int, int]]] = {"stream": [], "memory": []}
    for scale in (0.002, 0.008):
        gt, pseudo_path = _synthetic_coco(tmp_path / str(scale), scale)
        work = tmp_path / f"w{scale}"
        work.mkdir()
        tracemalloc.start()
        pseudo = streaming.PseudoMasks(pseudo_path, round_scores=True)
        streaming.evaluate_streaming(pseudo, gt, work / "metrics.parquet", workdir=work)
        peaks["stream"].append((pseudo.count, tracemalloc.get_traced_memory()[1]))
        tracemalloc.stop()
        n = pq.read_metadata(work / "metrics.parquet").num_rows
        assert n == pseudo.count
        t = pq.read_table(pseudo_path)
        pred = {a: {"size": [480, 640], "counts": c} for a, c in zip(t["ann_id"].to_pylist(), t["rle_counts"].to_pylist())}
        del t
        tracemalloc.start()
        ev = evaluate_predictions(pred, gt)
        peaks["memory"].append((len(pred), tracemalloc.get_traced_memory()[1]))
        tracemalloc.stop()
        assert len(ev.rows) == n
        del ev, pred
    per_object = {k: (v[1][1] - v[0][1]) / (v[1][0] - v[0][0]) for k, v in peaks.items()}
    assert per_object["stream"] < 200, per_object
    assert per_object["stream"] < per_object["memory"] / 10, per_object


def test_pseudo_masks_are_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    """GT json in the pseudo table's order: each pseudo row group is decoded once (batches
    walk through them); shuffled GT: each batch decodes only the groups it needs, and the
    table is the same."""
    from exits.report import streaming

    gt, pseudo_path = _synthetic_coco(tmp_path, 0.001, row_group_size=150)  # 860 objects, 6 groups
    monkeypatch.setattr(streaming, "BATCH_OBJECTS", 100)
    reads: list[int] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        if "rle_counts" in (kwargs.get("columns") or ()):
            reads.append(i)
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    pseudo = streaming.PseudoMasks(pseudo_path, round_scores=True)
    ev = streaming.evaluate_streaming(pseudo, gt, tmp_path / "m.parquet", workdir=tmp_path, n_worst=3)
    assert reads == list(range(6))
    assert len(ev.worst_gt) == 3 and pq.read_metadata(tmp_path / "m.parquet").num_rows == 860

    data = json.loads(gt.read_text())
    data["annotations"] = data["annotations"][::-1]
    gt.write_text(json.dumps(data))
    reads.clear()
    streaming.evaluate_streaming(streaming.PseudoMasks(pseudo_path, round_scores=True), gt, tmp_path / "r.parquet",
                                 workdir=tmp_path, n_worst=3)
    assert len(reads) <= 9 * 2  # 9 batches, each within two neighbouring groups
    assert_tables_equal(pq.read_table(tmp_path / "r.parquet"), pq.read_table(tmp_path / "m.parquet"))
