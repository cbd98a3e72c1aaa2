"""Where a sweep's configs run: in this process (``LocalExecutor``) or as Ray tasks (``RayExecutor``).

The unit of work is a ``Shard``: configs of one model. ``run_shard`` runs each through ``runner.run_config``
(claim, measure, log), which loads the model once, on the first config claimed.

Ray: one task per shard, ``max_retries`` on worker death. A retry keeps its task id, so the dead attempt's
claims are recognised as dead: their RUNNING runs are marked FAILED with the reason and redone; configs the
dead attempt FINISHED are not. Outcomes come back through a Ray queue, so the driver's bar counts configs
across workers.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numba
import torch

from harness import memory
from harness.data import TokenizedCorpus
from harness.experiments import RunConfig
from harness.runner import Outcome, Target, run_config
from harness.session import ModelSession
from harness.tracking import Owner, Tracker, process_alive

RAY_RETRIES = 3  # retries of a shard whose worker died (a Python exception is a FAILED run, not a retry)
POLL_S = 0.5  # how often the driver collects outcomes while Ray tasks run


@dataclass(frozen=True)
class Shard:
    """Configs of one model in one model dtype (resolved configs: ``RunConfig.resolved``)."""

    model: str
    configs: tuple[RunConfig, ...]
    corpus: TokenizedCorpus | None = None  # the preflight's; None: the session tokenizes the corpus itself


@dataclass(frozen=True)
class SweepContext:
    """What a worker needs to log its shard: small and picklable."""

    tracking_uri: str
    experiment_id: str
    ledger: str  # run id of the experiment's claims ledger
    parent: str  # run id of the sweep's parent run
    provenance: dict[str, str]
    force: bool = False
    threads: int | None = None  # torch threads in the worker; None leaves torch's default


OnOutcome = Callable[[Outcome], None]  # where a shard reports each config's outcome


class Executor(Protocol):
    workers: int  # how many shards each model's configs are split into

    def run(self, shards: Sequence[Shard], context: SweepContext, report: OnOutcome) -> None: ...


def set_threads(threads: int) -> None:
    """Threads for torch and for the numba kernels. Both run on OpenMP here, and a numba parallel kernel sets
    the calling thread's OpenMP thread count to numba's own, which torch then uses too."""
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # first: it starts numba's OpenMP
    torch.set_num_threads(threads)


def run_shard(
    context: SweepContext,
    shard: Shard,
    report: OnOutcome,
    task: str = "",
    alive: Callable[[Owner], bool] = process_alive,
) -> None:
    """Run each config of the shard (``runner.run_config``); the model loads on the first config claimed, and
    a model that cannot be prepared fails that config and leaves the shard's others not run."""
    if context.threads:
        set_threads(context.threads)
    tracker = Tracker.of(context.tracking_uri)
    target = Target(
        tracker,
        context.experiment_id,
        context.ledger,
        tracker.attach(context.parent),
        Owner.here(context.parent, task),
        context.provenance,
        context.force,
        alive,
    )

    def prepare() -> ModelSession:
        prepared = ModelSession.prepare(shard.configs[0], shard.corpus)
        report(Outcome("", shard.model, "prepared"))  # the bar's rate counts configs, not the load
        return prepared

    session = functools.cache(prepare)
    for i, config in enumerate(memory.collecting(shard.configs)):
        outcome = run_config(target, session, config)
        report(outcome)
        if outcome.base_failed:
            for other in shard.configs[i + 1 :]:
                report(
                    Outcome(other.hash, other.label, "failed", f"not run: {shard.model}'s base model failed")
                )
            return


class LocalExecutor:
    """Runs each shard in this process, one after another."""

    workers = 1

    def run(self, shards: Sequence[Shard], context: SweepContext, report: OnOutcome) -> None:
        for shard in shards:
            run_shard(context, shard, report)


@dataclass
class RayExecutor:
    """One Ray task per shard on a Ray cluster: a local one started for the sweep (``address`` None) or
    ``auto`` / ``ray://HOST:PORT``. Each task gets ``cores // workers`` CPUs and as many torch threads, and
    one GPU when the cluster has GPUs (Ray sets the task's ``CUDA_VISIBLE_DEVICES``)."""

    address: str | None = None
    workers: int = 2

    def run(self, shards: Sequence[Shard], context: SweepContext, report: OnOutcome) -> None:
        import ray
        from ray.util.queue import Queue

        started = not ray.is_initialized()
        if started:
            local = self.address is None
            ray.init(
                address=self.address,
                num_cpus=os.cpu_count() if local else None,
                object_store_memory=256 * 2**20 if local else None,  # configs and outcomes only
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )
        try:
            node_gpus = [node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]]
            spread = any(config.device_map is not None for shard in shards for config in shard.configs)
            resources = task_resources(ray.cluster_resources(), self.workers, node_gpus if spread else None)
            outcomes = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(_ray_shard).options(**resources, max_retries=RAY_RETRIES)
            context = replace(context, threads=int(resources["num_cpus"]))
            pending = [task.remote(context, shard, outcomes) for shard in shards]
            while pending:
                done, pending = ray.wait(pending, timeout=POLL_S)
                for outcome in outcomes.get_nowait_batch(outcomes.qsize()):
                    report(outcome)
                ray.get(done)  # a shard that failed all its retries raises here
            time.sleep(POLL_S)  # the queue is an actor: outcomes put just before a task ended may trail it
            for outcome in outcomes.get_nowait_batch(outcomes.qsize()):
                report(outcome)
        finally:
            if started:
                ray.shutdown()


def task_resources(
    cluster: dict[str, float], workers: int, node_gpus: list[float] | None = None
) -> dict[str, int]:
    """What each shard's task asks of the cluster: ``cores // workers`` CPUs, and where the cluster has GPUs
    one of them, or with ``node_gpus`` (the GPUs of each node, for models spread by a device map) a whole
    node's: as many as the GPU node with the fewest has, so that every GPU node can take a task. None on a
    CPU cluster, so that tasks are not held waiting for a device."""
    gpus = 0
    if cluster.get("GPU", 0) >= 1:
        gpus = int(min((g for g in node_gpus or () if g >= 1), default=1))
    return {"num_cpus": max(1, int(cluster.get("CPU", 1)) // workers), "num_gpus": gpus}


def _ray_shard(context: SweepContext, shard: Shard, outcomes: object) -> None:
    """A Ray task: ``run_shard`` with the task id as part of the owner, and outcomes sent to the driver."""
    import ray

    task = ray.get_runtime_context().get_task_id() or ""

    def alive(owner: Owner) -> bool:
        if owner.task == task:  # an earlier attempt of this very task: Ray retries only once it died
            return False
        return process_alive(owner)

    run_shard(context, shard, outcomes.put, task, alive)  # type: ignore[attr-defined]
