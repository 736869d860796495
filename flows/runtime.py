"""What every stage flow shares: config handling, result storage, task runners, retries.

Flows take the validated config as a plain dict (a flow parameter Prefect can store and a
deployment can carry) and hand each task only the config sections its stage reads.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from exits.config import ExitsConfig
from exits.run_folder import PREFECT_RESULTS_DIR, RunFolder
from exits.config.schema import FlowsConfig

if TYPE_CHECKING:
    from exits.stages.object_crops import StreamingCropDataset

log = logging.getLogger(__name__)

RESULTS_DIR = PREFECT_RESULTS_DIR

__all__ = ["RESULTS_DIR", "results_dir", "config_from", "config_dict", "sections", "transient_error",
           "make_task_runner", "local_dask_cluster", "stage_result", "count_states"]


def crop_dataset(instances: str, images: str, crop_size: int) -> "StreamingCropDataset":
    """The object crops a training task trains on (built inside the task, never passed around):
    cut per item, in the DataLoader's workers with ``optim.num_workers`` > 0; the instances
    table is read row group by row group (104 bytes per object held, no crop)."""
    from exits.stages.object_crops import StreamingCropDataset

    return StreamingCropDataset(instances, images, crop_size)


def results_dir(workdir: str | Path) -> Path:
    """``WORKDIR/.prefect-results``: persisted task results and cache records of the run."""
    return RunFolder(workdir).prefect_results


def config_from(config: Mapping[str, Any] | ExitsConfig | None) -> ExitsConfig:
    """Validate a config dict (None = all defaults); sections left out take their defaults."""
    if isinstance(config, ExitsConfig):
        return config
    return ExitsConfig.model_validate(dict(config or {}))


def config_dict(cfg: ExitsConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def sections(cfg: ExitsConfig, *names: str) -> dict[str, Any]:
    """The named top-level entries of the config (sections or values) as a JSON-able dict.

    A task's cache key includes exactly these, so a change elsewhere does not recompute it;
    :func:`config_from` fills the rest with defaults the stage never reads.
    """
    full = config_dict(cfg)
    return {name: full[name] for name in names}


def transient_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: OS-level failures (IO, network file systems, connections), not bad data."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


def make_task_runner(flows: FlowsConfig, address: str | None = None) -> TaskRunner:
    """ThreadPoolTaskRunner (``threads``) or prefect_dask.DaskTaskRunner (``dask``).

    Dask connects to ``address`` (or ``flows.dask_address``) when given, else starts a
    local cluster of ``max_workers`` single-threaded worker processes for the flow run.
    """
    if flows.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=flows.max_workers)
    from prefect_dask import DaskTaskRunner

    address = address or flows.dask_address
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(flows))


def local_cluster_kwargs(flows: FlowsConfig) -> dict[str, Any]:
    # One thread per worker: a shard's torch ops use the worker's cores; several Python
    # threads per process would only contend for them (and for one GPU).
    return {"n_workers": flows.max_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}


@contextlib.contextmanager
def local_dask_cluster(flows: FlowsConfig) -> Iterator[str | None]:
    """Yield the scheduler address the sharded stages should use.

    For ``dask`` without an address, one local cluster serves both sharded stages of the
    pipeline (started once, not per stage flow); otherwise yields the configured address
    (or None for threads).
    """
    if flows.task_runner != "dask" or flows.dask_address:
        yield flows.dask_address
        return
    from distributed import LocalCluster

    with LocalCluster(**local_cluster_kwargs(flows)) as cluster:
        log.info("local Dask cluster at %s (%d workers)", cluster.scheduler_address, flows.max_workers)
        yield cluster.scheduler_address


def stage_result(tasks: Mapping[str, str], **outputs: Any) -> dict[str, Any]:
    """What a stage flow returns: its outputs plus ``tasks`` = {task run name: final state name}."""
    return {**outputs, "tasks": dict(tasks)}


def count_states(tasks: Mapping[str, str]) -> dict[str, int]:
    """{"Completed": n, "Cached": m, ...} over task state names."""
    counts: dict[str, int] = {}
    for name in tasks.values():
        counts[name] = counts.get(name, 0) + 1
    return counts
