"""Fixes store (append-only, atomic across threads and processes) and the export merge."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from exits.run_folder import RunFolder
from exits.spotfix.export import FIXED_JSON, merge_fixes, run_export
from exits.spotfix.store import FixesStore, FixRecord, RevisionConflict
from tests.spotfix_fixtures import H, W, make_run, rle_of

REPO = Path(__file__).resolve().parents[1]


def _big_rle(seed: int) -> dict:
    """A noisy mask whose RLE is several KiB: one line longer than PIPE_BUF (4096 B), so
    unlocked appends could interleave."""
    rng = np.random.default_rng(seed)
    return rle_of(rng.random((2 * H, 2 * W)) < 0.5)  # the store does not check sizes


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from exits.spotfix.store import FixesStore, FixRecord
    import json
    workdir, tag, n, rle = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    store = FixesStore(workdir)
    for i in range(n):
        store.append(FixRecord(ann_id=i % 7, decision="accept", user=f"{{tag}}:{{i}}", clicks=[[i, i, True]], rle=rle))
""")


def test_interleaved_appends_from_processes_and_threads_all_intact(tmp_path: Path) -> None:
    n = 60
    rle = _big_rle(0)
    assert len(json.dumps(rle)) > 4096
    script = WRITER.format(repo=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"proc{k}", str(n), json.dumps(rle)])
             for k in range(2)]

    def thread_writer(tag: str) -> None:
        store = FixesStore(tmp_path)  # own instance = own file handle, like another tab's request
        for i in range(n):
            store.append(FixRecord(ann_id=i % 7, decision="reject" if i % 2 else "accept", user=f"{tag}:{i}",
                                   clicks=[], rle=None if i % 2 else rle))

    threads = [threading.Thread(target=thread_writer, args=(f"thread{k}",)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]

    raw = (tmp_path / "fixes" / "fixes.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.splitlines()
    assert len(lines) == 4 * n
    records = [FixRecord.from_dict(json.loads(line)) for line in lines]  # every line is whole JSON
    assert len({r.record_id for r in records}) == 4 * n
    for tag in ("proc0", "proc1", "thread0", "thread1"):
        seq = [int(r.user.split(":")[1]) for r in records if r.user.split(":")[0] == tag]
        assert seq == list(range(n))  # each writer's records in its own order, none lost
    for r in records:
        if r.decision == "accept":
            assert r.rle == rle
    # A fresh reader indexes the same: latest per object = the last line for that object.
    store = FixesStore(tmp_path)
    last = {r.ann_id: r for r in records}
    assert {a: r.record_id for a, r in store.latest().items()} == {a: r.record_id for a, r in last.items()}
    assert store.latest_for(3)[1] == sum(r.ann_id == 3 for r in records)


def test_latest_decision_wins_and_revisions(tmp_path: Path) -> None:
    store = FixesStore(tmp_path)
    m1, m2 = np.zeros((H, W), bool), np.zeros((H, W), bool)
    m1[0:5, 0:5] = True
    m2[10:12, 10:20] = True
    assert store.append(FixRecord(5, "accept", "ann", [[1, 1, True]], rle_of(m1))) == 1
    assert store.append(FixRecord(5, "reject", "bob", [], None), expect_revision=1) == 2
    assert store.append(FixRecord(6, "reject", "bob", [], None)) == 1
    assert store.append(FixRecord(5, "accept", "cy", [[11, 10, True], [3, 3, False]], rle_of(m2)), expect_revision=2) == 3
    latest = FixesStore(tmp_path).latest()  # another process's view
    assert latest[5].user == "cy" and latest[5].decision == "accept" and latest[5].rle == rle_of(m2)
    assert latest[5].clicks == [[11, 10, True], [3, 3, False]]
    assert latest[6].decision == "reject"
    rec, revision = store.latest_for(5)
    assert revision == 3 and rec.user == "cy"
    assert store.latest_for(99) == (None, 0)


def test_revision_conflict_writes_nothing(tmp_path: Path) -> None:
    store = FixesStore(tmp_path)
    store.append(FixRecord(1, "reject", "a", [], None))
    before = store.path.read_bytes()
    other_tab = FixesStore(tmp_path)
    with pytest.raises(RevisionConflict, match="changed elsewhere"):
        other_tab.append(FixRecord(1, "reject", "b", [], None), expect_revision=0)
    assert store.path.read_bytes() == before


def test_torn_tail_is_skipped_and_kept_and_the_next_record_starts_a_fresh_line(tmp_path: Path) -> None:
    store = FixesStore(tmp_path)
    store.append(FixRecord(1, "reject", "a", [], None))
    with open(store.path, "ab") as fh:  # what a writer killed mid-write could leave
        fh.write(b'{"ann_id": 2, "decision": "acc')
    reader = FixesStore(tmp_path)
    assert [r.ann_id for r in reader.records()] == [1]
    store.append(FixRecord(3, "reject", "a", [], None))
    lines = store.path.read_bytes().splitlines()
    assert lines[1] == b'{"ann_id": 2, "decision": "acc'  # never dropped: the file is only appended to
    assert len(lines) == 3 and [json.loads(lines[k])["ann_id"] for k in (0, 2)] == [1, 3]
    assert [r.ann_id for r in reader.records()] == [1, 3]
    assert reader.skipped_lines == [2]


def test_corrupt_record_is_skipped_not_an_error(tmp_path: Path) -> None:
    store = FixesStore(tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b'{"ann_id": 1}\n')
    assert store.records() == [] and store.skipped_lines == [1]


def test_record_validation() -> None:
    with pytest.raises(ValueError, match="carries its mask"):
        FixRecord(1, "accept", "a", [], None)
    with pytest.raises(ValueError, match="carries its mask"):
        FixRecord(1, "reject", "a", [], {"size": [1, 1], "counts": "01"})
    with pytest.raises(ValueError, match="decision"):
        FixRecord(1, "maybe", "a", [], None)  # type: ignore[arg-type]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_export_merges_fixes(run: Path) -> None:
    src = json.loads((run / "pseudo_labels.json").read_text())
    store = FixesStore(run)
    fix = np.zeros((H, W), bool)
    fix[7:17, 5:25] = True  # 10 x 20 = 200 px, bbox [5, 7, 20, 10]
    fix[40:42, 60:63] = True  # second part: 6 px
    wrong = np.zeros((H + 1, W), bool)
    wrong[0, 0] = True
    store.append(FixRecord(1, "reject", "a", [], None))
    store.append(FixRecord(1, "accept", "a", [[6, 8, True]], rle_of(fix)))  # latest wins over the reject
    store.append(FixRecord(3, "accept", "a", [], rle_of(fix)))
    store.append(FixRecord(3, "reject", "b", [], None))  # latest wins: removed
    store.append(FixRecord(4, "accept", "a", [], rle_of(wrong)))  # wrong size: ignored, unchanged
    store.append(FixRecord(77, "reject", "a", [], None))  # not in the pseudo labels

    result = run_export(run)
    assert result.path == run / FIXED_JSON
    c = result.counts
    assert (c.objects_in, c.accepted, c.rejected, c.unchanged, c.objects_out) == (4, 1, 1, 2, 3)
    assert (c.unknown_ids, c.invalid, c.records) == (1, 1, 6)

    out = json.loads(result.path.read_text())
    anns = {a["id"]: a for a in out["annotations"]}
    assert sorted(anns) == [1, 2, 4]
    a1 = anns[1]
    assert a1["area"] == 206.0 and a1["bbox"] == [5.0, 7.0, 58.0, 35.0]
    assert a1["fixed"] is True and a1["score"] == 1.0 and a1["pseudo_score"] == 0.30
    assert a1["num_parts"] == 1  # 6 px part is below the 16 px part floor
    assert np.array_equal(mask_utils.decode(a1["segmentation"]).astype(bool), fix)
    src_anns = {a["id"]: a for a in src["annotations"]}
    assert anns[2] == src_anns[2] and anns[4] == src_anns[4]  # untouched objects unchanged
    assert out["images"] == src["images"] and out["categories"] == src["categories"]
    assert out["info"]["spotfix"]["counts"]["accepted"] == 1
    assert json.loads((run / "pseudo_labels.json").read_text()) == src  # the source is never modified


def test_merge_is_pure_and_empty_store_exports_a_copy(run: Path) -> None:
    src = json.loads((run / "pseudo_labels.json").read_text())
    merged, counts = merge_fixes(src, {})
    assert merged["annotations"] == src["annotations"] and merged["annotations"] is not src["annotations"]
    assert (counts.accepted, counts.rejected, counts.unchanged) == (0, 0, 4)
    out = json.loads(run_export(run).path.read_text())
    assert out["annotations"] == src["annotations"]


def test_export_file_is_written_atomically(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FixesStore(run).append(FixRecord(2, "reject", "a", [], None))
    path = run_export(run).path
    before = path.read_bytes()
    FixesStore(run).append(FixRecord(4, "reject", "a", [], None))

    real_dumps = json.dumps

    def dumps_then_crash(obj, *args, **kw) -> str:
        # the export streams: the file already holds its head when an annotation fails
        if isinstance(obj, dict) and "segmentation" in obj:
            raise RuntimeError("disk full")
        return real_dumps(obj, *args, **kw)

    monkeypatch.setattr(json, "dumps", dumps_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        run_export(run)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the previous export is intact
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temp debris
    assert len(json.loads(run_export(run).path.read_text())["annotations"]) == 2


def test_training_labels_path_prefers_a_current_merge(run: Path) -> None:
    assert RunFolder(run).training_labels() == run / "pseudo_labels.json"
    FixesStore(run).append(FixRecord(2, "reject", "a", [], None))
    run_export(run)
    assert RunFolder(run).training_labels() == run / FIXED_JSON
    data = json.loads((run / "pseudo_labels.json").read_text())
    data["annotations"][0]["score"] = 0.31  # stage 1 re-run after the export
    (run / "pseudo_labels.json").write_text(json.dumps(data))
    assert RunFolder(run).training_labels() == run / "pseudo_labels.json"
