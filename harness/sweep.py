"""The sweep runner: each model loads once; each config is quantized, measured, evaluated, logged, restored.

Per model: load, tokenise the corpus (disjoint calibration and evaluation documents), capture calibration
inputs of every chosen layer, and build the base model's reference statistics (once; cached on disk). Then
the unquantized baseline, then each config. A config whose hash already has a FINISHED run is skipped
(``--force`` redoes it); one that raises becomes a FAILED run with its error, and the sweep goes on; Ctrl-C or
SIGTERM marks the run in progress KILLED; a run left RUNNING by a killed process is marked FAILED and redone.

Work reaches an ``Executor`` one model group at a time: ``LocalExecutor`` runs them in this process; a
distributed executor would ship each group (model + configs + tracking URI) to a worker.
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol

import torch
from tqdm import tqdm

from harness import assets
from harness.data import token_splits
from harness.evaluate.divergence import BaseReference, evaluate_against
from harness.evaluate.perplexity import PerplexityProtocol, PerplexityResult, perplexity, text_counts
from harness.evaluate.tasks import run_tasks
from harness.experiments import Experiment, RunConfig
from harness.metrics import PROJECTION_PARAMS
from harness.models import (
    LoadedModel,
    aggregate,
    apply,
    capture_inputs,
    discover_layers,
    layer_table,
    load_model,
    restore,
    snapshot,
)
from harness.plots import layer_error_plot
from harness.tracking import HASH_TAG, KIND_TAG, PROJECT_DIR, Run, Tracker

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


@dataclass(frozen=True)
class SweepOptions:
    force: bool = False
    limit: int | None = None  # run only the first N configs
    tracking_uri: str | None = None
    progress: bool = True


@dataclass
class SweepSummary:
    experiment: str
    tracking_uri: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    eval_s: float = 0.0  # forward passes of the evaluation, with their ppl/KLD reductions and lm-eval

    def describe(self) -> str:
        lines = [
            f"{self.experiment}: {len(self.finished)} finished, {len(self.skipped)} skipped (FINISHED "
            f"before), {len(self.failed)} failed in {self.wall_s:.0f} s; {self.eval_share:.0%} of it "
            f"evaluating (forward passes + ppl/KLD reductions); store: {self.tracking_uri}"
        ]
        if self.reaped:
            lines.append(f"marked {len(self.reaped)} stale RUNNING run(s) FAILED (their process had died)")
        lines += [f"FAILED {label}: {error}" for label, error in self.failed]
        return "\n".join(lines)

    @property
    def eval_share(self) -> float:
        return self.eval_s / self.wall_s if self.wall_s else 0.0


class Executor(Protocol):
    def run(self, groups: Sequence[ModelGroup], work: Callable[[ModelGroup], None]) -> None: ...


class LocalExecutor:
    """Runs each model group in this process, one after another."""

    def run(self, groups: Sequence[ModelGroup], work: Callable[[ModelGroup], None]) -> None:
        for group in groups:
            work(group)


@dataclass(frozen=True)
class ModelGroup:
    model: str
    configs: tuple[RunConfig, ...]  # the baseline first


def run_sweep(
    experiment: Experiment, options: SweepOptions, executor: Executor | None = None
) -> SweepSummary:
    tracker = Tracker(options.tracking_uri)
    experiment_id = tracker.experiment_id(experiment.name)
    summary = SweepSummary(experiment.name, tracker.uri, reaped=tracker.reap_stale(experiment_id))
    done = set() if options.force else tracker.finished_hashes(experiment_id)
    selected = list(experiment.configs[: options.limit])
    groups = []
    for model in dict.fromkeys(c.model for c in selected):
        configs = [c for c in selected if c.model == model]
        ordered = [configs[0].baseline(), *configs]
        summary.skipped += [c.label for c in ordered if c.hash in done]
        todo = tuple(c for c in ordered if c.hash not in done)
        if todo:
            groups.append(ModelGroup(model, todo))
    total = sum(len(g.configs) for g in groups)
    if not total:
        return summary
    start = time.perf_counter()
    with (
        _sigterm_as_interrupt(),
        tracker.run(experiment_id, f"sweep {experiment.name}", {KIND_TAG: "sweep"}) as parent,
    ):
        parent.log_params({"experiment": experiment.name, "n_configs": total, **provenance()})
        parent.log_artifact(experiment.path)
        bar = tqdm(total=total, desc=f"sweep {experiment.name}", unit="config", disable=not options.progress)
        runner = GroupRunner(tracker, experiment_id, parent, summary, bar, provenance())
        (executor or LocalExecutor()).run(groups, runner)
        bar.close()
        summary.wall_s = time.perf_counter() - start
        parent.log_metrics({"sweep_wall_s": summary.wall_s, "eval_share": summary.eval_share})
    return summary


class GroupRunner:
    """Everything done for one model: load once, prepare once, then one child run per config."""

    def __init__(
        self,
        tracker: Tracker,
        experiment_id: str,
        parent: Run,
        summary: SweepSummary,
        bar: tqdm,
        provenance: dict[str, str],
    ) -> None:
        self.tracker, self.experiment_id, self.parent = tracker, experiment_id, parent
        self.summary, self.bar, self.provenance = summary, bar, provenance

    def __call__(self, group: ModelGroup) -> None:
        first = group.configs[0]
        self.bar.set_postfix_str(f"loading {group.model}")
        session = ModelSession.prepare(load_model(group.model), first)
        if not first.is_baseline:  # the baseline ran in an earlier sweep: Δ is taken against its logged ppl
            baseline = first.baseline()
            session.baseline_ppl = self.tracker.finished_metric(self.experiment_id, baseline.hash, "ppl")
        for config in group.configs:
            self.bar.set_postfix_str(config.label)
            tags = {KIND_TAG: "config", HASH_TAG: config.hash, "model": config.model, **_axis_tags(config)}
            try:
                with self.tracker.run(self.experiment_id, config.label, tags, parent=self.parent) as run:
                    run.log_params({**config_params(config), **session.params, **self.provenance})
                    self.summary.eval_s += session.measure(config, run)
                self.summary.finished.append(config.label)
            except Exception as exc:  # recorded as a FAILED run by tracker.run; the sweep goes on
                self.summary.failed.append((config.label, f"{type(exc).__name__}: {exc}"))
            self.bar.update()


@dataclass
class ModelSession:
    """A loaded model with what every config of the group shares: layers, data, base statistics."""

    loaded: LoadedModel
    pristine: Any
    calibration: dict[str, torch.Tensor]
    tokens: torch.Tensor  # the evaluation stream (1, N)
    protocol: PerplexityProtocol
    reference: BaseReference | None  # None when the experiment turns KLD off
    params: dict[str, Any]
    baseline_ppl: float = math.nan
    warned: set[str] = field(default_factory=set)  # source-precision warnings already shown

    @classmethod
    def prepare(cls, loaded: LoadedModel, config: RunConfig) -> ModelSession:
        torch.manual_seed(config.seed)
        layers = discover_layers(loaded, list(config.include) or None, list(config.exclude) or None)
        splits = token_splits(
            config.data.corpus,
            loaded.tokenizer,
            calibration_sequences=config.data.calibration_sequences,
            calibration_length=config.data.calibration_length,
            eval_tokens=config.eval.tokens,
            add_bos=config.eval.bos,
        )
        calibration = (
            capture_inputs(loaded.model, layers, splits.calibration, seed=config.seed)
            if config.data.calibration_sequences
            else {}
        )
        protocol = PerplexityProtocol(config.eval.protocol, config.eval.context_length, config.eval.stride)
        text_bytes, text_words = text_counts(loaded.tokenizer, splits.evaluation)
        reference = None
        if config.eval.kld:
            reference = BaseReference.build(
                loaded.model,
                splits.evaluation,
                protocol,
                cache_dir=assets.cache_dir() / "reference",
                key=f"{loaded.source}|{config.data.corpus}",
                text_bytes=text_bytes,
                text_words=text_words,
                bos_token_id=loaded.tokenizer.bos_token_id if config.eval.bos else None,
                batch_size=config.eval.batch_size,
                progress=False,
            )
        total_params = sum(p.numel() for p in loaded.model.parameters())
        params = {
            "text_bytes": text_bytes,
            "text_words": text_words,
            "n_layers_quantized": len(layers),
            "params_quantized": sum(info.numel for info in layers),
            "params_total": total_params,
            "asset": _asset_pin(config.model),
            "n_docs_calibration": splits.n_docs_cal,
            "n_docs_eval": splits.n_docs_eval,
        }
        pristine = snapshot(loaded.model, layers)
        return cls(loaded, pristine, calibration, splits.evaluation, protocol, reference, params)

    def measure(self, config: RunConfig, run: Run) -> float:
        """Quantize, measure, evaluate and log one config; returns the seconds spent evaluating."""
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        quant = config.quant_config()
        metrics: dict[str, float] = {}
        with self._applied(config) as result:
            quantize_s = time.perf_counter() - start
            if result is not None:
                table = layer_table(result)
                metrics |= self._weight_metrics(aggregate(table))
                run.log_table(table, "layers.csv")
                figure = layer_error_plot(table)
                run.client.log_figure(run.id, figure, "layer_nmse.png")
            else:
                metrics |= self._baseline_memory()
            eval_start = time.perf_counter()
            ppl = self._evaluate(config, metrics)
            if config.eval.tasks:
                accuracies = run_tasks(
                    self.loaded.model,
                    self.loaded.tokenizer,
                    list(config.eval.tasks),
                    limit=config.eval.limit,
                    batch_size=config.eval.batch_size,
                )
                for task, values in accuracies.items():
                    metrics[f"acc_{task}"] = values["acc"]
                    metrics[f"acc_{task}_stderr"] = values["acc_stderr"]
            eval_s = time.perf_counter() - eval_start
        if quant is None:
            self.baseline_ppl = ppl.ppl
        metrics |= {
            "ppl": ppl.ppl,
            "delta_ppl": ppl.ppl - self.baseline_ppl,
            "bits_per_byte": ppl.bits_per_byte,
            "word_ppl": ppl.word_perplexity,
            "time_quantize_s": quantize_s,
            "time_eval_s": eval_s,
            "time_total_s": time.perf_counter() - start,
        }
        run.log_metrics(metrics)
        return eval_s

    def _evaluate(self, config: RunConfig, metrics: dict[str, float]) -> PerplexityResult:
        """Perplexity, and KLD/top-1 against the base from the same forward passes when KLD is on."""
        if self.reference is None:
            return perplexity(
                self.loaded.model,
                self.tokens,
                self.protocol,
                text_bytes=int(self.params["text_bytes"]),
                text_words=int(self.params["text_words"]),
                bos_token_id=self.loaded.tokenizer.bos_token_id if config.eval.bos else None,
                batch_size=config.eval.batch_size,
                progress=False,
            )
        ppl, divergence = evaluate_against(self.loaded.model, self.reference, progress=False)
        metrics |= {
            "kld_mean": divergence.kld_mean,
            "kld_p99": divergence.kld_p99,
            "top1_agreement": divergence.top1_agreement,
        }
        return ppl

    @contextmanager
    def _applied(self, config: RunConfig) -> Iterator[Any]:
        quant = config.quant_config()
        if quant is None:
            yield None
            return
        # apply() warns on every call; a sweep says each thing once (libraries that touch the warning filters
        # reset Python's own once-per-location registry).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = apply(self.pristine, quant, COMPUTE_DTYPES[config.compute_dtype], self.calibration)
        try:
            for message in set(result.warnings) - self.warned:
                self.warned.add(message)
                warnings.warn(message, stacklevel=1)
            yield result
        finally:
            restore(self.pristine)

    def _weight_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Storage and error of the quantized layers; memory counts every other parameter as loaded (fp32)."""
        rest = self.params["params_total"] - totals["params"]
        memory = totals["stored_bytes"] + rest * self._element_size()
        metrics = {
            "bits_per_param": totals["bits_per_param"],
            "stored_bytes": totals["stored_bytes"],
            "model_memory_bytes": memory,
            "nmse": totals["nmse_weighted"],
            "rel_fro": totals["rel_fro_weighted"],
            "sqnr_db": -10 * math.log10(totals["nmse_weighted"]) if totals["nmse_weighted"] > 0 else math.inf,
            "cosine": totals["cosine_weighted"],
            "output_rel_err": totals["output_rel_err_weighted"],
        }
        for label, count in PROJECTION_PARAMS.items():
            metrics[f"projected_{label}_GB"] = count * totals["bits_per_param"] / 8 / 1e9
        return metrics

    def _baseline_memory(self) -> dict[str, float]:
        bits = 8 * self._element_size()
        metrics = {
            "bits_per_param": float(bits),
            "model_memory_bytes": self.params["params_total"] * bits / 8,
        }
        for label, count in PROJECTION_PARAMS.items():
            metrics[f"projected_{label}_GB"] = count * bits / 8 / 1e9
        return metrics

    def _element_size(self) -> int:
        return next(self.loaded.model.parameters()).element_size()


def config_params(config: RunConfig) -> dict[str, Any]:
    """Every config field as a flat MLflow param, plus the hash and a short label."""
    dq = config.double_quant
    return {
        "config_hash": config.hash,
        "label": config.label,
        "model": config.model,
        "format": config.format or "none",
        "block_size": _block_label(config),
        "double_quant": f"{dq.code}/{dq.block_size}" if dq else "off",
        "dq_code": dq.code if dq else "none",
        "dq_block_size": dq.block_size if dq else 0,
        "constant_dtype": config.constant_dtype,
        "compute_dtype": config.compute_dtype,
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
        "tasks": ",".join(config.eval.tasks) or "(none)",
        "limit": config.eval.limit,
        "seed": config.seed,
        "memory_convention": "quantized linears as stored; every other parameter at its loaded dtype",
    }


def provenance() -> dict[str, str]:
    """Package versions and the git commit, so a number can be traced to the code that made it."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[f"version.{package}"] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[f"version.{package}"] = "not installed"
    return {**versions, "git_commit": git_commit()}


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{'-dirty' if dirty else ''}"


def _axis_tags(config: RunConfig) -> dict[str, str]:
    if config.is_baseline:
        return {"format": "none", "block_size": "none", "double_quant": "off", "harness.baseline": "true"}
    dq = "on" if config.double_quant else "off"
    return {"format": str(config.format), "block_size": _block_label(config), "double_quant": dq}


def _block_label(config: RunConfig) -> str:
    """The block size that applies: the format's own when the config leaves it unset; 'none' for baseline."""
    quant = config.quant_config()
    if quant is None:
        return "none"
    return str(quant.block_size or quant.fmt.block_size or 64)


def _asset_pin(model: str) -> str:
    if model not in assets.ASSETS:
        return model
    return ", ".join(f"{p.name}=={p.version}" for p in assets.ASSETS[model].packages)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so the run in progress is marked KILLED rather than left RUNNING."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
