"""Spot-fix HTTP API: every endpoint, bad input (4xx with a message, nothing written), token."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from exits.spotfix.app import create_app
from exits.spotfix.catalog import RunCatalog
from exits.spotfix.commands import export_command, is_loopback, resolve_token, spotfix_command
from exits.spotfix.editors import EditorUnavailable, GrabCutEditor, load_editor, resolve_editor
from exits.spotfix.store import FixesStore, FixRecord
from tests.spotfix_fixtures import H, SCORES, W, make_run, rle_of, true_masks

TOKEN = "s3cret-token-0123456789"


class RecordingEditor:
    """Deterministic editor: prev mask plus a 5x5 square per positive click, minus one per
    negative click; records every call."""

    def __init__(self) -> None:
        self.prepared: list[int] = []
        self.calls: list[tuple[int, list, np.ndarray | None]] = []

    def prepare(self, ann_id: int) -> None:
        self.prepared.append(ann_id)

    def predict(self, ann_id, clicks, prev_mask):
        self.calls.append((ann_id, list(clicks), None if prev_mask is None else prev_mask.copy()))
        m = np.zeros((H, W), bool) if prev_mask is None else prev_mask.copy()
        for x, y, pos in clicks:
            m[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3] = pos
        return m


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


@pytest.fixture
def editor() -> RecordingEditor:
    return RecordingEditor()


@pytest.fixture
def client(run: Path, editor: RecordingEditor) -> TestClient:
    with TestClient(create_app(run, editor, user="tester")) as c:
        yield c


def fixes_file(run: Path) -> Path:
    return run / "fixes" / "fixes.jsonl"


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_page_and_static_files(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "/static/app.js" in r.text and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    js, css = client.get("/static/app.js"), client.get("/static/app.css")
    assert js.status_code == 200 and "X-Exits-Token" in js.text and css.status_code == 200
    for page in ("/", "/static/app.js"):  # no external requests from the page
        assert "http://" not in client.get(page).text and "https://" not in client.get(page).text
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404


def test_meta(client: TestClient) -> None:
    meta = client.get("/api/meta").json()
    assert meta["user"] == "tester" and meta["editor"] == "RecordingEditor"
    assert meta["counts"] == {"objects": 4, "accepted": 0, "rejected": 0}
    assert [c["name"] for c in meta["categories"]] == ["round", "other"]


def test_queue_order_and_filters(client: TestClient) -> None:
    q = client.get("/api/queue").json()
    assert [i["ann_id"] for i in q["items"]] == [1, 3, 4, 2]  # worst score first
    assert [i["score"] for i in q["items"]] == sorted(SCORES.values())
    assert q["total"] == 4 and q["items"][1]["parts"] == 2 and q["items"][1]["separated"] is True
    ids = lambda **p: [i["ann_id"] for i in client.get("/api/queue", params=p).json()["items"]]  # noqa: E731
    assert ids(category_id=2) == [4, 2]
    assert ids(separated="true") == [3]  # counted on the pseudo mask, not the json's num_parts (99)
    assert ids(separated="false") == [1, 4, 2]
    assert ids(min_score=0.5, max_score=0.8) == [3, 4]
    assert ids(offset=1, limit=2) == [3, 4]
    client.post("/api/objects/4/decision", json={"decision": "reject"})
    assert ids() == [1, 3, 2] and ids(status="rejected") == [4] and ids(status="decided") == [4]
    assert ids(status="all") == [1, 3, 4, 2]


@pytest.mark.parametrize("params, fragment", [
    ({"min_score": 0.9, "max_score": 0.1}, "above max_score"),
    ({"category_id": 7}, "unknown category"),
    ({"separated": "maybe"}, "separated"),
    ({"limit": 0}, "limit"),
    ({"status": "bogus"}, "status"),
    ({"min_score": "nan"}, "min_score"),
])
def test_queue_bad_filters(client: TestClient, params: dict, fragment: str) -> None:
    r = client.get("/api/queue", params=params)
    assert r.status_code == 422 and fragment in r.json()["detail"]


def test_object_detail_prepares_and_prefetch(client: TestClient, run: Path, editor: RecordingEditor) -> None:
    d = client.get("/api/objects/1").json()
    assert (d["width"], d["height"], d["base"], d["revision"], d["status"]) == (W, H, "pseudo", 0, "todo")
    assert d["image_url"] == "/api/images/1" and len(d["extreme_points"]) == 4 and len(d["crop_box"]) == 4
    pseudo = RunCatalog.load(run).pseudo_mask(1)
    assert np.array_equal(decode(d["mask"]["rle"]), pseudo) and d["mask"]["area"] == pseudo.sum()
    assert d["mask"]["png"].startswith("data:image/png;base64,")
    r = client.post("/api/objects/2/prefetch")
    assert r.status_code == 202
    client.post("/api/objects/1/predict", json={"clicks": [{"x": 1, "y": 1, "positive": True}]})  # waits for queued work
    assert editor.prepared[:2] == [1, 2]
    assert client.post("/api/objects/999/prefetch").status_code == 404


def test_predict_passes_clicks_and_previous_mask(client: TestClient, run: Path, editor: RecordingEditor) -> None:
    prev = np.zeros((H, W), bool)
    prev[0:3, 0:3] = True
    body = {"clicks": [{"x": 40.0, "y": 30.0, "positive": True}, {"x": 41, "y": 30, "positive": False}],
            "prev_rle": rle_of(prev)}
    r = client.post("/api/objects/1/predict", json=body)
    assert r.status_code == 200
    ann_id, clicks, got_prev = editor.calls[-1]
    assert ann_id == 1 and clicks == [(40.0, 30.0, True), (41.0, 30.0, False)]
    assert np.array_equal(got_prev, prev)
    mask = decode(r.json()["mask"]["rle"])
    assert mask[30, 38] and not mask[30, 41] and mask[1, 1]
    assert r.json()["mask"]["area"] == mask.sum()
    # Without prev_rle the editor starts from the current mask (the pseudo mask here).
    client.post("/api/objects/3/predict", json={"clicks": [{"x": 5, "y": 5, "positive": False}]})
    assert np.array_equal(editor.calls[-1][2], RunCatalog.load(run).pseudo_mask(3))


def test_grabcut_click_fixes_the_worst_mask(run: Path) -> None:
    catalog = RunCatalog.load(run)
    with TestClient(create_app(run, GrabCutEditor(catalog), catalog=catalog)) as c:
        truth = true_masks()[1][2]
        start = c.get("/api/objects/1").json()["mask"]
        r = c.post("/api/objects/1/predict", json={"clicks": [{"x": 36, "y": 34, "positive": True}],
                                                  "prev_rle": start["rle"]})
        after = decode(r.json()["mask"]["rle"])
        before = decode(start["rle"])
        iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
        assert after[34, 36] and not before[34, 36]
        assert iou(after, truth) > iou(before, truth) + 0.25


BAD_PREDICTS = [
    ({"clicks": [{"x": W, "y": 3, "positive": True}]}, "outside"),
    ({"clicks": [{"x": 3, "y": -0.5, "positive": True}]}, "outside"),
    ({"clicks": []}, "clicks"),
    ({"clicks": [{"x": 1, "y": 1, "positive": True}] * 65}, "clicks"),
    ({"clicks": [{"x": 1, "y": 1, "positive": "yes"}]}, "positive"),
    ({"clicks": [{"x": 1, "y": 1, "positive": True, "z": 1}]}, "z"),
    ({"clicks": [{"x": 1, "y": 1, "positive": True}], "prev_rle": {"size": [H + 1, W], "counts": "0"}}, "size"),
    ({"clicks": [{"x": 1, "y": 1, "positive": True}], "prev_rle": {"size": [H, W], "counts": "abc"}}, "mask"),
    ({"clicks": [{"x": 1, "y": 1, "positive": True}], "prev_rle": {"size": [H, W], "counts": "~~~~"}}, "mask"),
    ({"clicks": [{"x": 1, "y": 1, "positive": True}], "extra": 1}, "extra"),
]


@pytest.mark.parametrize("body, fragment", BAD_PREDICTS)
def test_predict_bad_input(client: TestClient, editor: RecordingEditor, body: dict, fragment: str) -> None:
    r = client.post("/api/objects/1/predict", json=body)
    assert r.status_code == 422 and fragment in r.json()["detail"]
    assert editor.calls == []


def test_raw_bad_requests(client: TestClient, run: Path, editor: RecordingEditor) -> None:
    url = "/api/objects/1/predict"
    nan = b'{"clicks": [{"x": NaN, "y": 1, "positive": true}]}'
    r = client.post(url, content=nan, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "x" in r.json()["detail"]
    r = client.post(url, content=b'{"clicks": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post(url, content=b'{"clicks": []}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post(url, content=b"x" * ((1 << 20) + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    for bad in ("/api/objects/abc", "/api/objects/1.5", "/api/objects/-1", "/api/objects/10000000000000000000000"):
        r = client.get(bad)
        assert r.status_code in (404, 422) and r.json()["detail"]
    r = client.post("/api/objects/999/predict", json={"clicks": [{"x": 1, "y": 1, "positive": True}]})
    assert r.status_code == 404 and "unknown object id 999" in r.json()["detail"]
    for bad in ({"decision": "maybe"}, {"decision": "accept"}, {"decision": "reject", "rle": rle_of(np.ones((H, W)))},
                {"decision": "accept", "rle": rle_of(np.zeros((H, W)))}, {"decision": "reject", "user": "a b/../"},
                {"decision": "reject", "revision": -1}, {"decision": "reject", "clicks": [{"x": 999, "y": 0, "positive": True}]}):
        r = client.post("/api/objects/1/decision", json=bad)
        assert r.status_code == 422 and r.json()["detail"], bad
    assert client.post("/api/objects/999/decision", json={"decision": "reject"}).status_code == 404
    assert editor.calls == [] and not fixes_file(run).exists()  # nothing was written


def test_decisions_are_stored_and_become_the_base(client: TestClient, run: Path) -> None:
    fix = np.zeros((H, W), bool)
    fix[20:40, 10:30] = True
    clicks = [{"x": 12.5, "y": 22, "positive": True}]
    r = client.post("/api/objects/1/decision", json={"decision": "accept", "clicks": clicks, "rle": rle_of(fix),
                                                     "revision": 0, "base": "pseudo", "user": "ann.o"})
    assert r.status_code == 200 and r.json()["revision"] == 1 and r.json()["status"] == "accepted"
    rec = FixesStore(run).latest()[1]
    assert rec.decision == "accept" and rec.user == "ann.o" and rec.clicks == [[12.5, 22.0, True]]
    assert np.array_equal(decode(rec.rle), fix) and rec.base == "pseudo" and rec.editor == "RecordingEditor"
    d = client.get("/api/objects/1").json()
    assert d["base"] == "fix" and d["revision"] == 1 and d["status"] == "accepted"
    assert np.array_equal(decode(d["mask"]["rle"]), fix)
    # A second tab still holding revision 0 is refused; nothing is written.
    size = fixes_file(run).stat().st_size
    r = client.post("/api/objects/1/decision", json={"decision": "reject", "revision": 0})
    assert r.status_code == 409 and "another tab" not in r.json()["detail"] and "reload" in r.json()["detail"]
    assert fixes_file(run).stat().st_size == size
    r = client.post("/api/objects/1/decision", json={"decision": "reject", "revision": 1})
    assert r.status_code == 200 and FixesStore(run).latest()[1].user == "tester"
    h = client.get("/api/objects/1/history").json()["records"]
    assert [x["decision"] for x in h] == ["accept", "reject"]
    assert client.get("/api/meta").json()["counts"] == {"objects": 4, "accepted": 0, "rejected": 1}
    assert client.get("/api/objects/999/history").status_code == 404


def test_thumbnail_and_images(client: TestClient, run: Path) -> None:
    t = client.get("/api/objects/3/thumb")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg" and t.content[:2] == b"\xff\xd8"
    assert client.get("/api/objects/999/thumb").status_code == 404
    img = client.get("/api/images/2")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (run.parent / "images" / "im2.png").read_bytes()
    r = client.get("/api/images/3")
    assert r.status_code == 404 and "unknown image id" in r.json()["detail"]
    for bad in ("/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/%2Fetc%2Fpasswd", "/api/images/im1.png"):
        assert client.get(bad).status_code in (404, 422)


@pytest.mark.parametrize("file_name", ["../secret.png", "/etc/passwd", "../run/pseudo_labels.json", "link.png"])
def test_image_serving_cannot_leave_the_image_folder(run: Path, file_name: str) -> None:
    secret = run.parent / "secret.png"
    secret.write_bytes(b"not for you")
    (run.parent / "images" / "link.png").symlink_to(secret)
    data = json.loads((run / "pseudo_labels.json").read_text())
    data["images"][0]["file_name"] = file_name
    (run / "pseudo_labels.json").write_text(json.dumps(data))
    with TestClient(create_app(run, RecordingEditor())) as c:
        r = c.get("/api/images/1")
        assert r.status_code == 403 and "outside the image folder" in r.json()["detail"]
        assert b"not for you" not in r.content


def test_missing_image_file_is_404(run: Path) -> None:
    (run.parent / "images" / "im2.png").unlink()
    with TestClient(create_app(run, RecordingEditor())) as c:
        r = c.get("/api/images/2")
        assert r.status_code == 404 and "missing" in r.json()["detail"]


def test_token_is_required_on_every_request(run: Path) -> None:
    with TestClient(create_app(run, RecordingEditor(), token=TOKEN)) as c:
        for path in ("/", "/static/app.js", "/api/meta", "/api/queue", "/api/objects/1", "/api/images/1"):
            r = c.get(path)
            assert r.status_code == 401 and "token required" in r.json()["detail"], path
            assert c.get(path, headers={"X-Exits-Token": TOKEN + "x"}).status_code == 403
            assert c.get(path, headers={"X-Exits-Token": TOKEN}).status_code == 200
        body = {"decision": "reject"}
        assert c.post("/api/objects/1/decision", json=body).status_code == 401
        r = c.post("/api/objects/1/decision", json=body, headers={"X-Exits-Token": "wrong-token-0123456789"})
        assert r.status_code == 403 and r.json()["detail"] == "invalid token"
        # POSTs take the header only: neither the query token nor the cookie is enough.
        assert c.post(f"/api/objects/1/decision?token={TOKEN}", json=body).status_code == 401
        assert not fixes_file(run).exists()
        page = c.get(f"/?token={TOKEN}")
        assert page.status_code == 200 and c.cookies.get("exits_token") == TOKEN
        assert c.get("/api/images/1").status_code == 200  # <img> loads ride on the cookie
        assert c.post("/api/objects/1/decision", json=body).status_code == 401
        assert not fixes_file(run).exists()
        r = c.post("/api/objects/1/decision", json=body, headers={"X-Exits-Token": TOKEN})
        assert r.status_code == 200 and FixesStore(run).latest()[1].decision == "reject"


def test_host_header_is_checked_on_loopback(run: Path) -> None:
    app = create_app(run, RecordingEditor(), allowed_hosts=["127.0.0.1", "localhost"])
    assert TestClient(app, base_url="http://127.0.0.1:8765").get("/api/meta").status_code == 200
    assert TestClient(app, base_url="http://attacker.example").get("/api/meta").status_code == 400


def test_token_rules_and_editor_loading(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXITS_SPOTFIX_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")
    assert resolve_token("127.0.0.1", None) is None
    with pytest.raises(ValueError, match="needs a token"):
        resolve_token("0.0.0.0", None)
    with pytest.raises(ValueError, match="at least 16"):
        resolve_token("0.0.0.0", "short")
    monkeypatch.setenv("EXITS_SPOTFIX_TOKEN", TOKEN)
    assert resolve_token("192.168.1.5", None) == TOKEN
    catalog = RunCatalog.load(run)
    assert isinstance(load_editor("grabcut", run, catalog), GrabCutEditor)
    with pytest.raises(EditorUnavailable, match=r"no click model in .*click_model; run `exits train-clicks --workdir"):
        load_editor("clicks", run, catalog)
    with pytest.raises(EditorUnavailable, match="unknown editor"):
        load_editor("magic", run, catalog)
    # auto with no click model in the run: GrabCut, and the message says how to get one
    kind, why = resolve_editor("auto", run)
    assert kind == "grabcut" and "train-clicks" in why
    assert isinstance(load_editor("auto", run, catalog), GrabCutEditor)
    assert resolve_editor("grabcut", run) == ("grabcut", "chosen with --editor")


def test_commands(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    monkeypatch.delenv("EXITS_SPOTFIX_TOKEN", raising=False)
    app = typer.Typer()
    app.command("spotfix")(spotfix_command)
    app.command("export")(export_command)
    runner = CliRunner()
    r = runner.invoke(app, ["spotfix", "--workdir", str(run), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "needs a token" in r.output
    r = runner.invoke(app, ["spotfix", "--workdir", str(run), "--editor", "clicks"])
    assert r.exit_code == 2 and "train-clicks" in r.output
    r = runner.invoke(app, ["spotfix", "--workdir", str(run.parent)])
    assert r.exit_code == 2 and "pseudo_labels.json" in r.output
    FixesStore(run).append(FixRecord(2, "reject", "a", [], None))
    r = runner.invoke(app, ["export", "--workdir", str(run)])
    assert r.exit_code == 0 and "rejected: 1" in r.output and "objects_out: 3" in r.output
    assert (run / "pseudo_labels_fixed.json").is_file()
