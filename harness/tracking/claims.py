"""Claims: before a config runs, its runner claims it in the experiment's ledger."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.liveness import pid_alive
from harness.tracking.schema import CLAIM_TAG, CLAIMS_SUFFIX, KIND_TAG, LEDGER_TAG

if TYPE_CHECKING:
    from harness.tracking.store import Tracker


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: a process on a host, in a Ray task when run by one, for one sweep (its parent run).

    ``nonce`` tells two attempts of one Ray task apart even when a retry reuses the pid."""

    host: str
    pid: int
    task: str  # "" outside Ray
    sweep: str
    nonce: str

    @classmethod
    def here(cls, sweep: str, task: str = "") -> Owner:
        return cls(socket.gethostname(), os.getpid(), task, sweep, uuid.uuid4().hex[:8])

    def encode(self) -> str:
        return " ".join((self.host, str(self.pid), self.task or "-", self.sweep, self.nonce))

    @classmethod
    def decode(cls, value: str) -> Owner:
        host, pid, task, sweep, nonce = value.split(" ")
        return cls(host, int(pid), "" if task == "-" else task, sweep, nonce)

    def describe(self) -> str:
        task = f"Ray task {self.task} " if self.task else ""
        return f"{task}process {self.pid} on {self.host}"


def process_alive(owner: Owner) -> bool:
    """Whether the owner may still be running: dead only when it is a process of this host that is gone.
    An owner on another host is presumed alive (a distributed executor knows more, see ``executors``)."""
    return owner.host != socket.gethostname() or pid_alive(owner.pid)


def ledger(tracker: Tracker, name: str) -> str:
    """The id of the claims ledger of experiment ``name``, made once whatever the races: it is built in
    an experiment of a unique temporary name and appears under ``NAME.claims`` by a rename, which only
    one process can win (names are unique); a loser deletes its copy and uses the winner's."""
    from mlflow.exceptions import MlflowException

    claims = name + CLAIMS_SUFFIX
    found = tracker.client.get_experiment_by_name(claims)
    if found is None:
        staging = f"{claims}.{uuid.uuid4().hex}"
        staging_id = tracker.client.create_experiment(staging, tracker.artifact_location(staging))
        ledger = tracker.client.create_run(staging_id, run_name="claims", tags={KIND_TAG: "claims"})
        tracker.client.set_terminated(ledger.info.run_id, "FINISHED")  # a record, never a run at work
        tracker.client.set_experiment_tag(staging_id, LEDGER_TAG, ledger.info.run_id)
        try:
            tracker.client.rename_experiment(staging_id, claims)
        except MlflowException:
            tracker.client.delete_experiment(staging_id)
        found = tracker.client.get_experiment_by_name(claims)
        if found is None:
            raise RuntimeError(f"the claims experiment {claims!r} could not be created")
    ledger_id = found.tags[LEDGER_TAG]
    if tracker.client.get_run(ledger_id).info.status == "RUNNING":  # a store made before ledgers ended
        tracker.client.set_terminated(ledger_id, "FINISHED")
    return ledger_id


def claim(
    tracker: Tracker,
    ledger: str,
    experiment_id: str,
    config_hash: str,
    owner: Owner,
    alive: Callable[[Owner], bool] = process_alive,
    redo_finished: bool = False,
) -> str | None:
    """Claim a config for ``owner``: the claim's key, or None when the config is done (a FINISHED run;
    with ``redo_finished``, one of this same sweep) or held by an owner that is alive.

    A claim's RUNNING run whose owner died is marked FAILED on the way, with the reason."""
    from mlflow.exceptions import MlflowException

    prefix = f"claim.{config_hash}."
    while True:
        claims = {
            int(k.removeprefix(prefix)): v
            for k, v in tracker.client.get_run(ledger).data.params.items()
            if k.startswith(prefix)
        }
        generation = max(claims, default=-1)
        if generation >= 0:
            key, holder = f"{prefix}{generation}", Owner.decode(claims[generation])
            made = tracker.search(experiment_id, f"tags.`{CLAIM_TAG}` = '{key}'")
            statuses = {r.info.status: r.info.run_id for r in made}
            if "FINISHED" in statuses:
                if not redo_finished or holder.sweep == owner.sweep:
                    return None
            elif "RUNNING" in statuses or not statuses:  # at work, or about to make its run
                if alive(holder):
                    return None
                if "RUNNING" in statuses:
                    tracker.fail(statuses["RUNNING"], f"worker died: {holder.describe()}")
        key = f"{prefix}{generation + 1}"
        with contextlib.suppress(MlflowException):  # lost the race: the key holds the winner
            tracker.client.log_param(ledger, key, owner.encode())
        if tracker.client.get_run(ledger).data.params.get(key) == owner.encode():
            return key
