"""Scale paths: the streaming json reader, the streaming pseudo-label merge (byte for byte the
in-memory merge), per-shard row-group reads, and the scale benchmark at 1/1000."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exits.io import json_stream
from exits.io.json_stream import JsonStreamError, iter_top_level
from exits.eval.separated import count_parts_rle
from exits.stages.pseudo_labels import PSEUDO_SCHEMA, NULLABLE_COLUMNS, merge_pseudo_labels
from exits.stages.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]


def _stream(text: str, stream: str = "annotations") -> dict:
    out = {}
    for key, value in iter_top_level(io.StringIO(text), stream=stream):
        out[key] = list(value) if key == stream else value
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 22])
def test_stream_reader_equals_json_load_across_chunk_boundaries(monkeypatch, chunk):
    monkeypatch.setattr(json_stream, "_CHUNK", chunk)
    data = {"info": {"x": "é\u2603", "n": 12345678901234567890}, "images": [{"id": 1, "w": 1.25e-7}],
            "annotations": [{"id": i, "v": [i * 1.5, None, True, "a\"b"]} for i in range(5)], "z": 1234567}
    for text in (json.dumps(data), json.dumps(data, indent=2), json.dumps(data, ensure_ascii=False)):
        assert _stream(text) == data
    assert _stream('{"annotations": []}') == {"annotations": []}
    assert _stream(" { } ") == {}


def test_stream_reader_names_the_file_on_bad_input():
    with pytest.raises(JsonStreamError, match="f.json.*expected"):
        list(iter_top_level(io.StringIO("[1, 2]"), source="f.json"))
    with pytest.raises(JsonStreamError, match="not a list"):
        for _ in iter_top_level(io.StringIO('{"annotations": 3}')):
            pass
    with pytest.raises(JsonStreamError, match="invalid JSON"):
        for key, value in iter_top_level(io.StringIO('{"annotations": [{"id": 1}, {"id": ]}')):
            list(value)


def _old_merge_bytes(annotations_json: Path, table: pa.Table) -> bytes:
    """The merge as it was before streaming: json.load, replace, json.dump (the reference)."""
    with open(annotations_json, encoding="utf-8") as fh:
        data = json.load(fh)
    cols = table.to_pydict()
    row_of = {a: i for i, a in enumerate(cols["ann_id"])}
    anns = []
    for ann in data["annotations"]:
        i = row_of.get(ann.get("id"))
        if i is None:
            continue
        rle = {"size": [cols["height"][i], cols["width"][i]], "counts": cols["rle_counts"][i]}
        anns.append(dict(ann, segmentation=rle, area=float(cols["area"][i]), score=round(float(cols["score"][i]), 5),
                         num_parts=count_parts_rle(rle)))
    data["annotations"] = anns
    data.setdefault("info", {})["pseudo_labels"] = "EXITS pseudo masks (segmentation replaced; score = mask confidence)"
    return json.dumps(data).encode()


def _gt_shards(annotations_json: Path, out: Path, shard_size: int, drop: set[int] = frozenset(),
               with_parts: bool = True) -> list[Path]:
    """Pseudo shards whose masks are the json's own masks (polygon or RLE), with made-up scores."""
    import pycocotools.mask as mask_utils

    data = json.loads(annotations_json.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    rows = []
    for k, ann in enumerate(a for a in data["annotations"] if a["id"] not in drop):
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        rows.append({"ann_id": ann["id"], "image_id": ann["image_id"], "category_id": ann["category_id"], "height": h,
                     "width": w, "rle_counts": counts, "area": int(mask_utils.area({"size": [h, w], "counts": counts})),
                     "score": 0.1 + (k * 0.37) % 0.9, "certainty": 0.5, "point_agreement": float("nan"),
                     "num_parts": count_parts_rle({"size": [h, w], "counts": counts})})
    # Shards as an older version wrote them: no triage columns (and, without parts, no num_parts).
    schema = pa.schema([f for f in PSEUDO_SCHEMA if f.name not in NULLABLE_COLUMNS and (with_parts or f.name != "num_parts")])
    paths = []
    for i, start in enumerate(range(0, len(rows), shard_size)):
        part = rows[start:start + shard_size]
        table = pa.table({n: [r[n] for r in part] for n in schema.names}, schema=schema)
        paths.append(write_shard(table, out / f"pseudo-{i:05d}.parquet", key="k"))
    return paths


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory) -> Path:
    from exits.demo import generate_demo_dataset

    out = tmp_path_factory.mktemp("demo_scale")
    generate_demo_dataset(out, n_train=12, n_val=1, seed=5)
    return out / "instances.json"


@pytest.mark.parametrize("with_parts", [True, False])
def test_streaming_merge_is_byte_identical_to_in_memory_merge_on_demo_data(demo_json, tmp_path, with_parts):
    data = json.loads(demo_json.read_text())
    dropped = {data["annotations"][1]["id"], data["annotations"][-1]["id"]}  # e.g. rejected records
    shards = _gt_shards(demo_json, tmp_path / "shards", 5, drop=dropped, with_parts=with_parts)
    paths = merge_pseudo_labels(shards, demo_json, tmp_path / "run")
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    expected = _old_merge_bytes(demo_json, table)
    got = paths["json"].read_bytes()
    assert got == expected
    merged = json.loads(got)
    assert len(merged["annotations"]) == len(data["annotations"]) - 2
    assert not {a["id"] for a in merged["annotations"]} & dropped
    out = pq.read_table(paths["parquet"])
    assert out.column("ann_id").to_pylist() == [a["id"] for a in merged["annotations"]]
    assert json.loads(out.schema.metadata[b"exits_categories"]) == {str(c["id"]): c["name"] for c in data["categories"]}


def test_streaming_merge_of_reordered_shards_and_repeated_ids_matches_reference(demo_json, tmp_path, monkeypatch):
    """Shards out of json order take the fallback Parquet path; a repeated id keeps its last
    row (dict semantics of the reference); small row groups are written across shards."""
    from exits.stages import pseudo_label_files

    monkeypatch.setattr(pseudo_label_files, "ROW_GROUP_ROWS", 7)
    shards = _gt_shards(demo_json, tmp_path / "shards", 4)
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    expected = _old_merge_bytes(demo_json, table)
    in_order = merge_pseudo_labels(shards, demo_json, tmp_path / "a")
    assert in_order["json"].read_bytes() == expected
    meta = pq.ParquetFile(in_order["parquet"]).metadata
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert groups[:-1] == [7] * (len(groups) - 1) and 1 <= groups[-1] <= 7 and sum(groups) == table.num_rows
    reordered = merge_pseudo_labels(shards[::-1], demo_json, tmp_path / "b")
    assert reordered["json"].read_bytes() == expected
    a, b = pq.read_table(in_order["parquet"]), pq.read_table(reordered["parquet"])
    assert b.column("ann_id").to_pylist() == a.column("ann_id").to_pylist()
    assert b.column("rle_counts").to_pylist() == a.column("rle_counts").to_pylist()
    # the first shard again, with other scores, after the rest: its rows win
    first = pq.read_table(shards[0])
    dup = write_shard(first.set_column(first.column_names.index("score"), "score",
                                       pa.array(np.full(first.num_rows, 0.25, np.float32))),
                      tmp_path / "shards" / "dup.parquet", key="k")
    merged = json.loads(merge_pseudo_labels([*shards, dup], demo_json, tmp_path / "c")["json"].read_bytes())
    ids = set(first.column("ann_id").to_pylist())
    assert {a["score"] for a in merged["annotations"] if a["id"] in ids} == {0.25}
    assert len(merged["annotations"]) == len(json.loads(expected)["annotations"])


def test_merge_columns_lookup_matches_an_int_keyed_dict() -> None:
    # The searchsorted lookup replaced {int(id): row}: it must match what that dict matched
    # (the reader accepts int(id), so 5.0 is object 5), the last row of a repeated id included.
    from exits.stages.pseudo_label_files import MergeColumns

    ids = [7, 5, 9, 5, 2**62]
    table = pa.table({"ann_id": pa.array(ids, pa.int64()), "height": [4] * 5, "width": [4] * 5,
                      "area": [1] * 5, "score": [0.5] * 5, "rle_counts": ["04"] * 5})
    cols = MergeColumns([table])
    reference = {a: i for i, a in enumerate(ids)}
    for key in (7, 5, 9, 2**62, 5.0, 9.0, True, 3, 5.5, "5", None, [5], 2**70, -1):
        expected = reference.get(key) if isinstance(key, (int, float)) else None
        assert cols.row(key) == expected, key


def test_streaming_merge_handles_info_absent_pretty_input_and_unicode(tmp_path, tiny_coco):
    data = json.loads(tiny_coco.read_text())
    data["categories"][0]["name"] = "caf\u00e9 \u2603"
    data["info"] = {"year": 2026, "description": "x"}
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    shards = _gt_shards(tiny_coco, tmp_path / "shards", 2)
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    for src in (tiny_coco, pretty):  # tiny_coco has no "info" key
        got = merge_pseudo_labels(shards, src, tmp_path / src.stem)["json"].read_bytes()
        assert got == _old_merge_bytes(src, table)


def test_scale_benchmark_at_one_thousandth(tmp_path):
    """The scale benchmark's stages at 1/1000 of COCO (860 objects), in-process: every stage
    runs, the streaming merge equals the in-memory one, export and queue see every object."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_scale

    row = bench_scale.run_scale("coco", 0.001, tmp_path, shard_size=128, in_process=True,
                                stages=tuple(s for s in bench_scale.STAGES if s != "retrieval_shard"),
                                log=lambda *_: None)
    assert row["objects"] == 860 and row["images"] == 118
    st = row["stages"]
    assert st["prepare"]["objects"] == 860 and st["plan"]["shards"] == 7
    assert st["pseudo_shard"]["rows"] == 128
    run = tmp_path / "coco-0.001" / "run"
    data = tmp_path / "coco-0.001" / "data"
    shards = sorted((run / "shards").glob("pseudo-*.parquet"))
    table = pa.concat_tables([pq.read_table(p).replace_schema_metadata(None).cast(PSEUDO_SCHEMA) for p in shards])
    assert (run / "pseudo_labels.json").read_bytes() == _old_merge_bytes(data / "annotations.json", table)
    assert st["export"]["objects_out"] == 860 - st["export"]["rejected"] and st["export"]["accepted"] > 0
    assert st["queue"]["objects"] == 860
    scores = dict(zip(table.column("ann_id").to_pylist(), table.column("score").to_pylist()))
    first = st["queue"]["first"]
    assert [scores[i] for i in first] == sorted(scores.values())[:len(first)]
    assert 0.5 < st["report"]["miou"] < 1.0 and st["report"]["evaluated"] == 860


def test_read_rows_reads_only_the_row_groups_of_a_shard(tmp_path, monkeypatch):
    from exits.stages import shards as shards_mod

    table = pa.table({"a": list(range(1000)), "b": [str(i) for i in range(1000)]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=64)
    read = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read.append(list(groups)) or real(self, groups, **kw))
    for start, stop in ((0, 10), (60, 130), (999, 1000), (128, 192), (0, 1000), (500, 500)):
        assert shards_mod.read_rows(path, start, stop).equals(table.slice(start, stop - start))
    assert read[1] == [0, 1, 2] and read[3] == [2]
    with pytest.raises(ValueError, match="t.parquet.*outside"):
        shards_mod.read_rows(path, 990, 1001)


def test_merge_points_streams_shards_into_row_groups(tmp_path):
    from exits.stages.point_retrieval import POINTS_SCHEMA, merge_points, read_points, read_points_rows

    rng = np.random.default_rng(0)
    paths, tables = [], []
    for i, n in enumerate((5000, 3, 7000, 0, 4500)):
        t = pa.table({"ann_id": np.arange(n) + 10_000 * i, "grid": np.full(n, 12, np.int32),
                      "seed_fg": [[1, 2]] * n, "num_seed_bg": rng.integers(0, 9, n).astype(np.int32),
                      "pseudo_fg": [[int(rng.integers(144))]] * n, "pseudo_bg": [[]] * n,
                      "num_box": np.full(n, 20, np.int32), "seed_bg_extra": [[]] * n, "valid": np.ones(n, bool)},
                     schema=POINTS_SCHEMA)
        paths.append(write_shard(t, tmp_path / f"points-{i:05d}.parquet", key="k"))
        tables.append(t)
    out = merge_points(paths, tmp_path / "points.parquet")
    whole = pa.concat_tables(tables)
    assert read_points(out).equals(whole)
    md = pq.ParquetFile(out).metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [8192, 8192, 16503 - 2 * 8192]
    assert read_points_rows(out, 8000, 8300).equals(whole.slice(8000, 300))


@pytest.mark.parametrize("with_info", [True, False])
def test_streaming_export_is_byte_identical_to_the_in_memory_merge(demo_json, tmp_path, with_info):
    import copy
    from dataclasses import asdict

    from exits.io import file_digest
    from exits.run_folder import FIXED_SOURCE_DIGEST, RunFolder
    from exits.spotfix.export import merge_fixes, run_export
    from exits.spotfix.store import FixesStore, FixRecord

    shards = _gt_shards(demo_json, tmp_path / "shards", 7)
    run = RunFolder(tmp_path / "run")
    merge_pseudo_labels(shards, demo_json, run.root)
    pseudo = json.loads(run.pseudo_json.read_text())
    if not with_info:
        del pseudo["info"]
        run.pseudo_json.write_text(json.dumps(pseudo, indent=1))
    anns = pseudo["annotations"]
    store = FixesStore(run.root)
    h, w = pseudo["images"][0]["height"], pseudo["images"][0]["width"]
    assert all((im["height"], im["width"]) == (h, w) for im in pseudo["images"])
    square = {"size": [h, w], "counts": _square_rle(h, w)}
    for k, ann in enumerate(anns[:9]):
        decision = "reject" if k % 3 == 0 else "accept"
        rle = None if decision == "reject" else square
        if k == 4:
            rle = {"size": [3, 3], "counts": _square_rle(3, 3)}  # does not fit the image: invalid, unchanged
        store.append(FixRecord(ann_id=ann["id"], decision=decision, user="t", clicks=[], rle=rle))
    store.append(FixRecord(ann_id=10**9, decision="reject", user="t", clicks=[], rle=None))  # unknown id
    result = run_export(run.root)
    merged, counts = merge_fixes(copy.deepcopy(pseudo), store.latest(), n_records=len(store.records()))
    merged.setdefault("info", {})["spotfix"] = {
        "source": "pseudo_labels.json", FIXED_SOURCE_DIGEST: file_digest(run.pseudo_json, memo=False),
        "counts": asdict(counts),
        "rule": "latest decision per object wins; accepted masks replace pseudo masks; rejected objects removed"}
    assert result.counts == counts and counts.rejected == 3 and counts.unknown_ids == 1 and counts.accepted == 5 and counts.invalid == 1
    assert result.path.read_bytes() == json.dumps(merged).encode()


def test_streaming_export_of_odd_files_is_byte_identical_to_the_in_memory_merge(tmp_path):
    """Keys after the annotations (as in COCO's own files), a repeated annotation id (each
    occurrence merged and counted), an id past int64, decisions of unknown ids."""
    import copy
    from dataclasses import asdict

    from exits.io import file_digest
    from exits.run_folder import FIXED_SOURCE_DIGEST, RunFolder
    from exits.spotfix.export import merge_fixes, run_export
    from exits.spotfix.store import FixesStore, FixRecord

    h, w = 20, 30
    square = {"size": [h, w], "counts": _square_rle(h, w)}
    anns = [{"id": i, "image_id": 1 + i % 2, "category_id": 1, "segmentation": square, "area": 1.0, "score": 0.5}
            for i in (5, 3, 9, 3, 2**70, 11)]
    pseudo = {"annotations": anns, "images": [{"id": 1, "height": h, "width": w}, {"id": 2, "height": h, "width": w}],
              "categories": [{"id": 1, "name": "x"}], "info": {"d": 1}}
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.pseudo_json.write_text(json.dumps(pseudo))
    store = FixesStore(run.root)
    store.append(FixRecord(ann_id=3, decision="accept", user="t", clicks=[], rle=square))  # both occurrences
    store.append(FixRecord(ann_id=9, decision="reject", user="t", clicks=[], rle=None))
    store.append(FixRecord(ann_id=2**70, decision="reject", user="t", clicks=[], rle=None))
    for unknown in (4, 2**80, -1):
        store.append(FixRecord(ann_id=unknown, decision="reject", user="t", clicks=[], rle=None))
    result = run_export(run.root)
    merged, counts = merge_fixes(copy.deepcopy(pseudo), store.latest(), n_records=len(store.records()))
    merged["info"]["spotfix"] = {
        "source": "pseudo_labels.json", FIXED_SOURCE_DIGEST: file_digest(run.pseudo_json, memo=False),
        "counts": asdict(counts),
        "rule": "latest decision per object wins; accepted masks replace pseudo masks; rejected objects removed"}
    assert (counts.objects_in, counts.accepted, counts.rejected, counts.objects_out, counts.unknown_ids) == (5, 2, 2, 4, 3)
    assert result.counts == counts
    assert result.path.read_bytes() == json.dumps(merged).encode()


def _square_rle(h: int, w: int) -> str:
    import pycocotools.mask as mask_utils

    m = np.zeros((h, w), np.uint8, order="F")
    m[h // 4: h // 2 + 1, w // 4: w // 2 + 1] = 1
    return mask_utils.encode(m)["counts"].decode()


def test_catalog_from_parquet_columns_equals_the_json_catalog(demo_json, tmp_path, monkeypatch):
    from exits.config import dump_config, load_config
    from exits.pipeline import stage_prepare
    from exits.run_folder import RunFolder
    from exits.spotfix import catalog as catalog_mod
    from exits.spotfix.catalog import QueueFilter, RunCatalog

    cfg = load_config("demo", ["device=cpu"])
    run = RunFolder(tmp_path / "run")
    run.write_run_files(dump_config(cfg), demo_json.parent / "images", demo_json, None)
    stage_prepare(cfg, demo_json, demo_json.parent / "images", run.root, progress=False)
    merge_pseudo_labels(_gt_shards(demo_json, tmp_path / "shards", 9), demo_json, run.root)
    columnar = RunCatalog.load(run.root)
    assert columnar._columns is not None  # the Parquet path was taken
    monkeypatch.setattr(catalog_mod, "_columns_from_parquet", lambda run: None)
    from_json = RunCatalog.load(run.root)
    assert from_json._columns is None
    assert set(columnar.objects) == set(from_json.objects) and len(columnar.objects) > 20
    assert columnar.categories == from_json.categories
    for flt in (QueueFilter(), QueueFilter(separated=True), QueueFilter(category_id=2, min_score=0.3, max_score=0.8)):
        assert list(columnar.queue(flt)) == list(from_json.queue(flt))
    assert any(o.separated for o in columnar.queue())
    q = columnar.queue()
    assert q[:3] == list(from_json.queue())[:3] and q[-1] == from_json.queue()[-1]
    for ann_id in list(from_json.objects)[:5]:
        obj = columnar.objects[ann_id]
        assert obj == from_json.objects[ann_id]
        assert columnar.images[obj.image_id] == from_json.images[obj.image_id]
        assert (columnar.pseudo_mask(ann_id) == from_json.pseudo_mask(ann_id)).all()


def test_report_reads_pseudo_masks_from_parquet_columns_with_the_json_values(demo_json, tmp_path):
    from exits.report.evaluation import pseudo_label_rles

    paths = merge_pseudo_labels(_gt_shards(demo_json, tmp_path / "shards", 9), demo_json, tmp_path / "run")
    rles, scores = pseudo_label_rles(paths["json"])
    data = json.loads(paths["json"].read_text())
    assert rles == {a["id"]: a["segmentation"] for a in data["annotations"]}
    assert scores == {a["id"]: a["score"] for a in data["annotations"]}


# --- bench_scale.py --full: the whole `exits run` through the CLI (tiny) ---------------------
def test_max_steps_ends_training_part_way_and_the_schedule_with_it():
    import torch
    from torch.utils.data import TensorDataset

    from exits.engine import TrainSettings, train

    class Mse:
        def loss(self, model, batch, teacher, epoch):
            x, y = batch
            mse = torch.nn.functional.mse_loss(model(x), y)
            return mse, {"mse": mse.item()}

    data = TensorDataset(torch.randn(20, 3), torch.randn(20, 1))  # 5 steps per epoch at batch 4
    base = dict(batch_size=4, lr=1e-2, warmup_epochs=0, device="cpu", seed=0)
    one = train(torch.nn.Linear(3, 1), data, Mse(), TrainSettings(epochs=4, max_steps=3, **base), progress=False)
    assert [h["steps"] for h in one.history] == [3]
    two = train(torch.nn.Linear(3, 1), data, Mse(), TrainSettings(epochs=4, max_steps=7, **base), progress=False)
    assert [h["steps"] for h in two.history] == [5, 2]
    assert two.history[-1]["lr"] < two.history[0]["lr"]  # the cosine schedule spans 7 steps, not 20
    full = train(torch.nn.Linear(3, 1), data, Mse(), TrainSettings(epochs=2, **base), progress=False)
    assert [h["steps"] for h in full.history] == [5, 5]
    with pytest.raises(ValueError, match="max_steps"):
        TrainSettings(epochs=1, max_steps=0, **base)


@pytest.mark.slow
def test_full_scale_benchmark_runs_every_command_through_the_cli(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.scale_full_run import FLOW_STAGES, run_full

    quick = ("similarity.optim.max_steps=2", "generator.optim.max_steps=2", "generator.optim.num_workers=0",
             "flows.shard_size=64", "flows.shard_limit=2")  # 4 shards: 0 and 2 computed, 1 and 3 placeholders
    row = run_full(0.0, tmp_path, images=30, objects=200, overrides=quick, log=lambda s: None)
    assert row["objects"] == 200 and row["images"] == 30
    assert len(list((tmp_path / "coco-30img" / "data" / "images").glob("*.jpg"))) == 30
    run = row["run"]
    assert run["summary_objects"] == 200 and run["shards"] == 4
    assert set(run["tasks"]) == {"Completed"}  # nothing failed, nothing from an earlier run
    stages = run["stages"]
    assert set(stages) == set(FLOW_STAGES.values()) - {"detector"}  # every stage of `exits run`
    for name, stage in stages.items():
        assert stage["seconds"] > 0, name
        assert stage["peak_rss_mb"]["flow"] > 50 and stage["tree_peak_rss_mb"] >= stage["peak_rss_mb"]["flow"], name
    assert stages["similarity"]["peak_rss_mb"]["dataloader_worker"] > 0  # num_workers 1 there
    assert "dataloader_worker" not in stages["generator"]["peak_rss_mb"]  # num_workers 0 there
    assert stages["retrieval"]["eta_lines"] >= 4 and stages["pseudo_labels"]["eta_lines"] >= 4  # one per shard
    kinds = {p["kind"] for p in run["processes"]}
    assert {"flow", "prefect_server", "dataloader_worker"} <= kinds
    assert all(p["peak_rss_mb"] > 0 for p in run["processes"])
    assert 0.0 < run["miou_all"] <= 1.0
    for command in ("report", "export"):
        assert row[command]["wall_s"] > 0 and row[command]["own_peak_rss_mb"] > 50
    assert row["fixes"] == 200 and row["queue"]["objects"] == 200
    fixed = json.loads((tmp_path / "coco-30img" / "run" / "pseudo_labels_fixed.json").read_text())
    assert len(fixed["annotations"]) == 200 - 20  # 1 fix in 10 is a rejection
    pseudo = pq.read_table(tmp_path / "coco-30img" / "run" / "pseudo_labels.parquet", columns=["ann_id", "score"])
    assert sorted(pseudo["ann_id"].to_pylist()) == list(range(1, 201))  # every object, placeholders included
    scores = dict(zip(*pseudo.to_pydict().values()))
    instances = pq.read_table(tmp_path / "coco-30img" / "run" / "instances.parquet", columns=["ann_id"])["ann_id"].to_pylist()
    placeholder_rows = [a for i, a in enumerate(instances) if (i // 64) % 2 == 1]
    assert placeholder_rows and all(scores[a] == 0.0 for a in placeholder_rows)
    assert any(scores[a] > 0.0 for i, a in enumerate(instances) if (i // 64) % 2 == 0)


def test_shard_limit_computes_every_kth_shard_and_placeholders_cover_the_rest(demo_json, tmp_path):
    import pycocotools.mask as mask_utils

    from exits.baselines import box_mask_full
    from exits.config import ConfigError, dump_config, load_config
    from exits.pipeline import stage_prepare
    from exits.run_folder import RunFolder
    from exits.stages.point_retrieval import POINTS_SCHEMA
    from exits.stages.shards import shard_ranges
    from flows.shard_limit import is_placeholder, placeholder_points_shard, placeholder_pseudo_shard, shard_stride

    cfg = load_config("demo", ["device=cpu", "flows.shard_size=5", "flows.shard_limit=3"])
    run = RunFolder(tmp_path / "run")
    run.write_run_files(dump_config(cfg), demo_json.parent / "images", demo_json, None)
    stage_prepare(cfg, demo_json, demo_json.parent / "images", run.root, progress=False)
    n = run.num_instances()
    shards = len(shard_ranges(n, 5))
    stride = shard_stride(cfg, run, "test")
    assert shards > 3 and stride == -(-shards // 3)
    computed = [i for i in range(shards) if not is_placeholder(i, stride)]
    assert computed == list(range(0, shards, stride)) and 1 <= len(computed) <= 3
    assert shard_stride(load_config("demo", ["flows.shard_size=5"]), run, "test") is None  # default: all
    assert shard_stride(load_config("demo", ["flows.shard_size=5", f"flows.shard_limit={shards}"]), run, "t") is None
    with pytest.raises(ConfigError, match="shard_limit"):
        load_config("demo", ["flows.shard_limit=0"])

    start, stop = shard_ranges(n, 5)[1]
    rows = pq.read_table(run.instances).slice(start, stop - start).to_pylist()
    points = pq.read_table(placeholder_points_shard(cfg, demo_json.parent / "images", run, start, stop,
                                                   tmp_path / "p.parquet", None))
    assert points.schema.equals(POINTS_SCHEMA, check_metadata=False)
    assert points["ann_id"].to_pylist() == [r["ann_id"] for r in rows]
    assert not any(points["valid"].to_pylist()) and all(len(v) == 0 for v in points["pseudo_fg"].to_pylist())
    pseudo = pq.read_table(placeholder_pseudo_shard(cfg, demo_json.parent / "images", run, start, stop,
                                                    tmp_path / "m.parquet", None)).to_pylist()
    assert [p["ann_id"] for p in pseudo] == [r["ann_id"] for r in rows]
    for p, r in zip(pseudo, rows):
        mask = mask_utils.decode({"size": [p["height"], p["width"]], "counts": p["rle_counts"].encode()})
        box = box_mask_full(np.asarray(r["extreme_points"]).reshape(4, 2), r["height"], r["width"])
        assert (mask == box).all() and p["area"] == int(box.sum()) > 0
        assert p["score"] == 0.0 and p["num_parts"] == 1 and p["image_id"] == r["image_id"]


def test_training_starts_num_workers_dataloader_processes_not_twice_as_many():
    """tqdm.auto's progress bar called iter() on the DataLoader in its constructor: a second,
    idle iterator with its own worker processes (2 x optim.num_workers per training process)."""
    import psutil
    import torch
    from torch.utils.data import TensorDataset

    from exits.engine import TrainSettings, train

    seen: list[int] = []

    class Count:
        def loss(self, model, batch, teacher, epoch):
            me = psutil.Process()
            seen.append(len(me.children(recursive=True)) - len(me.children()))  # workers are the forkserver's children
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y), {}

    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    train(torch.nn.Linear(3, 1), data, Count(), TrainSettings(epochs=1, batch_size=4, lr=1e-2, device="cpu", num_workers=1,
                                                               max_steps=4), progress=False)
    assert seen and max(seen) == 1, seen
