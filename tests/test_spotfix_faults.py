"""Faults around the spot-fix page and `exits export`: corrupt lines in fixes.jsonl, a full
or read-only disk when a decision is written, loopback aliases as --host, image files
outside the image folder / missing / corrupt, and the export's temporary files."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from exits.spotfix.app import create_app
from exits.spotfix.catalog import RunCatalog
from exits.spotfix.commands import export_command, spotfix_command
from exits.spotfix.editors import GrabCutEditor
from exits.spotfix.export import run_export
from exits.spotfix.store import FixesStore, FixRecord
from tests.spotfix_fixtures import H, W, make_run, rle_of
from tests.test_spotfix_api import RecordingEditor

STATIC = Path(__file__).resolve().parents[1] / "exits" / "spotfix" / "static"
def _modes_enforced() -> bool:
    """Whether a chmod 555 folder refuses new files (not for root with CAP_DAC_OVERRIDE)."""
    import tempfile

    if os.geteuid() != 0:
        return True
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o555)
        try:
            Path(d, "probe").touch()
        except PermissionError:
            return True
        finally:
            os.chmod(d, 0o755)
    return False


MODES_ENFORCED = _modes_enforced()
ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"
EROFS_TEXT = os.strerror(errno.EROFS)  # "Read-only file system"
EACCES_TEXT = os.strerror(errno.EACCES)  # "Permission denied"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def fixes_path(run: Path) -> Path:
    return run / "fixes" / "fixes.jsonl"


def square(y0: int = 20, x0: int = 10, n: int = 10) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y0 + n, x0:x0 + n] = True
    return m


def line_of(ann_id: int, decision: str = "reject", user: str = "a") -> bytes:
    rle = rle_of(square()) if decision == "accept" else None
    return FixRecord(ann_id, decision, user, [[12, 22, True]] if rle else [], rle).to_line()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def fail_writes_to(name: str, exc_errno: int, monkeypatch: pytest.MonkeyPatch, after_bytes: int | None = None) -> list[int]:
    """os.write raises OSError(exc_errno) for file descriptors of files called ``name``;
    with ``after_bytes``, the first call writes that many bytes first (a short write, as a
    filling disk gives). Returns a list that collects the sizes attempted."""
    real_write = os.write
    attempts: list[int] = []

    def write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.endswith(name):
            return real_write(fd, data)
        attempts.append(len(data))
        if after_bytes is not None and len(attempts) == 1:
            return real_write(fd, bytes(data[:after_bytes]))
        raise OSError(exc_errno, os.strerror(exc_errno))

    monkeypatch.setattr(os, "write", write)
    return attempts


# ---- 1. corrupt lines in fixes.jsonl -----------------------------------------------------

CORRUPT_LINES = {
    "half-written": b'{"ann_id": 2, "decision": "acc',
    "not json": b"this is not json",
    "json array": b"[1, 2, 3]",
    "json number": b"42",
    "json null": b"null",
    "object of something else": b'{"hello": "world"}',
    "ann_id not a number": b'{"ann_id": "x", "decision": "reject", "user": "a", "clicks": [], "rle": null, "time": "t"}',
    "unknown decision": b'{"ann_id": 2, "decision": "maybe", "user": "a", "clicks": [], "rle": null, "time": "t"}',
    "accept without mask": b'{"ann_id": 2, "decision": "accept", "user": "a", "clicks": [], "rle": null, "time": "t"}',
    "mask not an rle": b'{"ann_id": 2, "decision": "accept", "user": "a", "clicks": [], "rle": "abc", "time": "t"}',
    "clicks not a list": b'{"ann_id": 2, "decision": "reject", "user": "a", "clicks": 5, "rle": null, "time": "t"}',
    "not utf-8": b'{"ann_id": 2, "user": "\xff\xfe"}',
}


@pytest.mark.parametrize("bad", CORRUPT_LINES.values(), ids=CORRUPT_LINES.keys())
def test_store_skips_a_corrupt_line_names_it_and_keeps_it(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         bad: bytes) -> None:
    path = fixes_path(tmp_path)
    path.parent.mkdir()
    before = line_of(1) + bad + b"\n" + line_of(3, "accept")
    path.write_bytes(before)
    store = FixesStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="exits.spotfix.store"):
        assert [r.ann_id for r in store.records()] == [1, 3]
        assert sorted(store.latest()) == [1, 3] and store.latest_for(3)[1] == 1
    warned = warnings_of(caplog)
    assert len(warned) == 1 and f"{path} line 2: skipped a corrupt fix record" in warned[0]  # once, not per read
    assert store.skipped_lines == [2]
    assert store.append(FixRecord(1, "accept", "b", [], rle_of(square()))) == 2  # appends keep working
    raw = path.read_bytes()
    assert raw.startswith(before) and raw.count(b"\n") == 4  # the bad line is still there, untouched
    assert [r.ann_id for r in FixesStore(tmp_path).records()] == [1, 3, 1]


def test_every_route_serves_the_good_records_around_a_corrupt_line(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = fixes_path(run)
    path.parent.mkdir()
    path.write_bytes(line_of(4) + b'{"ann_id": 2, "decis\n' + b'{"what": 1}\n' + line_of(1, "accept"))
    with caplog.at_level(logging.WARNING), TestClient(create_app(run, RecordingEditor(), user="t")) as c:
        assert c.get("/api/meta").json()["counts"] == {"objects": 4, "accepted": 1, "rejected": 1}
        q = c.get("/api/queue", params={"status": "all"}).json()
        assert {i["ann_id"]: i["status"] for i in q["items"]} == {1: "accepted", 2: "todo", 3: "todo", 4: "rejected"}
        d = c.get("/api/objects/1").json()
        assert d["base"] == "fix" and d["revision"] == 1 and d["mask"]["area"] == 100
        assert c.get("/api/objects/2").json()["revision"] == 0
        assert [h["decision"] for h in c.get("/api/objects/1/history").json()["records"]] == ["accept"]
        assert c.get("/api/objects/1/thumb").status_code == 200
        r = c.post("/api/objects/2/decision", json={"decision": "reject", "revision": 0})
        assert r.status_code == 200 and r.json()["revision"] == 1
    assert sum(f"{path} line 2: skipped" in m for m in warnings_of(caplog)) == 1
    assert sum(f"{path} line 3: skipped" in m for m in warnings_of(caplog)) == 1
    assert path.read_bytes().splitlines()[1:3] == [b'{"ann_id": 2, "decis', b'{"what": 1}']


def test_a_fix_whose_mask_does_not_fit_the_image_falls_back_to_the_pseudo_mask(run: Path) -> None:
    path = fixes_path(run)
    path.parent.mkdir()
    wrong = np.zeros((H + 3, W), bool)
    wrong[0:4, 0:4] = True
    path.write_bytes(FixRecord(1, "accept", "a", [], rle_of(wrong)).to_line())  # a hand edit
    with TestClient(create_app(run, RecordingEditor())) as c:
        d = c.get("/api/objects/1").json()
        assert d["base"] == "pseudo" and d["mask"]["area"] == int(RunCatalog.load(run).pseudo_mask(1).sum())
        assert c.get("/api/objects/1/thumb").status_code == 200


def test_append_after_a_last_line_without_newline_starts_a_fresh_line(tmp_path: Path) -> None:
    path = fixes_path(tmp_path)
    path.parent.mkdir()
    path.write_bytes(line_of(1) + line_of(2, "accept").rstrip(b"\n"))  # an editor dropped the final newline
    reader = FixesStore(tmp_path)
    assert [r.ann_id for r in reader.records()] == [1, 2]  # nobody is writing: the last line is whole
    FixesStore(tmp_path).append(FixRecord(3, "reject", "b", [], None))
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["ann_id"] for x in lines] == [1, 2, 3]
    assert [r.ann_id for r in reader.records()] == [1, 2, 3]  # the incremental reader agrees
    assert [r.ann_id for r in FixesStore(tmp_path).records()] == [1, 2, 3]


def test_torn_last_line_is_kept_and_the_next_record_is_not_glued_onto_it(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = fixes_path(tmp_path)
    path.parent.mkdir()
    torn = b'{"ann_id": 2, "decision": "acc'
    path.write_bytes(line_of(1) + torn)  # a power cut mid-write
    store = FixesStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="exits.spotfix.store"):
        assert store.append(FixRecord(3, "reject", "b", [], None)) == 1
        assert [r.ann_id for r in store.records()] == [1, 3]
    assert path.read_bytes().splitlines()[1] == torn
    assert [json.loads(x)["ann_id"] for x in path.read_bytes().splitlines()[::2]] == [1, 3]
    assert any(f"{path} line 2: skipped" in m for m in warnings_of(caplog))


def test_export_skips_corrupt_lines_with_the_same_warning_and_counts_them(run: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    import typer

    path = fixes_path(run)
    path.parent.mkdir()
    path.write_bytes(line_of(2) + b"garbage\n" + line_of(1, "accept") + b'{"ann_id": 4, "dec')
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("noop")(lambda: None)
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(app, ["export", "--workdir", str(run)])
    assert r.exit_code == 0, r.output
    assert "skipped_lines: 2" in r.output and "rejected: 1" in r.output and "accepted: 1" in r.output
    warned = warnings_of(caplog)
    assert any(f"{path} line 2: skipped a corrupt fix record" in m for m in warned)
    assert any(f"{path} line 4: skipped a corrupt fix record" in m for m in warned)
    out = json.loads((run / "pseudo_labels_fixed.json").read_text())
    assert sorted(a["id"] for a in out["annotations"]) == [1, 3, 4]
    assert out["info"]["spotfix"]["counts"]["skipped_lines"] == 2
    assert path.read_bytes().endswith(b'{"ann_id": 4, "dec')  # export never rewrites the fixes


# ---- 2. full / read-only disk when a decision is written --------------------------------

def test_decision_on_a_full_disk_is_a_507_json_error_and_nothing_is_written(run: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = fixes_path(run)
    with TestClient(create_app(run, RecordingEditor())) as c:
        assert c.post("/api/objects/4/decision", json={"decision": "reject"}).status_code == 200
        before = path.read_bytes()
        attempts = fail_writes_to("fixes.jsonl", errno.ENOSPC, monkeypatch)
        body = {"decision": "accept", "rle": rle_of(square()), "revision": 0,
                "clicks": [{"x": 12, "y": 22, "positive": True}]}
        r = c.post("/api/objects/1/decision", json=body)
        assert attempts  # the write was attempted
        assert r.status_code == 507
        err = r.json()
        assert err["saved"] is False and err["errno"] == "ENOSPC"
        assert err["detail"] == err["error"]
        assert f"could not save the fix of object 1: {path}: {ENOSPC_TEXT}" in err["detail"]
        assert path.read_bytes() == before
        assert c.get("/api/objects/1").json()["status"] == "todo"
        monkeypatch.undo()  # space freed: the same request now succeeds
        r = c.post("/api/objects/1/decision", json=body)
        assert r.status_code == 200 and r.json()["revision"] == 1
    assert [x.ann_id for x in FixesStore(run).records()] == [4, 1]


def test_a_short_write_on_a_filling_disk_is_taken_back(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fixes_path(run)
    store = FixesStore(run)
    store.append(FixRecord(4, "reject", "a", [], None))
    before = path.read_bytes()
    attempts = fail_writes_to("fixes.jsonl", errno.ENOSPC, monkeypatch, after_bytes=25)
    with pytest.raises(OSError) as info:
        store.append(FixRecord(1, "accept", "a", [], rle_of(square())))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert len(attempts) == 2  # 25 bytes went in, then the rest failed
    assert path.read_bytes() == before  # the 25 bytes were cut off again
    monkeypatch.undo()
    assert store.append(FixRecord(1, "reject", "a", [], None)) == 1
    assert [r.ann_id for r in FixesStore(run).records()] == [4, 1]


def test_a_partial_line_that_cannot_be_taken_back_does_not_corrupt_later_reads(
        run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = fixes_path(run)
    store = FixesStore(run)
    store.append(FixRecord(4, "reject", "a", [], None))
    fail_writes_to("fixes.jsonl", errno.ENOSPC, monkeypatch, after_bytes=25)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(OSError):
        store.append(FixRecord(1, "accept", "a", [], rle_of(square())))
    monkeypatch.undo()
    assert len(path.read_bytes().splitlines()) == 2  # the debris is there
    with caplog.at_level(logging.WARNING, logger="exits.spotfix.store"):
        assert store.append(FixRecord(2, "reject", "a", [], None)) == 1
        assert [r.ann_id for r in FixesStore(run).records()] == [4, 2]
    assert any(f"{path} line 2: skipped" in m for m in warnings_of(caplog))


@pytest.mark.parametrize("err, status, text", [(errno.EROFS, 503, EROFS_TEXT), (errno.EACCES, 503, EACCES_TEXT),
                                               (errno.EIO, 500, os.strerror(errno.EIO))])
def test_decision_in_a_read_only_run_folder_is_a_json_error(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                            err: int, status: int, text: str) -> None:
    path = fixes_path(run)
    real_open = os.open

    def open_(file, flags, *args, **kw):
        if str(file).endswith("fixes.jsonl") and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(err, os.strerror(err), str(file))
        return real_open(file, flags, *args, **kw)

    with TestClient(create_app(run, RecordingEditor())) as c:
        monkeypatch.setattr(os, "open", open_)
        r = c.post("/api/objects/1/decision", json={"decision": "reject"})
        assert r.status_code == status
        assert r.json()["saved"] is False and r.json()["errno"] == errno.errorcode[err]
        assert f"could not save the fix of object 1: {path}: {text}" in r.json()["detail"]
        assert c.get("/api/meta").status_code == 200  # reading still works


@pytest.mark.skipif(not MODES_ENFORCED, reason="file modes are not enforced (root): the monkeypatched variant covers this")
def test_decision_in_a_chmod_read_only_run_folder_is_a_json_error(run: Path) -> None:
    os.chmod(run, 0o555)
    try:
        with TestClient(create_app(run, RecordingEditor())) as c:
            r = c.post("/api/objects/1/decision", json={"decision": "reject"})
            assert r.status_code == 503 and r.json()["saved"] is False
            assert f"{run / 'fixes'}: {EACCES_TEXT}" in r.json()["detail"]
            assert c.get("/api/queue").status_code == 200
    finally:
        os.chmod(run, 0o755)


def test_fsync_failure_is_reported_and_the_line_taken_back(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fixes_path(run)
    with TestClient(create_app(run, RecordingEditor())) as c:
        c.post("/api/objects/4/decision", json={"decision": "reject"})
        before = path.read_bytes()
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith("fixes.jsonl"):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        r = c.post("/api/objects/1/decision", json={"decision": "reject"})
        assert r.status_code == 500 and r.json()["errno"] == "EIO"
        assert f"{path}: {os.strerror(errno.EIO)}" in r.json()["detail"]
        assert path.read_bytes() == before


def test_reading_routes_answer_json_with_the_path_on_os_errors(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fixes_path(run)
    FixesStore(run).append(FixRecord(4, "reject", "a", [], None))
    real_open = os.open

    def open_(file, flags, *args, **kw):
        if str(file).endswith("fixes.jsonl"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, flags, *args, **kw)

    with TestClient(create_app(run, RecordingEditor())) as c:
        monkeypatch.setattr(os, "open", open_)
        for url in ("/api/meta", "/api/queue", "/api/objects/1", "/api/objects/1/history", "/api/objects/1/thumb"):
            r = c.get(url)
            assert r.status_code == 503, url
            assert r.headers["content-type"] == "application/json", url
            assert r.json()["errno"] == "EACCES" and f"{path}: {EACCES_TEXT}" in r.json()["detail"], url


NODE_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const fx = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
const els = {};
const ctx2d = new Proxy({}, { get: (t, k) => (k in t ? t[k] : () => {}), set: (t, k, v) => { t[k] = v; return true; } });
class El {
  constructor(tag) {
    this.tagName = (tag || "div").toUpperCase(); this.children = []; this.className = "";
    this.dataset = new Proxy({}, { set: (t, k, v) => { t[k] = String(v); return true; } });  // DOM strings
    this.textContent = ""; this.value = ""; this.checked = true; this.width = 720; this.height = 540;
    const self = this;
    this.classList = {
      toggle(n, f) { const s = new Set(self.className.split(" ").filter(Boolean)); const on = f === undefined ? !s.has(n) : f;
        if (on) s.add(n); else s.delete(n); self.className = [...s].join(" "); },
      add(n) { this.toggle(n, true); }, remove(n) { this.toggle(n, false); },
      contains(n) { return self.className.split(" ").includes(n); },
    };
  }
  append(...c) { this.children.push(...c); }
  replaceChildren(...c) { this.children = c; }
  addEventListener() {}
  querySelector(sel) {
    const stack = [...this.children];
    while (stack.length) { const c = stack.shift(); if (c instanceof El) {
      if (c.className.split(" ").includes(sel.slice(1))) return c; stack.push(...c.children); } }
    return null;
  }
  getContext() { return ctx2d; }
  getBoundingClientRect() { return { left: 0, top: 0, width: 720, height: 540 }; }
}
class FakeImage { set src(v) { this._src = v; setTimeout(() => this.onload && this.onload(), 0); } get src() { return this._src; } }
class FakeURL extends URL { static createObjectURL() { return "blob:fake"; } }
let mode = "fail";
const posts = [];
function respond(status, body) {
  return { ok: status < 400, status, statusText: String(status), json: async () => body, blob: async () => ({}) };
}
async function fetch(path, opts) {
  const p = String(path);
  if (opts && opts.method === "POST" && p.endsWith("/decision")) {
    posts.push(JSON.parse(opts.body));
    if (mode === "fail") return respond(fx.error.status, fx.error.body);
    return respond(200, { ann_id: 1, revision: 1, status: "accepted", record_id: "r", time: "t", user: "u" });
  }
  if (opts && opts.method === "POST") return respond(202, {});
  if (p.startsWith("/api/meta")) return respond(200, fx.meta);
  if (p.startsWith("/api/queue")) return respond(200, fx.queue);
  const m = p.match(/^\/api\/objects\/(\d+)$/);
  if (m) return respond(200, fx.objects[m[1]]);
  return respond(200, {});
}
const sandbox = {
  console, setTimeout, clearTimeout, fetch, Image: FakeImage, URL: FakeURL, URLSearchParams, Option: El, Promise,
  location: { href: "http://127.0.0.1:8765/" }, history: { replaceState() {} },
  sessionStorage: { getItem() { return null; }, setItem() {} }, localStorage: { getItem() { return null; }, setItem() {} },
  addEventListener() {},
  document: { getElementById: (id) => (els[id] = els[id] || new El("div")), createElement: (t) => new El(t),
              addEventListener() {}, body: { dataset: {} } },
};
sandbox.window = sandbox;
vm.createContext(sandbox);
const until = async (f) => { for (let i = 0; i < 400 && !f(); i++) await new Promise((r) => setTimeout(r, 5)); };
function snap() {
  const s = sandbox.spotfix, cur = s.history[s.history.length - 1];
  return { annId: s.obj.ann_id, clicks: s.clicks, historyLen: s.history.length, maskArea: cur.mask.area,
           status: els.status.textContent, statusClass: els.status.className, queueStatus: s.queue[0].status,
           liClass: els.queue.children[0].className, unsaved: els.view.dataset.unsaved || "" };
}
(async () => {
  vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), sandbox);
  await until(() => sandbox.document.body.dataset.ready === "1");
  const s = sandbox.spotfix;
  await sandbox.openAt(0);
  // two clicks answered by the editor: the mask the person wants to keep
  s.clicks = [[40, 30, true], [41, 30, false]];
  s.history.push({ clicks: s.clicks.slice(), mask: { rle: fx.edited, png: "data:", area: 123 }, maskImg: {} });
  const out = {};
  await sandbox.decide("accept");
  out.failed = snap();
  await sandbox.openAt(1);  // moving on would lose the unsaved fix: the first press only warns
  out.navigated = snap();
  mode = "ok";
  await sandbox.decide("accept");  // retry
  out.saved = snap();
  out.posts = posts;
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_keeps_an_unsaved_fix_and_says_it_was_not_saved(run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """app.js (run by node against a stub DOM) on the API's real disk-full answer: the mask
    and clicks stay, the object is not marked decided, the message says 'not saved', and
    pressing accept again sends the same fix."""
    edited = rle_of(square())
    with TestClient(create_app(run, RecordingEditor())) as c:
        fixtures = {"meta": c.get("/api/meta").json(), "queue": c.get("/api/queue").json(),
                    "objects": {str(a): c.get(f"/api/objects/{a}").json() for a in (1, 3)}, "edited": edited}
        fail_writes_to("fixes.jsonl", errno.ENOSPC, monkeypatch)
        r = c.post("/api/objects/1/decision", json={"decision": "accept", "rle": edited})
        monkeypatch.undo()
    assert r.status_code == 507
    fixtures["error"] = {"status": r.status_code, "body": r.json()}
    (tmp_path / "fx.json").write_text(json.dumps(fixtures))
    (tmp_path / "harness.js").write_text(NODE_HARNESS)
    proc = subprocess.run(["node", str(tmp_path / "harness.js"), str(STATIC / "app.js"), str(tmp_path / "fx.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = out["failed"]
    assert failed["annId"] == 1 and failed["clicks"] == [[40, 30, True], [41, 30, False]]
    assert failed["historyLen"] == 2 and failed["maskArea"] == 123  # the edited mask is still the current one
    assert "not saved" in failed["status"].lower() and ENOSPC_TEXT in failed["status"]
    assert "again" in failed["status"]  # says how to retry
    assert failed["statusClass"] == "error" and failed["unsaved"] == "accept"
    assert failed["queueStatus"] == "todo" and "accepted" not in failed["liClass"] and "unsaved" in failed["liClass"]
    nav = out["navigated"]
    assert nav["annId"] == 1 and nav["historyLen"] == 2 and "not saved" in nav["status"].lower()
    saved = out["saved"]
    assert saved["annId"] == 3  # saved, so the page moved on to the next object
    assert saved["queueStatus"] == "accepted" and "accepted" in saved["liClass"] and saved["unsaved"] == ""
    assert len(out["posts"]) == 2 and out["posts"][0] == out["posts"][1]  # the retry sends the same fix
    assert out["posts"][1]["rle"] == edited and len(out["posts"][1]["clicks"]) == 2


# ---- 3. loopback aliases as --host ---------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.2", "127.5.6.7", "::1", "localhost", "127.0.0.1"])
def test_a_loopback_bind_accepts_its_own_host_header_and_refuses_foreign_ones(
        run: Path, monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    import typer
    import uvicorn

    monkeypatch.delenv("EXITS_SPOTFIX_TOKEN", raising=False)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    cli = typer.Typer()
    cli.command("spotfix")(spotfix_command)
    cli.command("noop")(lambda: None)
    r = CliRunner().invoke(cli, ["spotfix", "--workdir", str(run), "--host", host, "--editor", "grabcut"])
    assert r.exit_code == 0, r.output
    assert served["host"] == host
    shown = f"[{host}]" if ":" in host else host
    for base in (f"http://{shown}:8765", f"http://{shown}"):
        with TestClient(served["app"], base_url=base) as c:
            assert c.get("/api/meta").status_code == 200, base
    for foreign in ("attacker.example", "attacker.example:8765", f"{host}.attacker.example", "127.0.0.1.nip.io:8765"):
        with TestClient(served["app"], base_url=f"http://{shown}:8765") as c:
            r = c.get("/api/meta", headers={"host": foreign})
            assert r.status_code == 400 and "invalid host" in r.json()["detail"], foreign


def test_a_non_loopback_bind_still_needs_a_token(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    monkeypatch.delenv("EXITS_SPOTFIX_TOKEN", raising=False)
    cli = typer.Typer()
    cli.command("spotfix")(spotfix_command)
    cli.command("noop")(lambda: None)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        r = CliRunner().invoke(cli, ["spotfix", "--workdir", str(run), "--host", host, "--editor", "grabcut"])
        assert r.exit_code == 2 and "needs a token" in r.output, host


# ---- 4. images outside the image folder, missing or corrupt -----------------------------

def set_file_name(run: Path, image_id: int, file_name: str) -> None:
    data = json.loads((run / "pseudo_labels.json").read_text())
    for im in data["images"]:
        if im["id"] == image_id:
            im["file_name"] = file_name
    (run / "pseudo_labels.json").write_text(json.dumps(data))


@pytest.mark.parametrize("file_name", ["../secret.png", "/etc/passwd", "../run/pseudo_labels.json", "link.png",
                                       "sub/../../secret.png"])
def test_thumb_and_image_of_a_file_outside_the_image_folder_are_403_json(run: Path, file_name: str) -> None:
    secret = run.parent / "secret.png"
    shutil.copy(run.parent / "images" / "im1.png", secret)
    (run.parent / "images" / "link.png").symlink_to(secret)
    set_file_name(run, 1, file_name)
    catalog = RunCatalog.load(run)
    with TestClient(create_app(run, GrabCutEditor(catalog), catalog=catalog)) as c:
        for url in ("/api/objects/1/thumb", "/api/objects/2/thumb", "/api/images/1"):
            r = c.get(url)
            assert r.status_code == 403, url
            assert "image 1" in r.json()["detail"] and "outside the image folder" in r.json()["detail"], url
            assert r.json()["reason"] == "outside_image_dir"
        r = c.post("/api/objects/1/predict", json={"clicks": [{"x": 30, "y": 30, "positive": True}]})
        assert r.status_code == 403 and "image 1" in r.json()["detail"]
        assert c.get("/api/objects/3/thumb").status_code == 200  # other images are served as before


def test_missing_and_corrupt_image_files_answer_json(run: Path) -> None:
    (run.parent / "images" / "im1.png").unlink()
    (run.parent / "images" / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    catalog = RunCatalog.load(run)
    with TestClient(create_app(run, GrabCutEditor(catalog), catalog=catalog)) as c:
        r = c.get("/api/objects/1/thumb")
        assert r.status_code == 404 and "image 1" in r.json()["detail"] and "missing" in r.json()["detail"]
        r = c.get("/api/objects/3/thumb")
        assert r.status_code == 422 and "image 2" in r.json()["detail"] and "cannot read" in r.json()["detail"]
        for ann_id, status in ((1, 404), (3, 422)):
            r = c.post(f"/api/objects/{ann_id}/predict", json={"clicks": [{"x": 30, "y": 30, "positive": True}]})
            assert r.status_code == status and "image" in r.json()["detail"]
        assert c.get("/api/images/1").status_code == 404


# ---- 5. export: temporary files, full / read-only disk -----------------------------------

def test_export_failing_mid_write_leaves_no_temp_file_and_the_old_output(run: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import exits.io.files

    FixesStore(run).append(FixRecord(2, "reject", "a", [], None))
    out = run_export(run).path
    before = out.read_bytes()
    FixesStore(run).append(FixRecord(4, "reject", "a", [], None))
    monkeypatch.setattr(exits.io.files, "open", _full_disk_open(200), raising=False)
    with pytest.raises(OSError) as info:
        run_export(run)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert out.read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def _full_disk_open(limit: int):
    """An ``open`` whose text files take ``limit`` characters, then raise ENOSPC."""
    import builtins

    def open_(file, mode="r", *args, **kw):
        fh = builtins.open(file, mode, *args, **kw)
        if "w" not in mode:
            return fh
        real_write, written = fh.write, [0]

        def write(s):
            if written[0] + len(s) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += len(s)
            return real_write(s)

        fh.write = write
        return fh

    return open_


def test_export_removes_its_own_stale_temp_files_only(run: Path) -> None:
    own = [run / ".pseudo_labels_fixed.json.k2j4x9_a.tmp", run / ".pseudo_labels_fixed.json.zz.tmp"]
    others = [run / ".pseudo_labels.json.abcd1234.tmp", run / ".instances.parquet.q1w2e3r4.tmp",
              run / "pseudo_labels_fixed.json.tmp", run / "fixes" / ".pseudo_labels_fixed.json.x.tmp"]
    (run / "fixes").mkdir()
    for p in own + others:
        p.write_bytes(b"{half")
    result = run_export(run)
    assert result.path.is_file()
    assert [p.exists() for p in own] == [False, False]
    assert all(p.read_bytes() == b"{half" for p in others)  # other stages' temp files are not touched


def test_a_second_export_waits_for_the_first_instead_of_deleting_its_temp_file(run: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    FixesStore(run).append(FixRecord(2, "reject", "a", [], None))
    started, go = threading.Event(), threading.Event()
    real_dumps = json.dumps
    first = []

    def slow_dumps(obj, *args, **kw):
        if isinstance(obj, dict) and "segmentation" in obj and not first:
            first.append(1)
            started.set()
            go.wait(20)
        return real_dumps(obj, *args, **kw)

    monkeypatch.setattr(json, "dumps", slow_dumps)
    results: dict[str, object] = {}

    def export(tag: str) -> None:
        try:
            results[tag] = run_export(run).counts.rejected
        except Exception as exc:  # pragma: no cover - shown by the assert below
            results[tag] = exc

    a = threading.Thread(target=export, args=("a",))
    a.start()
    assert started.wait(20)
    tmp = [p for p in run.iterdir() if p.name.startswith(".pseudo_labels_fixed.json.")]
    assert len(tmp) == 1
    b = threading.Thread(target=export, args=("b",))
    b.start()
    time.sleep(0.5)
    assert b.is_alive() and tmp[0].exists()  # b waits; a's temp file is still there
    go.set()
    a.join(30)
    b.join(30)
    assert results == {"a": 1, "b": 1}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


EXPORT_WITH_FAULT = textwrap.dedent("""
    import errno, os, sys
    run, fault = sys.argv[1], sys.argv[2]
    if fault == "enospc":
        import builtins, exits.io.files
        def open_(file, mode="r", *a, **kw):
            fh = builtins.open(file, mode, *a, **kw)
            if "w" in mode:
                def write(s):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                fh.write = write
            return fh
        exits.io.files.open = open_
    elif fault == "erofs":
        real_open = os.open
        def ro_open(path, flags, *a, **kw):
            if str(path).startswith(run) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real_open(path, flags, *a, **kw)
        os.open = ro_open
    from exits.cli import app
    app(["export", "-w", run], prog_name="exits")
""")


@pytest.mark.parametrize("fault, text", [("enospc", f"{ENOSPC_TEXT} (ENOSPC)"), ("erofs", f"{EROFS_TEXT} (EROFS)")])
def test_export_command_on_a_full_or_read_only_disk_exits_2_with_one_line(run: Path, fault: str, text: str) -> None:
    FixesStore(run).append(FixRecord(2, "reject", "a", [], None))
    proc = subprocess.run([sys.executable, "-c", EXPORT_WITH_FAULT, str(run), fault], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert proc.stderr.strip().splitlines()[-1] == f"error: {run / 'pseudo_labels_fixed.json'}: {text}"
    assert not (run / "pseudo_labels_fixed.json").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not MODES_ENFORCED, reason="file modes are not enforced (root): the monkeypatched variant covers this")
def test_export_command_in_a_chmod_read_only_run_folder_exits_2(run: Path) -> None:
    exe = Path(sys.executable).parent / "exits"
    os.chmod(run, 0o555)
    try:
        proc = subprocess.run([str(exe), "export", "-w", str(run)], capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(run, 0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f": {EACCES_TEXT} (EACCES)")


def test_export_lock_is_on_the_run_folder(run: Path) -> None:
    """While another process holds the run folder's export lock, its temp file survives."""
    tmp = run / ".pseudo_labels_fixed.json.other123.tmp"
    tmp.write_bytes(b"{")
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = threading.Event()
        t = threading.Thread(target=lambda: (run_export(run), done.set()))
        t.start()
        assert not done.wait(0.5) and tmp.exists()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    t.join(30)
    assert done.is_set() and not tmp.exists()
