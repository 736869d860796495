"""The Prefect pipeline on demo data at tiny settings: same outputs as the plain pipeline,
re-runs recompute nothing, changed settings recompute only what depends on them, a run
killed mid-stage finishes only the missing shards, and Dask workers give the threads' output."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from exits.config import load_config
from exits.demo import generate_demo_dataset
from exits.pipeline import run_pipeline
from flows.pipeline import run_pipeline_flow
from tests.test_cli_and_pipeline import TINY

pytestmark = pytest.mark.prefect

REPO = Path(__file__).resolve().parents[1]
# 12 demo objects -> 4 shards of 3 in each sharded stage.
FLOW_TINY = TINY + ["flows.shard_size=3", "flows.max_workers=2"]
N_SHARDS = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flows_demo")
    generate_demo_dataset(out, n_train=6, n_val=2, seed=3)
    return out


def run_flow(demo: Path, workdir: Path, *extra: str) -> dict:
    cfg = load_config("demo", FLOW_TINY + list(extra))
    return run_pipeline_flow(demo / "images", demo / "instances.json", workdir, cfg)


@pytest.fixture(scope="module")
def finished(demo, prefect_server, tmp_path_factory) -> dict:
    """One uninterrupted flow run; the reference for the other tests. (Module fixtures run
    before the autouse one of the ``prefect`` marker, hence ``prefect_server`` here.)"""
    work = tmp_path_factory.mktemp("flows_run") / "run"
    result = run_flow(demo, work)
    return {"work": work, "result": result, "json": (work / "pseudo_labels.json").read_bytes()}


def states_of(result: dict, stage: str) -> dict[str, str]:
    return {k.split("/", 1)[1]: v for k, v in result["task_states"].items() if k.startswith(stage + "/")}


def test_flow_run_computes_every_task_and_matches_the_plain_pipeline(demo, finished, tmp_path):
    result, work = finished["result"], finished["work"]
    n_tasks = 1 + 1 + (N_SHARDS + 1) + 1 + (N_SHARDS + 1) + 1
    assert result["tasks"] == {"Completed": n_tasks}
    assert result["objects"] == 12 and 0.0 < result["miou_all"] <= 1.0
    assert set(states_of(result, "pseudo_labels")) == {f"pseudo-{i:05d}" for i in range(N_SHARDS)} | {"merge-pseudo-labels"}
    for stage in ("points", "pseudo"):
        shards = sorted((work / "shards").glob(f"{stage}-*.parquet"))
        assert [p.name for p in shards] == [f"{stage}-{i:05d}.parquet" for i in range(N_SHARDS)]
        assert [pq.read_metadata(p).num_rows for p in shards] == [3, 3, 3, 3]
        assert all(b"exits_shard_key" in pq.read_schema(p).metadata for p in shards)
    assert json.loads((work / "run_summary.json").read_text())["tasks"] == result["tasks"]
    assert not list(work.rglob(".*.tmp"))

    plain = tmp_path / "plain"
    run_pipeline(demo / "images", demo / "instances.json", plain, load_config("demo", FLOW_TINY), progress=False)
    assert (plain / "pseudo_labels.json").read_bytes() == finished["json"]
    assert pq.read_table(plain / "points.parquet").equals(pq.read_table(work / "points.parquet"))
    assert pq.read_table(plain / "pseudo_labels.parquet").equals(pq.read_table(work / "pseudo_labels.parquet"))


def test_rerun_of_a_finished_run_recomputes_nothing(demo, finished):
    work = finished["work"]
    outputs = [work / "instances.parquet", work / "similarity" / "model.pt", work / "points.parquet",
               work / "generator" / "model.pt", work / "pseudo_labels.json", *sorted((work / "shards").iterdir())]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    result = run_flow(demo, work)
    assert set(result["task_states"].values()) == {"Cached"}
    assert result["tasks"]["Cached"] == finished["result"]["tasks"]["Completed"]
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert result["miou_all"] == finished["result"]["miou_all"]


def test_changed_setting_recomputes_only_the_stages_that_read_it(demo, finished):
    work = finished["work"]
    result = run_flow(demo, work, "pseudo.threshold=0.8")
    computed = {k for k, v in result["task_states"].items() if v == "Completed"}
    assert computed == {k for k in result["task_states"] if k.startswith(("pseudo_labels/", "report/"))}
    assert (work / "pseudo_labels.json").read_bytes() != finished["json"]
    # Back to the original threshold: the old cache records exist, but the shard files were
    # overwritten by the 0.8 run, so those hits are stale and recomputed, giving the original.
    back = run_flow(demo, work)
    assert set(states_of(back, "pseudo_labels").values()) == {"Completed"}
    assert set(states_of(back, "generator").values()) == {"Cached"}
    assert (work / "pseudo_labels.json").read_bytes() == finished["json"]


def test_retrieval_knob_reruns_retrieval_onwards_and_keeps_the_similarity_extractor(demo, finished):
    """``retrieval.appearance_weight`` / ``retrieval.layers`` are read by point retrieval only
    (they used to sit in ``similarity:``, whose change retrains stage 1a)."""
    work = finished["work"]
    model = work / "similarity" / "model.pt"
    before = model.stat().st_mtime_ns
    result = run_flow(demo, work, "retrieval.appearance_weight=0.2", "retrieval.layers=[0]")
    assert set(states_of(result, "prepare").values()) == {"Cached"}
    assert set(states_of(result, "similarity").values()) == {"Cached"}
    assert model.stat().st_mtime_ns == before
    for stage in ("retrieval", "generator"):  # later stages follow the bytes of these outputs
        assert set(states_of(result, stage).values()) == {"Completed"}, stage
    back = run_flow(demo, work)  # restore the reference outputs for the tests below
    assert set(states_of(back, "similarity").values()) == {"Cached"}
    assert (work / "pseudo_labels.json").read_bytes() == finished["json"]


KILL_SCRIPT = '''
import sys, time
from pathlib import Path
import flows.pseudo_labels as stage_flow
from exits.config import load_config
from flows.pipeline import run_pipeline_flow

images, annotations, workdir, marker = map(Path, sys.argv[1:5])
real = stage_flow.stage_pseudo_shard

def shard_then_wait_for_kill(*args, **kwargs):
    out = real(*args, **kwargs)
    if len(list(out.parent.glob("pseudo-*.parquet"))) >= 2:
        marker.write_text("two pseudo shards written")
        time.sleep(600)  # SIGKILLed here by the test, in the middle of the sharded stage
    return out

stage_flow.stage_pseudo_shard = shard_then_wait_for_kill
run_pipeline_flow(images, annotations, workdir, load_config("demo", sys.argv[5:]))
'''


def test_killed_run_finishes_only_the_missing_shards(demo, finished, prefect_server, tmp_path):
    work, marker, script = tmp_path / "killed", tmp_path / "marker", tmp_path / "kill_run.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PYTHONPATH=str(REPO))
    # One shard at a time, so exactly two pseudo shards exist when the process dies.
    args = [str(demo / "images"), str(demo / "instances.json"), str(work), str(marker), *FLOW_TINY,
            "flows.max_workers=1"]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        running = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert running and marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    pseudo = sorted((work / "shards").glob("pseudo-*.parquet"))
    assert [p.name for p in pseudo] == ["pseudo-00000.parquet", "pseudo-00001.parquet"]
    assert not (work / "pseudo_labels.json").exists() and not list(work.rglob(".*.tmp"))
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pseudo}

    result = run_flow(demo, work)
    for stage in ("prepare", "similarity", "retrieval", "generator"):
        assert set(states_of(result, stage).values()) == {"Cached"}, stage
    assert states_of(result, "pseudo_labels") == {
        "pseudo-00000": "Cached",      # finished and recorded before the kill
        "pseudo-00001": "Completed",   # file written, task killed before its record: file kept
        "pseudo-00002": "Completed", "pseudo-00003": "Completed", "merge-pseudo-labels": "Completed"}
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pseudo} == stats  # not rewritten
    assert (work / "pseudo_labels.json").read_bytes() == finished["json"]


def test_dask_workers_give_the_thread_runner_output(demo, finished, tmp_path):
    from distributed import Client

    from flows.pseudo_labels import pseudo_labels_flow
    from flows.runtime import config_dict, local_dask_cluster, make_task_runner

    work = tmp_path / "dask"
    for name in ("instances.parquet", "points.parquet", "generator/model.pt"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(finished["work"] / name, work / name)
    cfg = load_config("demo", FLOW_TINY + ["flows.task_runner=dask", "flows.max_workers=2"])
    with local_dask_cluster(cfg.flows) as address:
        with Client(address) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            out = pseudo_labels_flow.with_options(task_runner=make_task_runner(cfg.flows, address))(
                images=str(demo / "images"), annotations=str(demo / "instances.json"), workdir=str(work),
                config=config_dict(cfg))
            prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "pseudo_labels_shard_task" in prefixes, prefixes  # the shard tasks ran on the Dask workers
    assert out["shards"] == N_SHARDS and set(out["tasks"].values()) == {"Completed"}
    assert (work / "pseudo_labels.json").read_bytes() == finished["json"]
