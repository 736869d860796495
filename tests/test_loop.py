"""`exits loop`: the triage budget, the config section, the page's budget queue and its
"review done" error; a `--no-review` loop writes the same files as `exits run` + `exits export`
+ `exits train-detector` run by hand; with review, the run suspends, survives the kill of its
`exits loop` process, is picked up by the next call, and the page's fix and "review done"
button reach the detector's training json."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from exits.cli import app
from exits.config import ConfigError, load_config
from exits.demo import generate_demo_dataset
from exits.io import file_digest, write_json
from exits.spotfix.app import create_app
from exits.stages.review import select_budget
from tests.spotfix_fixtures import make_run
from tests.test_cli_and_pipeline import TINY
from tests.test_detector_stage import TINY as TINY_DETECTOR

runner = CliRunner()
LOOP_TINY = TINY + TINY_DETECTOR + ["detector.iterations=1", "review.budget=3"]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def test_budget_is_the_k_lowest_scores_or_those_below_a_score():
    ids = np.array([10, 11, 12, 13, 14])
    scores = np.array([0.9, 0.2, np.nan, 0.2, 0.5])
    assert select_budget(ids, scores, 3, None) == [12, 11, 13]  # unknown score first, ties by id
    assert select_budget(ids, scores, None, 0.55) == [12, 11, 13, 14]
    assert select_budget(ids, scores, 2, 0.55) == [12, 11]
    assert select_budget(ids, scores, 10, 0.1) == [12]


def test_review_section_is_validated_and_needs_a_limit():
    cfg = load_config("demo", ["review.budget=7", "review.below_score=0.4"])
    assert (cfg.review.budget, cfg.review.below_score) == (7, 0.4)
    with pytest.raises(ConfigError, match="review"):
        load_config("demo", ["review.budget=null"])
    with pytest.raises(ConfigError, match="review.budget"):
        load_config("demo", ["review.budget=0"])


class NoEditor:
    def prepare(self, ann_id):  # pragma: no cover - not called here
        pass

    def predict(self, ann_id, clicks, prev):  # pragma: no cover - not called here
        return prev


def test_page_queue_is_limited_to_the_budget_and_review_done_needs_a_loop_run(tmp_path):
    work = make_run(tmp_path)
    client = TestClient(create_app(work, NoEditor(), user="tester"))
    assert client.get("/api/queue").json()["total"] == 4  # no loop: the whole queue
    write_json(work / "loop" / "review.json", {"ann_ids": [1, 3], "budget": 2, "below_score": None, "objects": 4,
                                               "source_blake2b": file_digest(work / "pseudo_labels.json", memo=False),
                                               "scores": [0.3, 0.55]})
    queue = client.get("/api/queue").json()
    assert queue["scope"] == "budget" and [i["ann_id"] for i in queue["items"]] == [1, 3]
    assert client.get("/api/queue?scope=all").json()["total"] == 4
    assert client.post("/api/objects/3/decision", json={"decision": "reject"}).status_code == 200
    assert [i["ann_id"] for i in client.get("/api/queue").json()["items"]] == [1]
    assert [i["ann_id"] for i in client.get("/api/queue?status=rejected").json()["items"]] == [3]
    assert client.get("/api/meta").json()["review"]["budget"] == 2
    done = client.post("/api/review/done", json={"reviewer": "tester"})
    assert done.status_code == 409
    assert done.json()["reason"] == "no_loop_run" and "no loop run" in done.json()["detail"]


def test_resume_of_a_folder_without_a_loop_run_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["loop", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "no loop run" in result.output and str(tmp_path) in result.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop_demo")
    generate_demo_dataset(out, n_train=4, n_val=2, seed=3)
    return out


def weights(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state.get("model", state)


@pytest.fixture(scope="module")
def no_review_loop(demo, prefect_server, tmp_path_factory) -> Path:
    """`exits loop --no-review --gt val.json` on the demo: the folder the review test goes on with."""
    work = tmp_path_factory.mktemp("loop_run") / "run"
    result = runner.invoke(app, ["loop", "-i", str(demo / "images"), "-a", str(demo / "instances.json"), "-w", str(work),
                                 "-c", "demo", "--no-review", "--gt", str(demo / "val.json"), *sets(LOOP_TINY)])
    assert result.exit_code == 0, result.output
    return work


@pytest.mark.slow
@pytest.mark.prefect
def test_no_review_loop_equals_run_export_and_train_detector_by_hand(demo, no_review_loop, tmp_path):
    images, ann = str(demo / "images"), str(demo / "instances.json")
    loop_dir, hand_dir = no_review_loop, tmp_path / "hand"
    for args in (["run", "-i", images, "-a", ann, "-w", str(hand_dir), "-c", "demo", *sets(LOOP_TINY)],
                 ["export", "-w", str(hand_dir)], ["train-detector", "-w", str(hand_dir), *sets(LOOP_TINY)]):
        out = runner.invoke(app, args)
        assert out.exit_code == 0, (args[0], out.output)
    for name in ("pseudo_labels.json", "pseudo_labels_fixed.json", "points.parquet"):
        assert (loop_dir / name).read_bytes() == (hand_dir / name).read_bytes(), name
    loop_src = json.loads((loop_dir / "detector" / "train_source.json").read_text())
    hand_src = json.loads((hand_dir / "detector" / "train_source.json").read_text())
    assert Path(loop_src["train_json"]).name == Path(hand_src["train_json"]).name == "pseudo_labels_fixed.json"
    assert loop_src["train_json_blake2b"] == hand_src["train_json_blake2b"]
    assert loop_src["config"] == hand_src["config"]
    a, b = weights(Path(loop_src["checkpoint"])), weights(Path(hand_src["checkpoint"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((loop_dir / "loop" / "summary.json").read_text())
    assert summary["reviewed"] is False and summary["review"]["fixed"] == 0 and summary["review"]["budget"] == 3
    assert json.loads((loop_dir / "loop" / "loop.json").read_text())["state"] == "completed"
    assert len(json.loads((loop_dir / "loop" / "review.json").read_text())["ann_ids"]) == 3


REPO = Path(__file__).resolve().parents[1]


def wait_for(condition, timeout: float, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{what}: exits loop ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: timed out\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def loop_json(work: Path) -> dict:
    try:
        return json.loads((work / "loop" / "loop.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
@pytest.mark.prefect
def test_review_suspends_survives_a_kill_and_the_page_fix_reaches_the_detector(demo, no_review_loop, prefect_server,
                                                                               tmp_path):
    from exits.eval.ground_truth import load_gt_masks
    from flows.loop_control import loop_run_state, waiter_present

    work = no_review_loop
    before_id = loop_json(work)["flow_run_id"]
    cmd = [sys.executable, "-m", "exits.cli", "loop", "-i", str(demo / "images"), "-a", str(demo / "instances.json"),
           "-w", str(work), "-c", "demo", "--gt", str(demo / "val.json"), *sets(LOOP_TINY)]
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PYTHONPATH=str(REPO))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def waiting() -> bool:
        state = loop_json(work)
        if state.get("state") != "waiting_for_review" or state["flow_run_id"] == before_id:
            return False
        run_state = loop_run_state(state["flow_run_id"])
        return run_state is not None and run_state.is_paused()

    with open(logs[0], "wb") as out:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(waiting, 240, first, logs[0], "suspension")
        assert "waits for review: 3 of" in logs[0].read_text() and "http://127.0.0.1:8765/" in logs[0].read_text()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    run_id = loop_json(work)["flow_run_id"]
    assert loop_run_state(run_id).is_paused()  # the suspended run outlives its process

    with open(logs[1], "wb") as out:
        second = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: waiter_present(work), 120, second, logs[1], "second call waiting")
        client = TestClient(create_app(work, NoEditor(), user="tester"))
        budget = json.loads((work / "loop" / "review.json").read_text())["ann_ids"]
        queue = client.get("/api/queue").json()
        assert queue["scope"] == "budget" and [i["ann_id"] for i in queue["items"]] == budget
        assert client.get("/api/meta").json()["review"]["waiting"] is True
        worst = budget[0]
        truth = load_gt_masks(demo / "instances.json", {worst})[worst].rle
        fix = {"size": list(truth["size"]), "counts": truth["counts"].decode() if isinstance(truth["counts"], bytes)
               else truth["counts"]}
        obj = client.get(f"/api/objects/{worst}").json()
        x0, y0, w, h = obj["crop_box"]
        decided = client.post(f"/api/objects/{worst}/decision", json={
            "decision": "accept", "rle": fix, "base": "pseudo", "clicks": [{"x": x0 + w / 2, "y": y0 + h / 2, "positive": True}]})
        assert decided.status_code == 200, decided.text
        done = client.post("/api/review/done", json={"reviewer": "tester", "note": "weekly"})
        assert done.status_code == 200, done.text
        assert done.json()["resumed"] is True and done.json()["flow_run_id"] == run_id
        assert "waiting" in done.json()["continued_by"]
        assert second.wait(timeout=300) == 0, logs[1].read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    output = logs[1].read_text()
    assert f"continuing loop run {run_id}" in output  # the next call resumed, not restarted
    fixed = json.loads((work / "pseudo_labels_fixed.json").read_text())
    ann = next(a for a in fixed["annotations"] if a["id"] == worst)
    assert ann["fixed"] is True and ann["segmentation"]["counts"] == fix["counts"]
    source = json.loads((work / "detector" / "train_source.json").read_text())
    assert Path(source["train_json"]).name == "pseudo_labels_fixed.json"
    assert source["train_json_blake2b"] == file_digest(work / "pseudo_labels_fixed.json", memo=False)
    summary = json.loads((work / "loop" / "summary.json").read_text())
    assert summary["flow_run_id"] == run_id and summary["reviewed"] and summary["reviewer"] == "tester"
    assert (summary["review"]["fixed"], summary["review"]["accepted"], summary["review"]["rejected"]) == (1, 0, 0)
    fm = summary["review"]["fixed_miou"]
    assert fm["count"] == 1 and fm["after"] == 1.0 and fm["before"] < 1.0  # the fix is the GT mask
    assert summary["mask_ap"]["before"] is not None and summary["mask_ap"]["after"] is not None
    assert "fixed: 1" in (work / "loop" / "summary.md").read_text()
    assert loop_run_state(run_id).is_completed()


def test_serve_loop_builds_a_scheduled_loop_deployment(tiny_coco, tmp_path):
    from flows.deploy import build_loop_deployment

    cfg = load_config("demo", ["review.budget=9"])
    dep = build_loop_deployment(cron="0 3 * * 1", images=tiny_coco.parent / "images", annotations=tiny_coco,
                                workdir=tmp_path / "weekly", cfg=cfg, gt=tiny_coco, name="weekly")
    assert dep.name == "weekly" and dep.entrypoint == "flows.loop.exits_loop"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"]
    params = dep.parameters
    assert params["served"] is True and params["review"] is True  # a scheduled run suspends at the review
    assert params["workdir"] == str((tmp_path / "weekly").resolve()) and params["gt"] == str(tiny_coco.resolve())
    assert params["config"]["review"]["budget"] == 9
