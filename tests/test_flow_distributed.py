"""Training stages on several processes from the flows (``train.nproc_per_node``): under
torchrun with 2 gloo processes on the CPU, the similarity and generator flows write the
weights a 1-process run writes, the task's cached record points at the model rank 0
wrote, progress comes from rank 0 only, and a rank that fails fails the task with its error."""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exits.config import load_config
from exits.demo import generate_demo_dataset
from exits.engine.checkpoint import LAST_CHECKPOINT, load_checkpoint
from exits.engine.launch import LaunchPlan, RankFailedError, launch, resolve_nproc, torchrun_command
from exits.run_folder import RunFolder
from flows.generator import train_generator_flow
from flows.prepare import prepare_instances_flow
from flows.retrieval import retrieve_points_flow
from flows.runtime import config_dict
from flows.similarity import train_similarity_flow
from tests.test_cli_and_pipeline import TINY

# 12 demo objects: divisible by 2 processes, so DistributedSampler pads nothing and the two
# ranks' batches are, step by step, the halves of the 1-process run's batches.
SETTINGS = TINY + ["flows.shard_size=12", "similarity.optim.epochs=2", "generator.optim.epochs=2"]
# Per-step gradients of 2 ranks are averaged by an all-reduce (mean of two half-batch means)
# instead of one mean over the batch: the same number up to float32 rounding (~1e-7
# relative), which a few AdamW steps carry into the weights: measured 1.2e-6 (similarity)
# and 8.4e-7 (generator teacher) at most.
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_with(nproc: int | str, *extra: str) -> dict:
    return config_dict(load_config("demo", SETTINGS + [f"train.nproc_per_node={nproc}", *extra]))


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state_dict(a), state_dict(b)
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= ATOL, f"max weight difference {worst:.3g}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_server) -> dict:
    """The demo through prepare, similarity, retrieval and generator with ONE process."""
    root = tmp_path_factory.mktemp("flow_ddp")
    generate_demo_dataset(root / "demo", n_train=6, n_val=2, seed=3)
    images, work = str(root / "demo" / "images"), str(root / "one")
    config = cfg_with(1)
    prepare_instances_flow(images, str(root / "demo" / "instances.json"), work, config)
    train_similarity_flow(images, work, config)
    retrieve_points_flow(images, work, config)
    train_generator_flow(images, work, config)
    return {"root": root, "images": images, "run": RunFolder(work)}


def fresh_run(reference: dict, name: str, *files: str) -> RunFolder:
    """A run folder holding only ``files`` of the reference run (no cache records, no models)."""
    run = RunFolder(reference["root"] / name)
    run.root.mkdir()
    for f in files:
        shutil.copy2(reference["run"].root / f, run.root / f)
    return run


@pytest.mark.prefect
def test_two_processes_train_the_one_process_models(reference, caplog):
    run = fresh_run(reference, "two", "instances.parquet", "points.parquet")
    images = reference["images"]
    with caplog.at_level(logging.INFO, logger="exits.engine.launch"):
        similarity = train_similarity_flow(images, str(run.root), cfg_with(2))
        generator = train_generator_flow(images, str(run.root), cfg_with(2))

    assert similarity["tasks"] == {"train-similarity-extractor": "Completed"}
    assert generator["tasks"] == {"train-generator": "Completed"}
    # The cached records point at the models rank 0 wrote, with their digests.
    assert similarity["model"] == str(run.similarity) and generator["model"] == str(run.generator)
    assert_same_weights(run.similarity, reference["run"].similarity)
    assert_same_weights(run.generator, reference["run"].generator)  # the EMA teacher
    for model in (run.similarity, run.generator):
        ckpt_dirs = [d for d in run.checkpoints(model).iterdir() if d.is_dir()]
        assert len(ckpt_dirs) == 1  # keyed by the task's cache key
        last = load_checkpoint(ckpt_dirs[0] / LAST_CHECKPOINT)
        assert last["world_size"] == 2 and len(last["rng"]) == 2 and last["epoch"] == 1
        saved = torch.load(model, map_location="cpu", weights_only=False)["extra"]["history"]
        assert [h["steps"] for h in saved] == [2, 2]  # 12 objects / global batch 8, per epoch
    assert not any((run.cache_dir / "train-jobs").iterdir())  # job folders removed after success

    lines = [r.getMessage() for r in caplog.records if r.name == "exits.engine.launch"]
    epoch_lines = [ln for ln in lines if "exits.engine.loop: epoch" in ln]
    assert epoch_lines and all(ln.startswith("[rank 0] INFO") for ln in epoch_lines)  # progress: rank 0 only
    assert any("ETA" in ln for ln in epoch_lines)
    assert not any(ln.startswith("[rank 1] INFO") for ln in lines)

    # Rerun: a cache hit (the number of processes is not part of the key) pointing at the same model.
    again = train_similarity_flow(images, str(run.root), cfg_with(1))
    assert again["tasks"] == {"train-similarity-extractor": "Cached"} and again["model"] == str(run.similarity)


FAIL_RANK_1 = '''
import os
if os.environ.get("RANK") == "1":
    import exits.engine.loop as loop

    def _fail(*args, **kwargs):
        raise ValueError("disk quota of rank 1 exceeded (injected)")

    loop.train_one_epoch = _fail
'''


@pytest.mark.prefect
def test_a_failing_rank_fails_the_task_with_its_error(reference, tmp_path, monkeypatch):
    # sitecustomize runs at the start of every interpreter on PYTHONPATH: rank 1's first epoch raises.
    (tmp_path / "sitecustomize.py").write_text(FAIL_RANK_1)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    run = fresh_run(reference, "fails", "instances.parquet")
    with pytest.raises(RankFailedError) as err:
        train_similarity_flow(reference["images"], str(run.root), cfg_with(2))
    message = str(err.value)
    assert message.startswith("training rank 1 of 2 failed on host ")
    assert "ValueError: disk quota of rank 1 exceeded (injected)" in message
    assert not run.similarity.exists()


def test_process_count_is_resolved_with_clear_errors(monkeypatch, tmp_path):
    assert resolve_nproc("auto", "cpu") == 1 and resolve_nproc(3, "cpu") == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_nproc("auto", "cuda") == 2 and resolve_nproc(2, "cuda") == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=r"nproc_per_node=4 but this machine has 2 CUDA device\(s\) "
                                         r"\(CUDA_VISIBLE_DEVICES=0,1\)"):
        resolve_nproc(4, "cuda")
    one = torchrun_command(tmp_path / "job.json", "similarity-x", LaunchPlan(2))
    assert "--standalone" in one and one[one.index("--nproc_per_node") + 1] == "2"
    many = torchrun_command(tmp_path / "job.json", "similarity-x", LaunchPlan(8, 2, "head:29400"))
    assert "--standalone" not in many
    for flag, value in (("--nnodes", "2"), ("--rdzv_backend", "c10d"), ("--rdzv_endpoint", "head:29400"),
                        ("--rdzv_id", "similarity-x")):
        assert many[many.index(flag) + 1] == value


def test_two_machines_meet_at_the_rendezvous_through_a_follower(tmp_path):
    """The multi-machine path on one host: `exits run`'s side (launch) and another machine's
    (`python -m exits.engine.launch follow`), 1 process each, one c10d rendezvous."""
    jobs = tmp_path / "train-jobs"
    jobs.mkdir()
    follower = subprocess.Popen([sys.executable, "-m", "exits.engine.launch", "follow", str(jobs),
                                 "--nproc-per-node", "1", "--once"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        plan = LaunchPlan(1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_timeout_s=120)
        summary = launch("exits.engine.launch:process_group_summary", {"device": "cpu"}, plan, jobs, name="probe",
                         device="cpu")
        out, _ = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, out
    assert summary["world_size"] == 2
    assert [p["rank"] for p in summary["processes"]] == [0, 1]
    assert len({p["pid"] for p in summary["processes"]}) == 2
    assert not any(jobs.iterdir())  # the job folder is removed after success
