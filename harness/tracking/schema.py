"""What a run records: the tags a run is searched by, a config's params and note, provenance."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness
from harness import NUMERICS_VERSION

if TYPE_CHECKING:
    from harness.experiments import RunConfig
    from harness.experiments.schema import RecoverySettings


PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
KIND_TAG = "harness.kind"  # "sweep" (parent) or "config" (child); "sensitivity", "allocate" and "allocation"
HASH_TAG = "harness.config_hash"
CONFIG_ID_TAG = "harness.config_id"
NUMERICS_TAG = "harness.numerics_version"
BASELINE_TAG = "harness.baseline"
BASELINE_ID_TAG = "harness.baseline_id"  # the config id of the baseline a config is compared with
ALLOCATION_METHOD_TAG = "harness.allocation_method"  # allocated, uniform, use_more_bits, random
BUDGET_TAG = "harness.budget_bits"
ERROR_TAG = "harness.error"
PID_TAG = "harness.pid"
HOST_TAG = "harness.host"
TASK_TAG = "harness.ray_task"  # the Ray task a run was made by (retries of a task keep its id)
CLAIM_TAG = "harness.claim"  # the ledger key a config's run was claimed under
LEDGER_TAG = "harness.ledger_run"  # on the claims experiment: the id of its ledger run
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI opens the runs table, not the GenAI overview
# what a LoRA recipe leaves implicit, as harness.recovery trains it
LORA_OPTIMIZER = "AdamW (torch), weight decay 0, linear warmup then constant"
LORA_ADAPTER_DTYPE = "float32"  # peft's autocast_adapter_dtype: a 16-bit base trains float32 adapters
CLAIMS_SUFFIX = ".claims"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # a view of the runs table the UI restores from a URL
VIEW_KEY = "harness-runs"
UI_METRICS = ("bits_per_param", "ppl", "delta_ppl", "kld_mean", "top1_agreement")
UI_CLICKS = (
    "Click the + beside a sweep run to list its configs (MLflow cannot be told by a URL to expand it); on "
    "another page: Runs in the experiment's left bar, then that +."
)
COMMIT_PARAM = "git_commit"
LAYERS_ARTIFACT = "layers.csv"
TOKENS_ARTIFACT = "tokens.npz"  # per scored token: nll, base_nll, kld (float32), top1_match (bool)
REPORT_FOLDER = "report"  # where the tables and plots go among the parent sweep run's artifacts
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "lm_eval",
    "mlflow",
    "numpy",
    "numba",
    "bitsandbytes",
    "torchao",
)


STORE_HELP = "MLflow store (default: $MLFLOW_TRACKING_URI or sqlite ./mlflow.db)"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# ---- what a config's run records ------------------------------------------------------------------------


def config_params(config: RunConfig) -> dict[str, Any]:
    """Every config field as a flat MLflow param, plus the hash, the label and the variant."""
    dq = config.double_quant
    return {
        "config_hash": config.hash,
        "label": config.label,
        "variant": config.variant,
        "model": config.model,
        "format": config.format or "none",
        "block_size": config.block_size if config.block_size is not None else "none",
        "double_quant": dq.text if dq else "off",
        "dq_code": dq.code if dq else "none",
        "dq_block_size": dq.block_size if dq else 0,
        "constant_dtype": config.constant_dtype,
        "model_dtype": config.model_dtype,
        "device": config.device,
        "device_map": "none" if config.device_map is None else config.device_map.text,
        "compute_dtype": config.compute_dtype,
        "rounding": config.rounding,
        "method": config.method,
        "method_settings": json.dumps(config.method_settings.of(config.method), sort_keys=True),
        "overrides": "; ".join(_rule_text(o) for o in config.overrides) or "(none)",
        "layers_include": ",".join(config.include) or "(all Linear in blocks)",
        "layers_exclude": ",".join(config.exclude) or "(none)",
        "corpus": config.data.corpus,
        "calibration_sequences": config.data.calibration_sequences,
        "calibration_length": config.data.calibration_length,
        "protocol": config.eval.protocol,
        "context_length": config.eval.context_length,
        "stride": config.eval.stride,
        "eval_tokens": config.eval.tokens,
        "bos": config.eval.bos,
        "kld": config.eval.kld,
        "kld_reference": config.eval.kld_reference,
        "kld_topk": config.eval.kld_topk,
        "reference_dtype": config.eval.reference_dtype,
        "tasks": ",".join(config.eval.tasks) or "(none)",
        "limit": config.eval.limit,
        "seed": config.seed,
        "memory_convention": "quantized linears as stored; every other parameter at its loaded dtype",
        **(_recipe_params(config.recovery) if config.recovery is not None else {}),
    }


def _recipe_params(recipe: RecoverySettings) -> dict[str, Any]:
    """A LoRA recipe as flat run params, with what ``harness.recovery`` leaves implicit spelled out."""
    return {f"lora_{name}": value for name, value in recipe.model_dump().items()} | {
        "lora_target_modules": ",".join(recipe.target_modules) or "(the quantized layers)",
        "lora_optimizer": LORA_OPTIMIZER,
        "lora_adapter_dtype": LORA_ADAPTER_DTYPE,
    }


def _rule_text(rule: Any) -> str:
    dq = rule.double_quant
    return f"{rule.layers}={rule.format}-b{rule.block_size}{f'-{dq.label}' if dq else ''}"


def config_tags(config: RunConfig) -> dict[str, str]:
    """Tags a config's run is searched by: hash (resume), id (supersede), numerics version, the axes."""
    return _config_tags(config) | {KIND_TAG: "config"}


def allocation_tags(config: RunConfig, method: str, budget: float) -> dict[str, str]:
    """A config evaluated by ``harness allocate``: kept apart from the sweep's configs by its kind."""
    return _config_tags(config) | {
        KIND_TAG: "allocation",
        ALLOCATION_METHOD_TAG: method,
        BUDGET_TAG: str(budget),
    }


def _config_tags(config: RunConfig) -> dict[str, str]:
    dq = "on" if config.double_quant else "off"
    return {
        HASH_TAG: config.hash,
        CONFIG_ID_TAG: config.config_id,
        NUMERICS_TAG: NUMERICS_VERSION,
        BASELINE_TAG: str(config.is_baseline).lower(),
        BASELINE_ID_TAG: config.baseline().config_id,
        "model": config.model,
        "format": config.format or "none",
        "block_size": str(config.block_size if config.block_size is not None else "none"),
        "double_quant": dq,
        "method": config.method,
    }


def config_note(config: RunConfig) -> str:
    """The one line a child run's description says about its config."""
    if config.is_baseline:
        quant = "unquantized baseline"
    else:
        dq = config.double_quant
        quant = (
            f"{config.format} block {config.block_size}, double quant "
            f"{dq.text if dq else 'off'}, constants {config.constant_dtype}, "
            f"compute {config.compute_dtype}, rounding {config.rounding}, method {config.method}"
        )
    kld = (
        f", KLD vs {config.eval.reference_dtype} base ({config.eval.kld_reference})"
        if config.eval.kld
        else ""
    )
    return (
        f"{config.model} in {config.model_dtype} on {config.device}: {quant}; {config.data.corpus}, "
        f"{config.eval.protocol} context {config.eval.context_length}, {config.eval.tokens} tokens{kld}; "
        f"hash {config.hash}"
    )


# ---- what a table reads back ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One FINISHED or unfinished config run as stored: the identity and axes a table sorts, groups and labels
    by, typed, its metrics by name, and every param as logged (what ``--rows``/``--cols`` pivot on).

    The inverse of ``config_params``/``config_tags`` for what the report reads; a param a run made by an
    older harness lacks takes the value that harness meant (fp32, round to nearest)."""

    run_id: str
    status: str
    start_time: int  # ms since the epoch
    config_id: str  # the config alone: a newer run of the same id supersedes an older one
    is_baseline: bool
    baseline_id: str  # the config id of the baseline this config is compared with
    numerics_version: str
    git_commit: str
    label: str
    variant: str
    model: str
    model_dtype: str
    device: str  # where it ran: cpu, cuda or cuda:N
    format: str  # "none" for the baseline
    block_size: str  # an axis label: "64", "channel", "tensor" or "none"
    double_quant: str  # "off" or the DQ spec
    constant_dtype: str
    compute_dtype: str
    rounding: str
    method: str
    corpus: str
    protocol: str
    context_length: int | None
    stride: int | None
    eval_tokens: int | None
    limit: int | None  # lm-eval documents per task; None: all
    lora: Mapping[str, str]  # the LoRA recipe as logged, without its ``lora_`` prefix; empty without one
    params: Mapping[str, str]
    metrics: Mapping[str, float]

    def metric(self, key: str) -> float:
        return self.metrics.get(key, math.nan)

    @classmethod
    def of(cls, run: Any) -> RunRecord:
        """From an MLflow run entity (``MlflowClient.search_runs``)."""
        params, tags = dict(run.data.params), run.data.tags

        def number(name: str) -> int | None:
            text = params.get(name, "None")
            return int(text) if text.lstrip("-").isdigit() else None

        return cls(
            run_id=run.info.run_id,
            status=run.info.status,
            start_time=run.info.start_time,
            config_id=tags.get(CONFIG_ID_TAG) or tags.get(HASH_TAG, ""),
            is_baseline=tags.get(BASELINE_TAG) == "true",
            baseline_id=tags.get(BASELINE_ID_TAG, ""),
            numerics_version=tags.get(NUMERICS_TAG, "unknown"),
            git_commit=params.get(COMMIT_PARAM, "unknown"),
            label=params.get("label", "?"),
            variant=params.get("variant", "?"),
            model=params.get("model", "?"),
            model_dtype=params.get("model_dtype", "float32"),  # runs before the dtype axis were fp32
            device=params.get("device", "cpu"),  # runs before the device setting ran on the CPU
            format=params.get("format", "none"),
            block_size=params.get("block_size", "none"),
            double_quant=params.get("double_quant", "off"),
            constant_dtype=params.get("constant_dtype", "float32"),
            compute_dtype=params.get("compute_dtype", "float32"),
            rounding=params.get("rounding", "ties_down"),
            method=params.get("method", "rtn"),
            corpus=params.get("corpus", "?"),
            protocol=params.get("protocol", "?"),
            context_length=number("context_length"),
            stride=number("stride"),
            eval_tokens=number("eval_tokens"),
            limit=number("limit"),
            lora={k.removeprefix("lora_"): v for k, v in params.items() if k.startswith("lora_")},
            params=params,
            metrics=dict(run.data.metrics),
        )


def sweep_tags() -> dict[str, str]:
    return {KIND_TAG: "sweep", NUMERICS_TAG: NUMERICS_VERSION}


def provenance() -> dict[str, str]:
    """Package versions and the git commit, so a number can be traced to the code that made it."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[f"version.{package}"] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[f"version.{package}"] = "not installed"
    return {**versions, "version.harness": metadata.version("harness"), COMMIT_PARAM: git_commit()}


def git_commit() -> str:
    """HEAD of the checkout the package runs from ("-dirty" with uncommitted changes); "unknown" when the
    package is installed rather than run from a checkout."""
    package = Path(harness.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")) / "harness" != package:
            return "unknown"  # e.g. installed into a venv that lies inside some other repository
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return f"{git('rev-parse', 'HEAD')}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
