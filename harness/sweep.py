"""The sweep driver: each model loads once; each config is measured (``measure``) and logged (``tracking``).

Per model: load, prepare a ``ModelSession`` (tokenise the corpus into disjoint calibration and evaluation
documents, capture calibration inputs, build or load the base reference), then the unquantized baseline, then
each config. A config whose hash (config + numerics version) already has a FINISHED run is skipped
(``--force`` redoes it); one that raises becomes a FAILED run with its error, and the sweep goes on; Ctrl-C or
SIGTERM marks the run in progress KILLED; a run left RUNNING by a killed process is marked FAILED and redone.

Work reaches an ``Executor`` one model group at a time: ``LocalExecutor`` runs them in this process; a
distributed executor would ship each group (model + configs + tracking URI) to a worker.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd
import torch
from tqdm import tqdm

from harness.evaluate.perplexity import NonFiniteError
from harness.experiments import Experiment, RunConfig
from harness.measure import ModelSession, measure
from harness.models import load_model
from harness.tracking import Run, Tracker, config_params, config_tags, provenance, sweep_tags


@dataclass(frozen=True)
class SweepOptions:
    force: bool = False
    limit: int | None = None  # run only the first N configs
    tracking_uri: str | None = None
    progress: bool = True
    n_params: Mapping[str, int] = field(default_factory=dict)  # per model, for the time estimate


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
    if options.progress:
        eta = estimate(groups, tracker.runs(experiment.name), options.n_params)
        print(
            f"{experiment.name}: {total} configs to run, {len(summary.skipped)} FINISHED before; {eta}",
            file=sys.stderr,
        )
    start = time.perf_counter()
    with (
        _sigterm_as_interrupt(),
        tracker.run(experiment_id, f"sweep {experiment.name}", sweep_tags()) as parent,
    ):
        versions = provenance()
        parent.log_params({"experiment": experiment.name, "n_configs": total, **versions})
        parent.log_artifact(experiment.path)
        bar = tqdm(total=total, desc=f"sweep {experiment.name}", unit="config", disable=not options.progress)
        runner = GroupRunner(tracker, experiment_id, parent, summary, bar, versions)
        (executor or LocalExecutor()).run(groups, runner)
        bar.close()
        summary.wall_s = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
        parent.log_metrics(
            {"sweep_wall_s": summary.wall_s, "eval_share": summary.eval_share, "peak_rss_gb": peak_gb}
        )
    return summary


def estimate(groups: Sequence[ModelGroup], history: pd.DataFrame, n_params: Mapping[str, int]) -> str:
    """The sweep's expected duration, in words that say where it comes from: the median time of this
    experiment's earlier FINISHED runs of the same model, else the forward passes' FLOPs (2 × parameters ×
    evaluation tokens per config, and one more pass for the base reference) at this CPU's matmul rate."""
    seconds, sources = 0.0, set()
    for group in groups:
        done = pd.DataFrame()
        if {"metrics.time_total_s", "params.model"} <= set(history.columns):
            done = history[(history["status"] == "FINISHED") & (history["params.model"] == group.model)]
        if len(done):
            seconds += len(group.configs) * statistics.median(done["metrics.time_total_s"].dropna())
            sources.add("the median time of this experiment's earlier runs")
        elif group.model in n_params:
            tokens = group.configs[0].eval.tokens
            seconds += (len(group.configs) + 1) * 2 * n_params[group.model] * tokens / matmul_rate()
            sources.add("2 × parameters × tokens FLOPs per config at this CPU's matmul rate")
            if group.configs[0].eval.tasks:
                sources.add("zero-shot tasks not included")
    if not sources:
        return "no estimate of its duration"
    shown = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    return f"estimated {shown} ({'; '.join(sorted(sources))})"


def matmul_rate() -> float:
    """FLOP/s of a 1024² fp32 torch.mm on this machine, median of five."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 1024**3 / statistics.median(times)


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
        self.bar.set_postfix_str(f"loading {group.model}")
        try:
            session = ModelSession.prepare(load_model(group.model), group.configs[0])
        except NonFiniteError as exc:  # the base model itself: its first config's run says so, FAILED
            self._failed_group(group, exc)
            return
        shown: set[str] = set()  # source-precision warnings: each said once per model
        for config in group.configs:
            self.bar.set_postfix_str(config.label)
            try:
                with self.tracker.run(
                    self.experiment_id, config.label, config_tags(config), parent=self.parent
                ) as run:
                    run.log_params({**config_params(config), **session.params, **self.provenance})
                    measurement = measure(session, config)
                    run.log_measurement(measurement)
                self.summary.eval_s += measurement.eval_s
                self.summary.finished.append(config.label)
                for message in sorted(set(measurement.warnings) - shown):
                    shown.add(message)
                    warnings.warn(message, stacklevel=1)
            except Exception as exc:  # recorded as a FAILED run by tracker.run; the sweep goes on
                self.summary.failed.append((config.label, f"{type(exc).__name__}: {exc}"))
            self.bar.update()

    def _failed_group(self, group: ModelGroup, exc: Exception) -> None:
        """The group's first config (the baseline, unless it is FINISHED already) becomes a FAILED run that
        holds the error; the others are not run, for nothing can be measured against that base."""
        first, *rest = group.configs
        with (
            contextlib.suppress(NonFiniteError),
            self.tracker.run(self.experiment_id, first.label, config_tags(first), parent=self.parent) as run,
        ):
            run.log_params({**config_params(first), **self.provenance})
            raise exc
        self.summary.failed.append((first.label, f"{type(exc).__name__}: {exc}"))
        self.summary.failed += [(c.label, f"not run: {group.model}'s base model failed") for c in rest]
        self.bar.update(len(group.configs))


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
