"""The spot-fix queue (``/api/queue``) on runs of a few hundred objects: every filter
combination's pages (ids, order, totals, item fields) equal a brute-force reference that
spells out the queue's rule, on both catalog sources (Parquet columns and the json
fallback); and a queue request's memory does not grow with the number of objects.

The rule (as the page has always answered it): reviewable objects (Parquet source: those with
an instances row), worst score first (no score = unknown quality, first too), ties by id;
filters category, separated (>= 2 parts of the *pseudo* mask), min/max score (an object
without a score fails both), status from the latest decision per object in fixes.jsonl;
``total`` counts the filtered objects, ``items`` is ``[offset, offset + limit)`` of them.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from exits.data.instances_table import SCHEMA as INSTANCES_SCHEMA
from exits.eval.separated import count_parts_rle
from exits.spotfix.app import create_app
from exits.spotfix.catalog import QueueFilter, RunCatalog
from exits.spotfix.store import FixesStore, FixRecord
from exits.stages.pseudo_label_files import CATEGORIES_METADATA
from exits.stages.pseudo_labels import PSEUDO_SCHEMA, NULLABLE_COLUMNS

H, W = 12, 16
CATEGORIES = {1: "one", 2: "two", 3: "three", 7: "empty"}  # 7 has no objects
SCORES = [0.1, 0.25, 0.25, 0.5, 0.5, 0.5, 0.50001, 0.7, 0.75, 0.9, 0.99, None]  # ties, a float32-rounded one, none


class NoEditor:
    def prepare(self, ann_id: int) -> None:
        pass

    def predict(self, ann_id, clicks, prev_mask):
        raise NotImplementedError


def _mask(rng: np.random.Generator, parts: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    for k in range(parts):  # disjoint blobs of 12-28 px: a part counts from 16 px (exits.eval.separated)
        x0 = 6 * k
        y0 = int(rng.integers(0, H - 7))
        m[y0:y0 + int(rng.integers(4, 8)), x0:x0 + int(rng.integers(3, 5))] = 1
    return m


def make_queue_run(root: Path, n: int = 300, seed: int = 0, parquet: bool = True, row_group: int = 37,
                   no_instances: int = 6, null_parts: int = 5) -> tuple[Path, list[dict]]:
    """A run folder of ``n`` objects: shuffled, non-contiguous ids; scores with ties and
    gaps; 1-3 mask parts; 4 categories (one empty). ``parquet``: pseudo_labels.parquet
    (small row groups, ``null_parts`` rows without num_parts as in old shards) beside the
    json, and ``no_instances`` objects without an instances row. Returns the run folder
    and the reference rows (what each object should look like in the queue)."""
    rng = np.random.default_rng(seed)
    run, img_dir = root / "run", root / "images"
    run.mkdir(parents=True)
    img_dir.mkdir()
    n_images = 9
    ids = rng.choice(np.arange(1, 20 * n), n, replace=False).astype(int)
    anns, rows = [], []
    for k, ann_id in enumerate(ids):
        parts = int(rng.choice([1, 1, 1, 2, 3]))
        counts = mask_utils.encode(np.asfortranarray(_mask(rng, parts)))["counts"].decode()
        raw = SCORES[int(rng.integers(len(SCORES)))]
        score = None if raw is None else round(float(np.float32(raw)), 5)  # as the merge writes it
        image_id = int(rng.integers(1, n_images + 1))
        cat = int(rng.choice([1, 2, 2, 3]))
        pts = [[3.0, 0.0], [1.0, 5.0], [4.0, 11.0], [13.0, 6.0]]
        anns.append({"id": int(ann_id), "image_id": image_id, "category_id": cat, "iscrowd": 0,
                     "segmentation": {"size": [H, W], "counts": counts}, "area": 1.0, "bbox": [0, 0, 1, 1],
                     "extreme_points": pts, "score": score, "num_parts": 99})
        rows.append({"ann_id": int(ann_id), "image_id": image_id, "category_id": cat, "score": score,
                     "raw_score": raw, "parts": count_parts_rle({"size": [H, W], "counts": counts}),
                     "counts": counts, "points": pts, "reviewable": True})
    assert any(r["parts"] >= 2 for r in rows) and any(r["score"] is None for r in rows)
    images = [{"id": i, "file_name": f"im{i}.png", "width": W, "height": H} for i in range(1, n_images + 1)]
    data = {"info": {}, "images": images, "annotations": anns,
            "categories": [{"id": c, "name": name} for c, name in CATEGORIES.items()]}
    (run / "pseudo_labels.json").write_text(json.dumps(data))
    (run / "run.json").write_text(json.dumps({"images": str(img_dir), "annotations": None, "gt": None}))
    dropped = set(rng.choice(n, no_instances, replace=False).tolist()) if no_instances else set()
    inst = {name: [] for name in INSTANCES_SCHEMA.names}
    for k in rng.permutation(n):  # instances in another order than the pseudo labels
        if k in dropped:
            continue
        r = rows[k]
        for key, value in (("ann_id", r["ann_id"]), ("image_id", r["image_id"]), ("category_id", r["category_id"]),
                           ("file_name", f"im{r['image_id']}.png"), ("width", W), ("height", H),
                           ("bbox", [0.0, 0.0, 1.0, 1.0]), ("extreme_points", sum(r["points"], [])),
                           ("crop_box", [0, 0, W, H]), ("split", "train"), ("points_source", "given")):
            inst[key].append(value)
    pq.write_table(pa.table(inst, schema=INSTANCES_SCHEMA), run / "instances.parquet", row_group_size=50)
    if parquet:
        for k in dropped:
            rows[k]["reviewable"] = False  # the Parquet catalog needs the crop window of instances.parquet
        nulls = set(rng.choice(n, null_parts, replace=False).tolist()) if null_parts else set()
        cols = {name: [] for name in PSEUDO_SCHEMA.names}
        for k, r in enumerate(rows):
            for key, value in (("ann_id", r["ann_id"]), ("image_id", r["image_id"]), ("category_id", r["category_id"]),
                               ("height", H), ("width", W), ("rle_counts", r["counts"]), ("area", 1),
                               ("score", r["raw_score"]), ("certainty", 0.5), ("point_agreement", 0.5),
                               ("num_parts", None if k in nulls else r["parts"]),
                               *((name, None) for name in NULLABLE_COLUMNS)):
                cols[key].append(value)
        schema = PSEUDO_SCHEMA.with_metadata({CATEGORIES_METADATA: json.dumps(CATEGORIES).encode()})
        pq.write_table(pa.table(cols, schema=schema), run / "pseudo_labels.parquet", row_group_size=row_group)
    return run, rows


def add_decisions(run: Path, rows: list[dict], seed: int = 1) -> None:
    """Accepts, rejects, objects decided twice (the latest wins), an unknown id, and (Parquet
    source) decisions of objects that are not reviewable."""
    rng = np.random.default_rng(seed)
    store = FixesStore(run)
    rle = {"size": [H, W], "counts": mask_utils.encode(np.asfortranarray(_mask(rng, 1)))["counts"].decode()}
    picked = rng.choice(len(rows), 60, replace=False)
    for j, k in enumerate(picked):
        first = "accept" if j % 3 else "reject"
        store.append(FixRecord(ann_id=rows[k]["ann_id"], decision=first, user="t", clicks=[],
                               rle=rle if first == "accept" else None))
        if j % 5 == 0:  # decided again: the other way
            second = "reject" if first == "accept" else "accept"
            store.append(FixRecord(ann_id=rows[k]["ann_id"], decision=second, user="t", clicks=[],
                                   rle=rle if second == "accept" else None))
    store.append(FixRecord(ann_id=10**9, decision="reject", user="t", clicks=[], rle=None))
    for r in rows:
        if not r["reviewable"]:
            store.append(FixRecord(ann_id=r["ann_id"], decision="accept", user="t", clicks=[], rle=rle))


def latest_status(run: Path) -> dict[int, str]:
    """ann_id -> accepted / rejected, the last line of fixes.jsonl per object winning."""
    out: dict[int, str] = {}
    path = run / "fixes" / "fixes.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        out[int(rec["ann_id"])] = "accepted" if rec["decision"] == "accept" else "rejected"
    return out


def reference_page(rows: list[dict], status_of: dict[int, str], *, category_id=None, separated=None,
                   min_score=None, max_score=None, status="todo", offset=0, limit=500) -> dict:
    """/api/queue's answer, spelled out by brute force."""
    objs = sorted((r for r in rows if r["reviewable"]),
                  key=lambda r: (-math.inf if r["score"] is None else r["score"], r["ann_id"]))
    out = []
    for r in objs:
        st = status_of.get(r["ann_id"], "todo")
        if category_id is not None and r["category_id"] != category_id:
            continue
        if separated is not None and (r["parts"] >= 2) != separated:
            continue
        if min_score is not None and (r["score"] is None or r["score"] < min_score):
            continue
        if max_score is not None and (r["score"] is None or r["score"] > max_score):
            continue
        if not (status == "all" or st == status or (status == "decided" and st != "todo")):
            continue
        out.append({"ann_id": r["ann_id"], "image_id": r["image_id"], "category_id": r["category_id"],
                    "category": CATEGORIES[r["category_id"]], "score": r["score"], "parts": r["parts"],
                    "separated": r["parts"] >= 2, "status": st, "thumb_url": f"/api/objects/{r['ann_id']}/thumb"})
    # scope "all": these runs have no loop budget (loop/review.json), so the whole queue shows
    return {"total": len(out), "offset": offset, "scope": "all", "items": out[offset:offset + limit]}


FILTERS = {
    "category_id": [None, 1, 2, 7],
    "separated": [None, True, False],
    "score": [(None, None), (0.25, None), (None, 0.5), (0.25, 0.75), (0.5, 0.5), (0.50001, 0.9), (0.995, None),
              (0.0, 1.0)],
    "status": ["todo", "accepted", "rejected", "decided", "all"],
}
PAGES = [(None, None), (3, 7), (40, 25), (10**6, 5)]  # (offset, limit); None = the route's default


def _params(category_id, separated, score, status, offset, limit) -> dict:
    p = {"category_id": category_id, "separated": None if separated is None else str(separated).lower(),
         "min_score": score[0], "max_score": score[1], "status": status, "offset": offset, "limit": limit}
    return {k: v for k, v in p.items() if v is not None}


def _sweep(client: TestClient, run: Path, rows: list[dict], pages=PAGES) -> int:
    status_of = latest_status(run)
    checked = 0
    for cat, sep, score, status in itertools.product(*FILTERS.values()):
        for offset, limit in pages:
            params = _params(cat, sep, score, status, offset, limit)
            got = client.get("/api/queue", params=params)
            assert got.status_code == 200, (params, got.text)
            want = reference_page(rows, status_of, category_id=cat, separated=sep, min_score=score[0],
                                  max_score=score[1], status=status, offset=offset or 0, limit=limit or 500)
            assert got.json() == want, params
            checked += 1
    return checked


@pytest.mark.parametrize("parquet, scan_rows", [(True, 16), (False, None)], ids=["parquet", "json"])
def test_queue_pages_equal_the_reference_for_every_filter_combination(tmp_path: Path, monkeypatch, parquet: bool,
                                                                      scan_rows: int | None) -> None:
    from exits.spotfix import queue as queue_mod

    if scan_rows:  # a request scans the queue in several steps, as at dataset size
        monkeypatch.setattr(queue_mod, "QUEUE_SCAN_ROWS", scan_rows)
    run, rows = make_queue_run(tmp_path, parquet=parquet)
    add_decisions(run, rows)
    catalog = RunCatalog.load(run)
    assert (catalog._columns is not None) == parquet  # the source this case is about
    assert len(catalog.objects) == sum(r["reviewable"] for r in rows)
    with TestClient(create_app(run, NoEditor(), user="t", catalog=catalog)) as client:
        checked = _sweep(client, run, rows)
        assert checked == 4 * 3 * 8 * 5 * len(PAGES)
        # decisions made through the page change the next answers (the store is re-read)
        todo = client.get("/api/queue").json()["items"]
        client.post(f"/api/objects/{todo[0]['ann_id']}/decision", json={"decision": "reject"})
        client.post(f"/api/objects/{todo[1]['ann_id']}/decision", json={"decision": "accept", "rle": {
            "size": [H, W], "counts": mask_utils.encode(np.asfortranarray(np.ones((H, W), np.uint8)))["counts"].decode()}})
        _sweep(client, run, rows, pages=[(None, None), (40, 25)])


@pytest.mark.parametrize("parquet", [True, False], ids=["parquet", "json"])
def test_catalog_queue_equals_the_reference_order(tmp_path: Path, parquet: bool) -> None:
    """RunCatalog.queue (the Python API: no status) lists the same objects in the same order."""
    run, rows = make_queue_run(tmp_path, n=150, seed=3, parquet=parquet)
    catalog = RunCatalog.load(run)
    for cat, sep, score in itertools.product(*list(FILTERS.values())[:3]):
        want = reference_page(rows, {}, category_id=cat, separated=sep, min_score=score[0], max_score=score[1],
                              status="all", limit=10**9)["items"]
        got = catalog.queue(QueueFilter(cat, sep, score[0], score[1]))
        assert [o.ann_id for o in got] == [w["ann_id"] for w in want]
        assert len(got) == len(want)
        if want:
            assert got[0].ann_id == want[0]["ann_id"] and got[-1].ann_id == want[-1]["ann_id"]
            assert [o.ann_id for o in got[1:4]] == [w["ann_id"] for w in want[1:4]]
            assert (got[0].score, got[0].parts, got[0].category_id) == (
                want[0]["score"], want[0]["parts"], want[0]["category_id"])


def test_queue_objects_carry_the_files_values(tmp_path: Path) -> None:
    """Objects served from Parquet columns: RLE, extreme points, crop window, image of the files."""
    run, rows = make_queue_run(tmp_path, n=120, seed=5)
    catalog = RunCatalog.load(run)
    by_id = {r["ann_id"]: r for r in rows}
    for obj in catalog.queue(QueueFilter()):
        r = by_id[obj.ann_id]
        assert obj.rle == {"size": [H, W], "counts": r["counts"]}
        assert obj.extreme_points == tuple(tuple(p) for p in r["points"]) and obj.crop_box == (0, 0, W, H)
        assert obj.image_id == r["image_id"] and obj.parts == r["parts"] and obj.score == r["score"]
        assert catalog.objects[obj.ann_id] == obj
    missing = [r["ann_id"] for r in rows if not r["reviewable"]]
    assert missing and all(a not in catalog.objects for a in missing)
    assert catalog.objects.get(missing[0]) is None and catalog.objects.get(10**9) is None
    assert sorted(catalog.objects) == sorted(r["ann_id"] for r in rows if r["reviewable"])
    assert catalog.images[3].file_name == "im3.png" and 10**9 not in catalog.images


def _brute_force(ann, cat, score, parts, flt: QueueFilter, only=None, exclude=()) -> list[int]:
    """Queue positions by the rule, one row at a time (rows sorted by (score or -inf, id))."""
    key = [(-math.inf if math.isnan(s) else s, a, i) for i, (a, s) in enumerate(zip(ann, score))]
    rows = [i for _, _, i in sorted(key)]
    out = []
    for pos, i in enumerate(rows):
        s = None if math.isnan(score[i]) else float(score[i])
        if flt.category_id is not None and cat[i] != flt.category_id:
            continue
        if flt.separated is not None and (parts[i] >= 2) != flt.separated:
            continue
        if flt.min_score is not None and not (s is not None and s >= flt.min_score):  # NaN bounds: nothing
            continue
        if flt.max_score is not None and not (s is not None and s <= flt.max_score):
            continue
        if only is not None and int(ann[i]) not in only:
            continue
        if int(ann[i]) in exclude:
            continue
        out.append(pos)
    return out


@pytest.mark.parametrize("scan_rows", [1, 7, 64, 1 << 16])
def test_queue_index_pages_across_scan_steps_equal_brute_force(monkeypatch, scan_rows: int) -> None:
    """Scan steps smaller than the queue (page and total across step boundaries), scores
    missing or -inf (the queue's head), repeated ids, ids that match nothing."""
    from exits.spotfix import catalog as catalog_mod, queue as queue_mod

    monkeypatch.setattr(queue_mod, "QUEUE_SCAN_ROWS", scan_rows)
    rng = np.random.default_rng(7)
    n = 400
    ann = rng.integers(1, 300, n).astype(np.int64)  # repeated ids
    score = rng.choice([0.1, 0.2, 0.5, 0.9, math.nan, -math.inf, math.inf], n, p=[.3, .2, .2, .1, .1, .05, .05])
    cat = rng.integers(1, 4, n)
    parts = rng.integers(0, 4, n)
    index = catalog_mod._QueueIndex(ann, np.zeros(n, np.int64), cat, score, parts)  # rows in file order
    decided = set(rng.choice(ann, 40).tolist()) | {10**30, -5, 10**6}
    filters = [QueueFilter(c, sep, lo, hi) for c in (None, 2) for sep in (None, True, False)
               for lo, hi in ((None, None), (0.2, None), (None, 0.5), (0.2, 0.5), (-math.inf, None), (None, -math.inf),
                              (-math.inf, 0.1), (0.5, math.inf), (math.nan, None), (0.9, 0.1))]
    for flt in filters:
        for only, exclude in ((None, ()), (decided, ()), (None, decided)):
            want = _brute_force(ann, cat, score, parts, flt, only, exclude)
            for offset, limit in ((0, 500), (0, 1), (5, 13), (len(want) - 1, 5), (len(want) + 3, 5)):
                offset = max(offset, 0)
                total, rows = index.page(flt, offset, limit, only=only, exclude=exclude)
                assert (total, rows.tolist()) == (len(want), want[offset:offset + limit]), (flt, offset, limit)
        assert index.select(flt).tolist() == _brute_force(ann, cat, score, parts, flt)
    # lookups: the last file row of a repeated id; every row of an id for the status filters
    for a in np.unique(ann)[:20]:
        rows_of_a = np.flatnonzero(ann == a)
        p = index.position(int(a))
        assert p is not None and index.item(p).ann_id == a
        assert index.order[p] == rows_of_a.max()
        assert len(index.positions([int(a)])) == len(rows_of_a)
    assert index.position(10**30) is None and index.position("5") is None and index.position(True) is None
    assert index.unique == len(np.unique(ann)) and list(index.ids()) == sorted(set(ann.tolist()))


def test_a_queue_request_allocates_the_same_at_any_run_size() -> None:
    """A page request's memory: one scan step and the page, not a list of the filtered
    objects: its peak allocation is the same for 100k and 800k objects (tracemalloc sees
    numpy's buffers)."""
    import tracemalloc

    from exits.spotfix.queue import _QueueIndex

    peaks = {}
    for n in (100_000, 800_000):
        rng = np.random.default_rng(0)
        index = _QueueIndex(np.arange(n, dtype=np.int64), rng.integers(0, n // 7, n), rng.integers(1, 81, n),
                            np.round(rng.uniform(0.3, 1.0, n), 5), rng.choice([1, 1, 1, 2], n))
        decided = rng.choice(n, 1000, replace=False).tolist()
        requests = [dict(flt=QueueFilter()), dict(flt=QueueFilter(), exclude=decided),
                    dict(flt=QueueFilter(category_id=3, separated=False, min_score=0.4), exclude=decided),
                    dict(flt=QueueFilter(max_score=0.95), offset=n // 2),
                    dict(flt=QueueFilter(), only=decided)]
        peak = 0
        for req in requests:
            tracemalloc.start()
            total, rows = index.page(req["flt"], req.get("offset", 0), 500, only=req.get("only"),
                                     exclude=req.get("exclude", ()))
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert total > 0 and len(rows) == 500
        peaks[n] = peak
    # a filtered list would be >= 8 B per passing object: 6 MB at 800k
    assert peaks[800_000] < 2 * 2**20, peaks
    assert peaks[800_000] < 1.25 * peaks[100_000] + 64 * 2**10, peaks


def test_objects_of_a_listed_page_are_read_once_per_row_group(tmp_path: Path, monkeypatch) -> None:
    """The page's thumbnails ask for every listed object: one read per row group of each file."""
    from exits.spotfix import catalog as catalog_mod

    run, rows = make_queue_run(tmp_path, n=300, seed=2, row_group=37, null_parts=0)
    reads: list[tuple[str, int]] = []
    real = catalog_mod._RowReader.read
    monkeypatch.setattr(catalog_mod._RowReader, "read",
                        lambda self, group, r: reads.append((self.path.name, group)) or real(self, group, r))
    catalog = RunCatalog.load(run)
    page = catalog.page(QueueFilter(), 0, 5000)
    assert page.total == len(page.items) == sum(r["reviewable"] for r in rows)
    for item in page.items:
        assert catalog.objects[item.ann_id].ann_id == item.ann_id
    assert sorted(reads) == sorted(set(reads))  # no row group read twice
    assert {name for name, _ in reads} == {"pseudo_labels.parquet", "instances.parquet"}
    assert len(reads) <= math.ceil(300 / 37) + math.ceil(300 / 50)
    reads.clear()
    for item in page.items[:50]:  # asked again (thumbnail, then the object itself): from the cache
        catalog.pseudo_mask(item.ann_id)
    assert reads == []


def test_the_app_answers_the_same_from_parquet_columns_as_from_the_json(tmp_path: Path) -> None:
    """Object detail, thumbnail, history and queue of the spot-fix fixture run, once read from
    its json and once from Parquet columns written for it."""
    from tests.spotfix_fixtures import make_run

    run = make_run(tmp_path)
    answers = {}
    for source in ("json", "parquet"):
        if source == "parquet":
            data = json.loads((run / "pseudo_labels.json").read_text())
            cols = {name: [] for name in PSEUDO_SCHEMA.names}
            for a in data["annotations"]:
                seg = a["segmentation"]
                for key, value in (("ann_id", a["id"]), ("image_id", a["image_id"]),
                                   ("category_id", a["category_id"]), ("height", seg["size"][0]),
                                   ("width", seg["size"][1]), ("rle_counts", seg["counts"]), ("area", int(a["area"])),
                                   ("score", a["score"]), ("certainty", 0.5), ("point_agreement", 0.5),
                                   ("num_parts", count_parts_rle(seg)), *((name, None) for name in NULLABLE_COLUMNS)):
                    cols[key].append(value)
            names = {c["id"]: c["name"] for c in data["categories"]}
            schema = PSEUDO_SCHEMA.with_metadata({CATEGORIES_METADATA: json.dumps(names).encode()})
            pq.write_table(pa.table(cols, schema=schema), run / "pseudo_labels.parquet", row_group_size=3)
        catalog = RunCatalog.load(run)
        assert (catalog._columns is not None) == (source == "parquet")
        with TestClient(create_app(run, NoEditor(), user="t", catalog=catalog)) as client:
            got = {"queue": client.get("/api/queue", params={"status": "all"}).json(),
                   "meta": client.get("/api/meta").json()}
            for ann_id in (1, 2, 3, 4):
                got[f"detail{ann_id}"] = client.get(f"/api/objects/{ann_id}").json()
                got[f"thumb{ann_id}"] = client.get(f"/api/objects/{ann_id}/thumb").content
            got["missing"] = client.get("/api/objects/99").status_code
        answers[source] = got
    assert answers["parquet"] == answers["json"]
    assert answers["json"]["missing"] == 404 and [i["ann_id"] for i in answers["json"]["queue"]["items"]] == [1, 3, 4, 2]


def test_the_server_over_parquet_columns_does_not_import_torch(tmp_path: Path) -> None:
    """The spot-fix app, its catalog from Parquet columns and the GrabCut editor need no torch
    (~0.7 GB of the serving process's memory when imported)."""
    import subprocess
    import sys

    run, _ = make_queue_run(tmp_path, n=40, seed=4, null_parts=0)
    code = ("import sys; from exits.spotfix.app import create_app; from exits.spotfix.catalog import QueueFilter, "
            "RunCatalog; from exits.spotfix.editors import GrabCutEditor; "
            f"c = RunCatalog.load({str(run)!r}); create_app({str(run)!r}, GrabCutEditor(c), catalog=c); "
            "p = c.page(QueueFilter()); c.pseudo_mask(p.items[0].ann_id); "
            "assert c._columns is not None; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
