"""The report's parts table (project issue 28, item 1): box / GrabCut / dense CRF / generator /
final mask on one sample of objects, and stage 1d's stored generator mask behind row (d).

Every number is checked against masks computed here directly (numpy IoU, the peers called
one object at a time), not against the module's own helpers."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils

from exits.baselines import dense_crf_box_mask, grabcut_mask
from exits.data.crops import CropWindow
from exits.data.images import read_rgb
from exits.report.build import build_report, build_report_in_memory
from exits.report.parts import PARTS, sample_positions
from exits.stages.pseudo_labels import NULLABLE_COLUMNS, PSEUDO_SCHEMA, merge_pseudo_labels

from tests.test_cli_first_run import exits_command, fresh_user_env
from tests.tiny_run import build_tiny_run


def _decode(size, counts) -> np.ndarray:
    return mask_utils.decode({"size": list(size), "counts": counts.encode() if isinstance(counts, str) else counts}
                             ).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _shard(cfg, run, images, out, **pseudo) -> dict:
    from exits.pipeline import stage_pseudo_shard

    cfg = cfg.model_copy(update={"pseudo": cfg.pseudo.model_copy(update=pseudo)})
    out.parent.mkdir(parents=True, exist_ok=True)
    path = stage_pseudo_shard(cfg, images, run, 0, run.num_instances(), out, torch.device("cpu"))
    return pq.read_table(path).to_pydict()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Demo data (4 images), its instances table, an untrained tiny generator, and the
    refine_at none / crop / image shards of all its objects."""
    cfg, run, images = build_tiny_run(tmp_path_factory.mktemp("parts"),
                                      ["pseudo.crf_workers=0", "generator.use_retrieval=false"], n_train=4)
    shards = {mode: _shard(cfg, run, images, run.root / "modes" / f"{mode}.parquet", refine_at=mode)
              for mode in ("none", "crop", "image")}
    return cfg, run, images, shards


def _finished_run(tiny, dest, refine_at: str = "none"):
    """A copy of the tiny run with pseudo_labels.json / .parquet merged from one shard."""
    cfg, run, images, _ = tiny
    work = dest / "run"
    shutil.copytree(run.root, work)
    shard = work / "shards" / "pseudo-00000.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "modes" / f"{refine_at}.parquet", shard)
    ann = run.read_meta().annotations
    merge_pseudo_labels([shard], ann, work)
    return work, ann


def test_stage_1d_stores_the_generators_own_mask(tiny):
    _, _, _, shards = tiny
    none, crop, image = shards["none"], shards["crop"], shards["image"]
    # no refinement: the generator's mask is the final mask
    assert none["generator_rle_counts"] == none["rle_counts"]
    # the same generator mask whatever refines it afterwards, and the refinement moved some mask
    assert crop["generator_rle_counts"] == none["rle_counts"] == image["generator_rle_counts"]
    assert crop["rle_counts"] != none["rle_counts"] and image["rle_counts"] != none["rle_counts"]
    # refine_at image: refine_agreement is the IoU of the final mask with exactly this mask
    for i in range(len(image["ann_id"])):
        size = (image["height"][i], image["width"][i])
        final, own = _decode(size, image["rle_counts"][i]), _decode(size, image["generator_rle_counts"][i])
        assert image["refine_agreement"][i] == pytest.approx(_iou(final, own), abs=1e-6)


def test_merge_keeps_it_in_parquet_only_and_old_shards_read_as_null(tiny, tmp_path):
    work, ann = _finished_run(tiny, tmp_path)
    merged = pq.read_table(work / "pseudo_labels.parquet")
    assert merged["generator_rle_counts"].null_count == 0
    assert merged["generator_rle_counts"].to_pylist() == merged["rle_counts"].to_pylist()
    coco = json.loads((work / "pseudo_labels.json").read_text())
    assert coco["annotations"] and all("generator_rle_counts" not in a for a in coco["annotations"])
    # a shard written before the column existed merges, the column null
    old = pq.read_table(work / "shards" / "pseudo-00000.parquet").drop(["generator_rle_counts"])
    pq.write_table(old, work / "shards" / "pseudo-00000.parquet")
    merge_pseudo_labels([work / "shards" / "pseudo-00000.parquet"], ann, work)
    merged = pq.read_table(work / "pseudo_labels.parquet")
    assert merged["generator_rle_counts"].null_count == merged.num_rows > 0
    assert "generator_rle_counts" in NULLABLE_COLUMNS and PSEUDO_SCHEMA.field("generator_rle_counts").type == pa.string()


def _independent_rows(work, gt_json, ann_ids: list[int]) -> dict[str, dict[int, float]]:
    """IoU per object of the box (numpy slice of the points' box), GrabCut and the dense-CRF
    peer (called one object at a time, window from instances.parquet), and the generator and
    final masks as stored."""
    gt = {a["id"]: a for a in json.loads(gt_json.read_text())["annotations"] if a["id"] in ann_ids}
    inst = {r["ann_id"]: r for r in pq.read_table(work / "instances.parquet").to_pylist() if r["ann_id"] in ann_ids}
    pseudo = {r["ann_id"]: r for r in pq.read_table(work / "pseudo_labels.parquet").to_pylist()}
    images = json.loads((work / "run.json").read_text())["images"]
    out: dict[str, dict[int, float]] = {"box": {}, "grabcut": {}, "densecrf": {}, "generator": {}, "final": {}}
    for a in ann_ids:
        g = mask_utils.decode(gt[a]["segmentation"]).astype(bool)
        p = np.rint(np.asarray(inst[a]["extreme_points"]).reshape(4, 2)).astype(int)  # top, left, bottom, right
        box = np.zeros_like(g)
        box[p[0, 1]:p[2, 1] + 1, p[1, 0]:p[3, 0] + 1] = True
        out["box"][a] = _iou(box, g)
        x0, y0, w, h = inst[a]["crop_box"]
        rgb = read_rgb(os.path.join(images, inst[a]["file_name"]))
        window = CropWindow(x0, y0, w, h, size=96)
        out["grabcut"][a] = _iou(grabcut_mask(rgb, p.astype(float), window).astype(bool), g)
        out["densecrf"][a] = _iou(dense_crf_box_mask(rgb, p.astype(float), window).astype(bool), g)
        size = (pseudo[a]["height"], pseudo[a]["width"])
        out["generator"][a] = _iou(_decode(size, pseudo[a]["generator_rle_counts"]), g)
        out["final"][a] = _iou(_decode(size, pseudo[a]["rle_counts"]), g)
    return out


def test_rows_equal_masks_computed_directly_on_a_capped_sample(tiny, tmp_path):
    work, ann = _finished_run(tiny, tmp_path, refine_at="image")
    summary = build_report(work, publish=False, peer_sample=3)
    metrics = pq.read_table(work / "report" / "metrics.parquet").to_pydict()
    ids = sorted(metrics["ann_id"])
    assert len(ids) > 3
    picked = [ids[(i * len(ids)) // 3] for i in range(3)]  # evenly strided over the sorted ids
    parts = summary["parts"]
    assert parts["sample"]["objects"] == 3 and parts["sample"]["evaluated"] == len(ids)
    assert [r["part"] for r in parts["rows"]] == list(PARTS) and parts["omitted"] == []
    rows = {r["part"]: r for r in parts["rows"]}
    direct = _independent_rows(work, ann, picked)
    separated = {a: s for a, s in zip(metrics["ann_id"], metrics["separated"])}
    sep = [a for a in picked if separated[a]]
    assert parts["sample"]["separated"] == len(sep)
    for part, ious in direct.items():
        r = rows[part]
        assert r["all"]["count"] == 3
        assert r["all"]["miou"] == pytest.approx(np.mean([ious[a] for a in picked]), abs=1e-9), part
        if sep:
            assert r["separated"]["miou"] == pytest.approx(np.mean([ious[a] for a in sep]), abs=1e-9), part
        if len(sep) < 3:
            assert r["non_separated"]["miou"] == pytest.approx(
                np.mean([ious[a] for a in picked if not separated[a]]), abs=1e-9), part
        sizes = {b: s["count"] for b, s in r["per_size"].items()}
        assert sum(sizes.values()) == 3
    # (e) on the sample is the report's own per-object IoU; the refinement changed something
    iou = dict(zip(metrics["ann_id"], metrics["iou"]))
    assert rows["final"]["all"]["miou"] == pytest.approx(np.mean([iou[a] for a in picked]), abs=1e-12)
    assert rows["generator"]["all"]["miou"] != rows["final"]["all"]["miou"]
    # the dense-CRF peer is a real third mask, not a copy of another row
    assert rows["densecrf"]["all"]["miou"] not in (rows["box"]["all"]["miou"], rows["grabcut"]["all"]["miou"])
    # the table in report.md and report.html
    md = (work / "report" / "report.md").read_text()
    assert "## What each part gives (like for like)" in md and f"same 3 of {len(ids)} evaluated objects" in md
    line = next(x for x in md.splitlines() if x.startswith("| (a) extreme-point box"))
    assert f"| {100 * rows['box']['all']['miou']:.1f} |" in line
    assert "What each part gives" in (work / "report" / "report.html").read_text()


def test_generator_row_equals_final_without_refinement_and_streaming_equals_in_memory(tiny, tmp_path):
    work, _ = _finished_run(tiny, tmp_path, refine_at="none")
    streamed = build_report(work, publish=False, peer_sample=1000)
    rows = {r["part"]: r for r in streamed["parts"]["rows"]}
    assert streamed["parts"]["sample"]["objects"] == streamed["all"]["count"]  # fewer than 1000: all of them
    for key in ("all", "separated", "non_separated", "per_size"):
        assert rows["generator"][key] == rows["final"][key]
    assert rows["final"]["all"] == streamed["all"]  # the whole set sampled: the report's own mIoU
    in_memory = build_report_in_memory(work, publish=False, peer_sample=1000)
    assert json.dumps(in_memory["parts"]) == json.dumps(streamed["parts"])


def test_old_run_without_generator_masks_gets_a_reason_and_zero_turns_it_off(tiny, tmp_path):
    work, _ = _finished_run(tiny, tmp_path)
    path = work / "pseudo_labels.parquet"
    t = pq.read_table(path)
    pq.write_table(t.drop(["generator_rle_counts"]).replace_schema_metadata(t.schema.metadata), path)
    summary = build_report(work, publish=False, peer_sample=2)
    parts = summary["parts"]
    assert [r["part"] for r in parts["rows"]] == ["box", "grabcut", "densecrf", "final"]
    (omitted,) = parts["omitted"]
    assert omitted["part"] == "generator" and "generator_rle_counts" in omitted["reason"]
    md = (work / "report" / "report.md").read_text()
    assert "Not shown: (d) generator's own mask" in md and "generator_rle_counts" in md
    assert not any(x.startswith("| (d)") for x in md.splitlines())

    summary = build_report(work, publish=False, peer_sample=0)
    assert "parts" not in summary
    assert "What each part gives" not in (work / "report" / "report.md").read_text()


def test_missing_images_drop_only_the_image_peers(tiny, tmp_path):
    work, _ = _finished_run(tiny, tmp_path)
    meta = json.loads((work / "run.json").read_text())
    meta["images"] = str(tmp_path / "gone")
    (work / "run.json").write_text(json.dumps(meta))
    parts = build_report(work, publish=False, peer_sample=2)["parts"]
    assert [r["part"] for r in parts["rows"]] == ["box", "generator", "final"]
    assert {o["part"] for o in parts["omitted"]} == {"grabcut", "densecrf"}
    assert all("images not readable" in o["reason"] for o in parts["omitted"])


def test_sample_positions():
    assert sample_positions(10, 3).tolist() == [0, 3, 6]
    assert sample_positions(4, 1000).tolist() == [0, 1, 2, 3]
    assert sample_positions(5, 0).tolist() == [] and sample_positions(0, 5).tolist() == []
    pos = sample_positions(1_000_003, 1000)
    assert pos.size == 1000 and np.all(np.diff(pos) > 0) and pos[-1] < 1_000_003


def test_cli_report_peer_sample_writes_the_table(tiny, tmp_path):
    work, _ = _finished_run(tiny, tmp_path)
    done = subprocess.run([*exits_command(), "report", "-w", str(work), "--peer-sample", "2", "--worst", "1"],
                          capture_output=True, text=True, timeout=300, env=fresh_user_env(tmp_path / "prefect-home"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Parts on 2 objects (mIoU all %): box " in done.stdout
    s = json.loads((work / "report" / "summary.json").read_text())
    assert s["parts"]["sample"]["objects"] == 2 and s["parts"]["sample"]["peer_sample"] == 2
    md = (work / "report" / "report.md").read_text()
    assert "## What each part gives (like for like)" in md and "same 2 of" in md
    box = next(r for r in s["parts"]["rows"] if r["part"] == "box")
    assert not math.isnan(box["all"]["miou"])

    bad = subprocess.run([*exits_command(), "report", "-w", str(work), "--peer-sample", "-1"],
                         capture_output=True, text=True, timeout=300, env=fresh_user_env(tmp_path / "prefect-home"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
