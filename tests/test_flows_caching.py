"""Flow caching pieces: content fingerprints, shard files and merges, config sections, and the
cache behaviour of a real (cheap) stage flow: a changed file or setting recomputes, an
unchanged one never does, a cache hit whose outputs vanished or changed is recomputed."""
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exits.config import ConfigError, load_config
from exits.stages.pseudo_labels import encode_rle, merge_pseudo_labels, pseudo_label_table, write_pseudo_labels
from exits.stages.shards import read_shards, shard_key, shard_path, shard_ranges, write_shard
from flows.caching import ContentFingerprint, file_digest, folder_fingerprint, path_digest
from flows.runtime import config_from, make_task_runner, sections


def _bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_file_digest_follows_bytes_not_mtime(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('{"a": 1}')
    d0 = file_digest(f)
    _bump_mtime(f)
    assert file_digest(f) == d0
    f.write_text('{"a": 2}')
    assert file_digest(f) != d0
    f.write_text('{"a": 1}')
    assert file_digest(f) == d0


def test_folder_fingerprint_follows_file_list_sizes_and_mtimes(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("x.jpg", "sub/y.jpg"):
        (tmp_path / name).write_bytes(b"12345")
    f0 = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == f0
    _bump_mtime(tmp_path / "sub/y.jpg")
    f1 = folder_fingerprint(tmp_path)
    assert f1 != f0
    (tmp_path / "x.jpg").write_bytes(b"123456")
    f2 = folder_fingerprint(tmp_path)
    assert f2 not in (f0, f1)
    (tmp_path / "z.jpg").write_bytes(b"")
    assert folder_fingerprint(tmp_path) not in (f0, f1, f2)
    with pytest.raises(NotADirectoryError):
        folder_fingerprint(tmp_path / "x.jpg")


def _write_raw(folder: Path, name: bytes, data: bytes) -> None:
    """Write ``data`` to ``folder/name`` with a name given as raw bytes (maybe not UTF-8)."""
    fd = os.open(os.path.join(os.fsencode(folder), name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_fingerprints_take_a_file_name_that_is_not_utf8(tmp_path):
    """A Latin-1 name (b"caf\\xe9.png") in an image folder crashed the run's cache key."""
    (tmp_path / "a.png").write_bytes(b"1")
    _write_raw(tmp_path, b"caf\xe9.png", b"12345")
    f0 = folder_fingerprint(tmp_path)
    assert len(f0) == 32 and folder_fingerprint(str(tmp_path)) == f0 == folder_fingerprint(os.fsencode(tmp_path))
    _write_raw(tmp_path, b"caf\xe9.png", b"123456")  # changed size
    f1 = folder_fingerprint(tmp_path)
    assert f1 != f0
    _bump_mtime(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))))
    assert folder_fingerprint(tmp_path) not in (f0, f1)
    # same for the content digest of an output folder
    d0 = path_digest(tmp_path)
    assert d0 is not None and path_digest(tmp_path) == d0
    _write_raw(tmp_path, b"caf\xe9.png", b"654321")
    assert path_digest(tmp_path) != d0


def test_folder_fingerprint_of_utf8_names_is_unchanged(tmp_path):
    """Hashing names as bytes keeps the digest of UTF-8 names (existing caches stay valid)."""
    import hashlib

    (tmp_path / "é.png").write_bytes(b"abc")
    (tmp_path / "b.png").write_bytes(b"x")
    entries = sorted(f"{p.name}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}" for p in tmp_path.iterdir())
    assert folder_fingerprint(tmp_path) == hashlib.blake2b("\n".join(entries).encode(), digest_size=16).hexdigest()


def test_path_digest_of_folder_is_content_based(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.txt").write_text("one")
    d0 = path_digest(tmp_path / "r")
    _bump_mtime(tmp_path / "r" / "a.txt")
    assert path_digest(tmp_path / "r") == d0
    (tmp_path / "r" / "a.txt").write_text("two")
    assert path_digest(tmp_path / "r") != d0
    assert path_digest(tmp_path / "missing") is None


def test_content_fingerprint_policy_keys_on_named_files_only(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"aaa")
    b.write_bytes(b"bbb")
    policy = ContentFingerprint(files=("model", "shards", "points"))
    key = lambda inputs: policy.compute_key(None, inputs, {})  # noqa: E731
    k0 = key({"model": str(a), "shards": [str(a), str(b)], "points": None, "other": 1})
    assert k0 == key({"model": str(a), "shards": [str(a), str(b)], "points": None, "other": 2})  # not a file param
    assert k0 != key({"model": str(a), "shards": [str(b), str(a)], "points": None})  # order matters
    b.write_bytes(b"BBB")
    assert k0 != key({"model": str(a), "shards": [str(a), str(b)], "points": None})


def test_shard_ranges_cover_rows_once_in_order():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    assert shard_ranges(0, 4) == []
    for n, s in ((1, 1), (97, 10), (5, 100)):
        ranges = shard_ranges(n, s)
        assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
        assert all(0 < b - a <= s for a, b in ranges)
    with pytest.raises(ValueError):
        shard_ranges(3, 0)


def test_shard_files_carry_their_key_and_merge_in_order(tmp_path):
    schema = pa.schema([("ann_id", pa.int64())])
    p0, p1 = shard_path(tmp_path, "points", 0), shard_path(tmp_path, "points", 1)
    assert p1 == tmp_path / "shards" / "points-00001.parquet"
    write_shard(pa.table({"ann_id": [5, 6]}, schema=schema), p1, key="k1")
    write_shard(pa.table({"ann_id": [1, 2, 3]}, schema=schema), p0)
    assert shard_key(p1) == "k1" and shard_key(p0) is None and shard_key(tmp_path / "nope.parquet") is None
    merged = read_shards([p0, p1], schema)
    assert merged.column("ann_id").to_pylist() == [1, 2, 3, 5, 6]
    assert not merged.schema.metadata
    with pytest.raises(FileNotFoundError):
        read_shards([p0, tmp_path / "shards" / "points-00002.parquet"], schema)
    assert not list(tmp_path.rglob("*.tmp"))


def test_merged_pseudo_shards_equal_unsharded_write(tiny_coco, tmp_path):
    data = json.loads(tiny_coco.read_text())
    rows, scores, image_ids, cats = [], {}, [], []
    for k, ann in enumerate(data["annotations"]):
        m = np.zeros((48, 64), np.uint8)
        m[5 + k:20 + k, 10:30 + k] = 1
        rows.append({"ann_id": ann["id"], "rle": encode_rle(m), "area": int(m.sum())})
        scores[ann["id"]] = {"score": 0.1 * (k + 1), "certainty": 0.5, "agreement": 0.25 * k}
        image_ids.append(ann["image_id"])
        cats.append(ann["category_id"])
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    write_pseudo_labels(tiny_coco, rows, scores, whole)
    shards = []
    for i, (a, b) in enumerate(shard_ranges(len(rows), 2)):
        table = pseudo_label_table(rows[a:b], scores, image_ids[a:b], cats[a:b])
        shards.append(write_shard(table, shard_path(sharded, "pseudo", i), key=f"key{i}"))
    merge_pseudo_labels(shards, tiny_coco, sharded)
    assert (whole / "pseudo_labels.json").read_bytes() == (sharded / "pseudo_labels.json").read_bytes()
    assert pq.read_table(whole / "pseudo_labels.parquet").equals(pq.read_table(sharded / "pseudo_labels.parquet"))
    out = json.loads((sharded / "pseudo_labels.json").read_text())
    assert [a["id"] for a in out["annotations"]] == [a["id"] for a in data["annotations"]]
    assert out["annotations"][1]["score"] == pytest.approx(0.2, abs=1e-5)


def test_flows_config_section_is_validated():
    cfg = load_config("demo", ["flows.shard_size=7", "flows.task_runner=dask", "flows.max_workers=3"])
    assert (cfg.flows.shard_size, cfg.flows.task_runner, cfg.flows.max_workers) == (7, "dask", 3)
    for bad in ("flows.shard_size=0", "flows.task_runner=ray", "flows.retries=-1", "flows.nope=1"):
        with pytest.raises(ConfigError, match="flows"):
            load_config("demo", [bad])


def test_sections_keep_only_what_a_stage_reads():
    cfg = load_config("demo", ["generator.optim.epochs=3"])
    part = sections(cfg, "seed", "data")
    assert set(part) == {"seed", "data"} and part["data"]["crop_size"] == cfg.data.crop_size
    back = config_from(part)
    assert back.data == cfg.data and back.generator.optim.epochs != 3  # the rest is defaults


def test_task_runner_choice():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = make_task_runner(load_config(None, ["flows.max_workers=3"]).flows)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    local = make_task_runner(load_config(None, ["flows.task_runner=dask", "flows.max_workers=2"]).flows)
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 2
    remote = make_task_runner(load_config(None, ["flows.task_runner=dask", "flows.dask_address=tcp://10.0.0.5:8786"]).flows)
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs


@pytest.mark.prefect
def test_prepare_flow_recomputes_exactly_when_inputs_or_settings_change(tiny_coco, tmp_path):
    from flows.prepare import prepare_instances_flow

    images, work = tiny_coco.parent / "images", tmp_path / "run"
    cfg = load_config(None).model_dump(mode="json")

    def run(config=cfg) -> str:
        out = prepare_instances_flow(images=str(images), annotations=str(tiny_coco), workdir=str(work), config=config)
        assert out["summary"]["objects"] == 3
        return out["tasks"]["prepare-instances"]

    assert run() == "Completed"
    instances = work / "instances.parquet"
    first = instances.stat().st_mtime_ns
    assert run() == "Cached" and instances.stat().st_mtime_ns == first
    assert (work / ".prefect-results").is_dir() and any((work / ".prefect-results").iterdir())

    _bump_mtime(tiny_coco)  # same bytes: still a hit
    assert run() == "Cached"
    other = dict(cfg, generator=dict(cfg["generator"], lambda_crf=9.0))  # a section prepare does not read
    assert run(other) == "Cached"

    data = json.loads(tiny_coco.read_text())
    data["annotations"][0]["extreme_points"][0][0] += 1  # a changed click
    tiny_coco.write_text(json.dumps(data))
    assert run() == "Completed"
    clicked = pq.read_table(instances)
    assert clicked.column("extreme_points").to_pylist()[0][0] == data["annotations"][0]["extreme_points"][0][0]

    wider = dict(cfg, data=dict(cfg["data"], crop_margin=0.5))
    assert run(wider) == "Completed"  # a setting prepare reads
    assert pq.read_table(instances).column("crop_box").to_pylist() != clicked.column("crop_box").to_pylist()
    # Back to the earlier setting: its cache record exists, but instances.parquet now holds the
    # wider crops, so the hit is stale and recomputed (never silently returns wrong outputs).
    assert run() == "Completed"
    assert pq.read_table(instances).equals(clicked)
    assert run() == "Cached"

    _bump_mtime(images / "im1.png")  # image folders: file list + sizes + mtimes
    assert run() == "Completed"
    instances.unlink()  # a hit whose output vanished is recomputed
    assert run() == "Completed" and pq.read_table(instances).equals(clicked)
