"""The one package that talks to MLflow: the run schema, experiments, parent/child runs, their end states, and
reading back.

Store: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite ``mlflow.db`` in the working directory
with artifacts in ``mlartifacts/`` beside it (MLflow 3's default layout; a server URI works the same way).

The run schema. A sweep is a parent run (``harness.kind=sweep``); each config is a child run
(``harness.kind=config``) tagged with its config hash (config + numerics version: what resume matches), its
config id (the config alone: what supersedes in a table), the numerics version and the baseline flag. Its
params are the config's fields flattened (``config_params``), the session's facts and the provenance; its
metrics are declared in ``harness.metrics``, and nothing undeclared is logged.

Every run ends in a terminal state: FINISHED, FAILED (the exception is recorded in the ``harness.error``
tag) or KILLED (Ctrl-C / SIGTERM). A run left RUNNING by a process that died (kill -9) is recognised by
its ``harness.pid``/``harness.host`` tags and marked FAILED by the next sweep (``reap_stale``).

Claims: before a config runs, its runner claims it in the experiment's ledger, a bookkeeping run in the
experiment ``NAME.claims`` whose params are the claims (``claim.HASH.N`` = the owner). The ledger is FINISHED
from the moment it is made (MLflow logs params to a finished run), so no run is ever shown at work that is
not. MLflow params are
write-once, so of two runners logging the same key one wins, whatever the store (sqlite, a server), and only
the winner runs the config. A claim whose run FINISHED means done; a claim whose owner (host, pid, Ray task)
died, or whose run FAILED or was KILLED, is superseded by the next generation ``N+1``.
"""

from harness.tracking.claims import Owner, claim, ledger, process_alive
from harness.tracking.schema import (
    BASELINE_ID_TAG,
    BASELINE_TAG,
    CLAIM_TAG,
    COMMIT_PARAM,
    CONFIG_ID_TAG,
    ERROR_TAG,
    HASH_TAG,
    KIND_TAG,
    LAYERS_ARTIFACT,
    NOTE_TAG,
    NUMERICS_TAG,
    STORE_HELP,
    TASK_TAG,
    TOKENS_ARTIFACT,
    RunRecord,
    allocation_tags,
    config_note,
    config_params,
    config_tags,
    provenance,
    sweep_tags,
)
from harness.tracking.store import Run, Tracker, read_tokens
from harness.tracking.ui import is_server_process, serve_ui, server_command, wait_until_serving

__all__ = [
    "BASELINE_ID_TAG",
    "BASELINE_TAG",
    "CLAIM_TAG",
    "COMMIT_PARAM",
    "CONFIG_ID_TAG",
    "ERROR_TAG",
    "HASH_TAG",
    "KIND_TAG",
    "LAYERS_ARTIFACT",
    "NOTE_TAG",
    "NUMERICS_TAG",
    "STORE_HELP",
    "TASK_TAG",
    "TOKENS_ARTIFACT",
    "Owner",
    "Run",
    "RunRecord",
    "Tracker",
    "allocation_tags",
    "claim",
    "config_note",
    "config_params",
    "config_tags",
    "is_server_process",
    "ledger",
    "process_alive",
    "provenance",
    "read_tokens",
    "serve_ui",
    "server_command",
    "sweep_tags",
    "wait_until_serving",
]
