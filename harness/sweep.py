"""The sweep driver: each model loads once; each config is measured (``measure``) and logged (``tracking``).

Per model: load, prepare a ``ModelSession`` (tokenise the corpus into disjoint calibration and evaluation
documents, capture calibration inputs, build or load the base reference), then the unquantized baseline, then
each config. A config whose hash (config + numerics version) already has a FINISHED run is skipped
(``--force`` redoes it); one that raises becomes a FAILED run with its error, and the sweep goes on; Ctrl-C or
SIGTERM marks the run in progress KILLED; a run left RUNNING by a killed process is marked FAILED and redone.

The driver computes the to-do list once (configs without a FINISHED run, and without a RUNNING one whose owner
is alive) and splits each model's configs into one shard per worker of the ``Executor`` (``executors``):
``LocalExecutor`` runs them in this process, ``RayExecutor`` as Ray tasks. Every config is claimed before it
runs, so two sweeps of one experiment at once never both run it. The bar counts configs across workers.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm import tqdm

from harness.executors import Executor, LocalExecutor, Outcome, Shard, SweepContext
from harness.experiments import Experiment
from harness.liveness import sigterm_as_interrupt
from harness.tracking import NOTE_TAG, Tracker, provenance, sweep_tags


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
    held: list[str] = field(default_factory=list)  # running in another sweep, or claimed by it first
    wall_s: float = 0.0
    eval_s: float = 0.0  # forward passes of the evaluation, with their ppl/KLD reductions and lm-eval

    def describe(self) -> str:
        lines = [
            f"{self.experiment}: {len(self.finished)} finished, {len(self.skipped)} skipped (FINISHED "
            f"before), {len(self.held)} left to another sweep running them, {len(self.failed)} failed in "
            f"{self.wall_s:.0f} s; {self.eval_share:.0%} of it "
            f"evaluating (forward passes + ppl/KLD reductions); store: {self.tracking_uri}"
        ]
        if self.reaped:
            lines.append(f"marked {len(self.reaped)} stale RUNNING run(s) FAILED (their process had died)")
        lines += [f"FAILED {label}: {error}" for label, error in self.failed]
        return "\n".join(lines)

    @property
    def eval_share(self) -> float:
        return self.eval_s / self.wall_s if self.wall_s else 0.0


def run_sweep(
    experiment: Experiment, options: SweepOptions, executor: Executor | None = None
) -> SweepSummary:
    executor = executor or LocalExecutor()
    tracker = Tracker(options.tracking_uri)
    experiment_id = tracker.experiment_id(experiment.name)
    ledger = tracker.ledger(experiment.name)
    summary = SweepSummary(experiment.name, tracker.uri, reaped=tracker.reap_stale(experiment_id))
    done = set() if options.force else tracker.finished_hashes(experiment_id)
    running = tracker.running_hashes(experiment_id)  # live owners only: the stale ones were just reaped
    selected = list(experiment.configs[: options.limit])
    groups = []  # per model: its configs to run, the baseline first
    for model in dict.fromkeys(c.model for c in selected):
        configs = [c for c in selected if c.model == model]
        ordered = [configs[0].baseline(), *configs]
        summary.skipped += [c.label for c in ordered if c.hash in done]
        summary.held += [c.label for c in ordered if c.hash in running - done]
        todo = tuple(c for c in ordered if c.hash not in done | running)
        if todo:
            groups.append(Shard(model, todo))
    total = sum(len(g.configs) for g in groups)
    if not total:
        return summary
    if options.progress:
        eta = estimate(groups, tracker.runs(experiment.name), options.n_params)
        print(
            f"{experiment.name}: {total} configs to run, {len(summary.skipped)} FINISHED before; {eta}",
            file=sys.stderr,
        )
    n = executor.workers
    shards = [Shard(g.model, g.configs[i::n]) for g in groups for i in range(n) if g.configs[i::n]]
    start = time.perf_counter()
    with (
        sigterm_as_interrupt(),
        tracker.run(experiment_id, f"sweep {experiment.name}", sweep_tags()) as parent,
    ):
        versions = provenance()
        parent.log_params({"experiment": experiment.name, "n_configs": total, **versions})
        parent.set_tags({NOTE_TAG: f"{experiment.description} ({total} configs run by this sweep)"})
        parent.log_artifact(experiment.path)
        bar = tqdm(total=total, desc=f"sweep {experiment.name}", unit="config", disable=not options.progress)
        shown: set[str] = set()  # source-precision warnings: each said once
        counted: set[str] = set()  # a Ray retry reports again the configs its dead attempt finished

        def report(outcome: Outcome) -> None:
            if outcome.config_hash in counted:
                return
            counted.add(outcome.config_hash)
            if outcome.status == "finished":
                summary.finished.append(outcome.label)
                summary.eval_s += outcome.eval_s
            elif outcome.status == "failed":
                summary.failed.append((outcome.label, outcome.detail))
            else:
                summary.held.append(outcome.label)
            for message in sorted(set(outcome.warnings) - shown):
                shown.add(message)
                warnings.warn(message, stacklevel=1)
            bar.set_postfix_str(outcome.label)
            bar.update()

        context = SweepContext(tracker.uri, experiment_id, ledger, parent.id, versions, options.force)
        executor.run(shards, context, report)
        bar.close()
        summary.wall_s = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
        parent.log_metrics(
            {"sweep_wall_s": summary.wall_s, "eval_share": summary.eval_share, "peak_rss_gb": peak_gb}
        )
    return summary


# The default sweep (gemma-3-270m, 16,384 tokens, 2 CPU cores, assets in place) took 1.64× its FLOP time at
# the 1024² matmul rate (1,043 s); the rest is quantization, the decoder's non-GEMM work and logging.
SWEEP_OVERHEAD = 1.7


def estimate(groups: Sequence[Shard], history: pd.DataFrame, n_params: Mapping[str, int]) -> str:
    """The sweep's expected duration, in words that say where it comes from: the median time of this
    experiment's earlier FINISHED runs of the same model, else the forward passes' FLOPs (2 × parameters ×
    evaluation tokens per config, and one more pass per model for the base reference) at this CPU's matmul
    rate, measured once."""
    timed = pd.Series(dtype=float)
    if {"metrics.time_total_s", "params.model"} <= set(history.columns):
        finished = history[history["status"] == "FINISHED"].dropna(subset=["metrics.time_total_s"])
        timed = finished.groupby("params.model")["metrics.time_total_s"].median()
    seconds, sources, rate, referenced = 0.0, set(), 0.0, set()
    for group in groups:
        if group.model in timed:
            seconds += len(group.configs) * float(timed[group.model])
            sources.add("the median time of this experiment's earlier runs")
        elif group.model in n_params:
            passes = len(group.configs) + (group.model not in referenced)
            referenced.add(group.model)
            rate = rate or matmul_rate()
            seconds += (
                SWEEP_OVERHEAD * passes * 2 * n_params[group.model] * group.configs[0].eval.tokens / rate
            )
            sources.add(
                f"{SWEEP_OVERHEAD:g} × the time of 2 × parameters × tokens FLOPs per config at this CPU's "
                "matmul rate"
            )
            if group.configs[0].eval.tasks:
                sources.add("zero-shot tasks not included")
    if not sources:
        return "no estimate of its duration"
    shown = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    return f"estimated {shown} ({'; '.join(sorted(sources))})"


def matmul_rate(m: int = 1024, k: int = 1024, n: int = 1024, runs: int = 5) -> float:
    """FLOP/s of an fp32 (m × k) @ (k × n) torch.mm on this machine, median of ``runs`` after a warm-up."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)
