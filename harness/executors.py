"""Where a sweep's configs run: in this process (``LocalExecutor``) or as Ray tasks (``RayExecutor``).

The unit of work is a ``Shard``: configs of one model. ``run_shard`` loads the model once (when it has
anything to run), prepares its ``ModelSession``, and for each config claims it in the experiment's ledger,
measures it and logs it as a child of the sweep's parent run. A config someone else holds (another sweep, a
live earlier attempt) or that is already FINISHED is skipped, so every config runs once.

Ray: one task per shard, ``max_retries`` on worker death. A retry keeps its task id, so the dead attempt's
claims are recognised as dead: their RUNNING runs are marked FAILED with the reason and redone; configs the
dead attempt FINISHED are not. Outcomes come back through a Ray queue, so the driver's bar counts configs
across workers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numba
import torch

from harness import memory
from harness.evaluate.perplexity import NonFiniteError
from harness.experiments import RunConfig
from harness.measure import ModelSession, measure
from harness.tracking import (
    CLAIM_TAG,
    NOTE_TAG,
    TASK_TAG,
    Owner,
    Run,
    Tracker,
    config_note,
    config_params,
    config_tags,
    process_alive,
)

RAY_RETRIES = 3  # retries of a shard whose worker died (a Python exception is a FAILED run, not a retry)
POLL_S = 0.5  # how often the driver collects outcomes while Ray tasks run


@dataclass(frozen=True)
class Shard:
    """Configs of one model in one model dtype (resolved configs: ``RunConfig.resolved``)."""

    model: str
    configs: tuple[RunConfig, ...]


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


@dataclass(frozen=True)
class Outcome:
    config_hash: str
    label: str
    status: Literal["finished", "failed", "skipped", "prepared"]  # prepared: the shard's model is ready
    detail: str = ""  # the error of a failed config, or why one was skipped
    eval_s: float = 0.0
    warnings: tuple[str, ...] = field(default_factory=tuple)


Report = Callable[[Outcome], None]


class Executor(Protocol):
    workers: int  # how many shards each model's configs are split into

    def run(self, shards: Sequence[Shard], context: SweepContext, report: Report) -> None: ...


def set_threads(threads: int) -> None:
    """Threads for torch and for the numba kernels. Both run on OpenMP here, and a numba parallel kernel sets
    the calling thread's OpenMP thread count to numba's own, which torch then uses too."""
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # first: it starts numba's OpenMP
    torch.set_num_threads(threads)


def run_shard(
    context: SweepContext,
    shard: Shard,
    report: Report,
    task: str = "",
    alive: Callable[[Owner], bool] = process_alive,
) -> None:
    """Claim, measure and log each config of the shard; the model loads on the first config claimed."""
    if context.threads:
        set_threads(context.threads)
    tracker = Tracker(context.tracking_uri)
    parent = tracker.attach(context.parent)
    owner = Owner.here(context.parent, task)
    session: ModelSession | None = None
    for config in shard.configs:
        claim = tracker.claim(
            context.ledger, context.experiment_id, config.hash, owner, alive, redo_finished=context.force
        )
        if claim is None:
            report(Outcome(config.hash, config.label, "skipped", "finished or running elsewhere"))
            continue
        if session is None:
            try:
                session = ModelSession.prepare(shard.configs[0])
            except NonFiniteError as exc:  # the base model itself: nothing can be measured against it
                _base_failed(tracker, context, parent, shard, config, claim, exc, report)
                return
            report(Outcome("", shard.model, "prepared"))
        tags = {**config_tags(config), CLAIM_TAG: claim, NOTE_TAG: config_note(config)}
        if task:
            tags[TASK_TAG] = task
        try:
            with tracker.run(context.experiment_id, config.label, tags, parent=parent) as run:
                threads = {"torch_threads": torch.get_num_threads()}  # BLAS sums depend on it
                run.log_params({**config_params(config), **session.params, **context.provenance, **threads})
                measurement = measure(session, config)
                run.log_measurement(measurement)
        except Exception as exc:  # recorded as a FAILED run by tracker.run; the shard goes on
            report(Outcome(config.hash, config.label, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        done = Outcome(config.hash, config.label, "finished", "", measurement.eval_s, measurement.warnings)
        report(done)


def _base_failed(
    tracker: Tracker,
    context: SweepContext,
    parent: Run,
    shard: Shard,
    config: RunConfig,
    claim: str,
    exc: NonFiniteError,
    report: Report,
) -> None:
    """The claimed config becomes a FAILED run that holds the base model's error; the shard's configs after it
    are not run."""
    tags = {**config_tags(config), CLAIM_TAG: claim, NOTE_TAG: config_note(config)}
    with (
        contextlib.suppress(NonFiniteError),
        tracker.run(context.experiment_id, config.label, tags, parent=parent) as run,
    ):
        run.log_params({**config_params(config), **context.provenance})
        raise exc
    report(Outcome(config.hash, config.label, "failed", f"{type(exc).__name__}: {exc}"))
    rest = shard.configs[shard.configs.index(config) + 1 :]
    for other in rest:
        report(Outcome(other.hash, other.label, "failed", f"not run: {shard.model}'s base model failed"))


class LocalExecutor:
    """Runs each shard in this process, one after another."""

    workers = 1

    def run(self, shards: Sequence[Shard], context: SweepContext, report: Report) -> None:
        for shard in shards:
            run_shard(context, shard, report)


@dataclass
class RayExecutor:
    """One Ray task per shard on a Ray cluster: a local one started for the sweep (``address`` None) or
    ``auto`` / ``ray://HOST:PORT``. Each task gets ``cores // workers`` CPUs and as many torch threads."""

    address: str | None = None
    workers: int = 2

    def run(self, shards: Sequence[Shard], context: SweepContext, report: Report) -> None:
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
            cores = int(ray.cluster_resources().get("CPU", 1))
            threads = max(1, cores // self.workers)
            outcomes = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(_ray_shard).options(num_cpus=threads, max_retries=RAY_RETRIES)
            context = replace(context, threads=threads)
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


def _ray_shard(context: SweepContext, shard: Shard, outcomes: object) -> None:
    """A Ray task: ``run_shard`` with the task id as part of the owner, and outcomes sent to the driver."""
    import ray

    memory.bound_heap()
    task = ray.get_runtime_context().get_task_id() or ""

    def alive(owner: Owner) -> bool:
        if owner.task == task:  # an earlier attempt of this very task: Ray retries only once it died
            return False
        return process_alive(owner)

    run_shard(context, shard, outcomes.put, task, alive)  # type: ignore[attr-defined]
