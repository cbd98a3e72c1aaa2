"""The one path that runs a config: claim it in the experiment's ledger, measure it, log it as a child of its
parent run, and release it (the run's terminal state ends the claim: FINISHED means done, anything else is
superseded by the next claim). A sweep's executors and ``harness allocate``'s validation runs all come here.

A config someone else holds (another sweep, a live earlier attempt) or that is already FINISHED is skipped,
so every config runs once. The model session is prepared on the first config claimed: a shard whose configs
are all done elsewhere never loads its model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from harness.experiments import RunConfig
from harness.measure import measure
from harness.session import ModelSession
from harness.tracking import (
    CLAIM_TAG,
    NOTE_TAG,
    TASK_TAG,
    Owner,
    Run,
    Tracker,
    claim,
    config_note,
    config_params,
    config_tags,
    process_alive,
)


@dataclass(frozen=True)
class Outcome:
    config_hash: str
    label: str
    status: Literal["finished", "failed", "skipped", "prepared"]  # prepared: the shard's model is ready
    detail: str = ""  # the error of a failed config, or why one was skipped
    eval_s: float = 0.0
    warnings: tuple[str, ...] = field(default_factory=tuple)
    metrics: Mapping[str, float] = field(default_factory=dict)  # a finished config's logged metrics
    kld: np.ndarray | None = None  # a finished config's per-token KLD, when it measured one
    base_failed: bool = False  # the model could not be prepared (loaded, or its base reference made)


@dataclass(frozen=True)
class Target:
    """Where and as whom configs run: the store, the experiment and its ledger, the parent run, the owner."""

    tracker: Tracker
    experiment_id: str
    ledger: str  # run id of the experiment's claims ledger
    parent: Run
    owner: Owner
    provenance: Mapping[str, str]
    redo_finished: bool = False  # --force: a config FINISHED by an earlier sweep runs again
    alive: Callable[[Owner], bool] = process_alive


def run_config(
    target: Target,
    session: Callable[[], ModelSession],
    config: RunConfig,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    claim_as: str = "",
) -> Outcome:
    """Claim, measure and log one config. ``session`` is called only once the config is claimed, so a shard
    with nothing left to run loads no model (``functools.cache`` makes it once for a shard). ``tags`` replace
    the sweep's config tags (an allocation's run says its method); ``metrics`` are logged with the measured
    ones; ``claim_as`` keeps a kind of run's claims apart from a sweep's, which may hold a config of the same
    hash. A config that raises is a FAILED run with its error, and its outcome says so: the caller goes on."""
    key = claim(
        target.tracker,
        target.ledger,
        target.experiment_id,
        f"{claim_as}{config.hash}",
        target.owner,
        target.alive,
        redo_finished=target.redo_finished,
    )
    if key is None:
        return Outcome(config.hash, config.label, "skipped", "finished or running elsewhere")
    run_tags = {**(tags or config_tags(config)), CLAIM_TAG: key, NOTE_TAG: config_note(config)}
    if target.owner.task:
        run_tags[TASK_TAG] = target.owner.task
    preparing = False
    try:
        with target.tracker.run(target.experiment_id, config.label, run_tags, parent=target.parent) as run:
            run.log_params({**config_params(config), **target.provenance})
            preparing = True  # inside the run: a model that cannot be loaded or measured fails this config
            prepared = session()
            preparing = False
            threads = {"torch_threads": torch.get_num_threads()}  # BLAS sums depend on it
            run.log_params({**prepared.params, **threads})
            measurement = measure(prepared, config)
            if metrics:
                measurement = replace(measurement, metrics={**measurement.metrics, **metrics})
            run.log_measurement(measurement)
    except Exception as exc:  # recorded as a FAILED run by tracker.run
        detail = f"{type(exc).__name__}: {exc}"
        return Outcome(config.hash, config.label, "failed", detail, base_failed=preparing)
    kld = measurement.per_token.get("kld")
    return Outcome(
        config.hash,
        config.label,
        "finished",
        eval_s=measurement.eval_s,
        warnings=measurement.warnings,
        metrics=measurement.metrics,
        kld=None if kld is None else np.asarray(kld, np.float64),
    )
