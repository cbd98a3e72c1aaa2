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

import math
import resource
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from harness.data import TokenizedCorpus
from harness.executors import Executor, LocalExecutor, Shard, SweepContext
from harness.experiments import DTYPE_LABELS, Experiment, RunConfig
from harness.experiments.schema import RecoverySettings
from harness.floor import PassCost, gemm_rates
from harness.liveness import sigterm_as_interrupt
from harness.models.sources import DeclaredDtype, declared_dtype
from harness.quant.quantize import COMPUTE_DTYPES
from harness.runner import Outcome
from harness.tracking import NOTE_TAG, RunRecord, Tracker, ledger, provenance, sweep_tags


@dataclass(frozen=True)
class SweepOptions:
    force: bool = False
    limit: int | None = None  # run only the first N configs
    tracking_uri: str | None = None
    progress: bool = True
    costs: Mapping[str, PassCost] = field(default_factory=dict)  # per model: the estimate and the floor
    declared: Mapping[str, DeclaredDtype] = field(default_factory=dict)  # per model, when checked already
    corpora: Mapping[str, TokenizedCorpus] = field(default_factory=dict)  # per model, when checked already


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
    floor_s: float = 0.0  # the FLOP floor of the finished configs' evaluation passes and LoRA trainings
    trainings: int = 0  # LoRA trainings among them (each evaluated again after)
    rates: dict[str, float] = field(default_factory=dict)  # dtype → torch.mm FLOP/s measured after the sweep

    def describe(self) -> str:
        lines = [
            f"{self.experiment}: {len(self.finished)} finished, {len(self.skipped)} skipped (FINISHED "
            f"before), {len(self.held)} left to another sweep running them, {len(self.failed)} failed in "
            f"{self.wall_s:.0f} s; {self.eval_share:.0%} of it "
            f"evaluating (forward passes + ppl/KLD reductions); store: {self.tracking_uri}"
        ]
        if self.floor_s:
            rates = ", ".join(f"{DTYPE_LABELS[d]} {r / 1e9:.0f}" for d, r in self.rates.items())
            trained = (
                f" and {self.trainings} LoRA trainings (6 × parameters × tokens each; a cached 16-bit target"
                " counted as trained)"
                if self.trainings
                else ""
            )
            lines.append(
                f"wall time {self.wall_s:.0f} s = {self.wall_s / self.floor_s:.2f} × the FLOP floor of its "
                f"{len(self.finished) + self.trainings} evaluation passes{trained} ({self.floor_s:.0f} s at "
                f"the torch.mm rate of their GEMM shapes measured now, GFLOP/s: {rates})"
            )
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
    tracker = Tracker.of(options.tracking_uri)
    experiment_id = tracker.experiment_id(experiment.name)
    ledger_id = ledger(tracker, experiment.name)
    summary = SweepSummary(experiment.name, tracker.uri, reaped=tracker.reap_stale(experiment_id))
    done = set() if options.force else set(tracker.finished_runs(experiment_id))
    running = tracker.running_hashes(experiment_id)  # live owners only: the stale ones were just reaped
    declared = {m: _declared(m, options).dtype for m in experiment.models}
    selected = experiment.resolved_configs(declared, options.limit)
    groups = []  # per model and model dtype: its configs to run, the baseline first
    for model, dtype in dict.fromkeys((c.model, c.model_dtype) for c in selected):
        configs = [c for c in selected if (c.model, c.model_dtype) == (model, dtype)]
        ordered = [configs[0].baseline(), *configs]
        summary.skipped += [c.label for c in ordered if c.hash in done]
        summary.held += [c.label for c in ordered if c.hash in running - done]
        todo = tuple(c for c in ordered if c.hash not in done | running)
        if todo:
            groups.append(Shard(model, todo, options.corpora.get(model)))
    total = sum(len(g.configs) for g in groups)
    if not total:
        return summary
    if options.progress:
        eta = estimate(groups, tracker.records(experiment.name), options.costs)
        print(
            f"{experiment.name}: {total} configs to run, {len(summary.skipped)} FINISHED before; {eta}",
            file=sys.stderr,
        )
    n = executor.workers
    shards = [replace(g, configs=g.configs[i::n]) for g in groups for i in range(n) if g.configs[i::n]]
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
        finished: list[RunConfig] = []

        def on_outcome(outcome: Outcome) -> None:
            if outcome.status == "prepared":  # a model loaded and its reference built: not a config's time
                bar.unpause()
                return
            if outcome.config_hash in counted:
                return
            counted.add(outcome.config_hash)
            if outcome.status == "finished":
                summary.finished.append(outcome.label)
                summary.eval_s += outcome.eval_s
                finished.append(next(c for g in groups for c in g.configs if c.hash == outcome.config_hash))
            elif outcome.status == "failed":
                summary.failed.append((outcome.label, outcome.detail))
            else:
                summary.held.append(outcome.label)
            for message in sorted(set(outcome.warnings) - shown):
                shown.add(message)
                warnings.warn(message, stacklevel=1)
            bar.set_postfix_str(outcome.label)
            bar.update()

        context = SweepContext(tracker.uri, experiment_id, ledger_id, parent.id, versions, options.force)
        executor.run(shards, context, on_outcome)
        bar.close()
        summary.wall_s = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
        metrics = {"sweep_wall_s": summary.wall_s, "eval_share": summary.eval_share, "peak_rss_gb": peak_gb}
        if options.costs and finished:
            _floor(summary, finished, options.costs)
            metrics |= {"floor_s": summary.floor_s, "floor_multiple": summary.wall_s / summary.floor_s}
            metrics |= {f"matmul_gflops_{d}": r / 1e9 for d, r in summary.rates.items()}
        parent.log_metrics(metrics)
    return summary


def _declared(model: str, options: SweepOptions) -> DeclaredDtype:
    found = options.declared.get(model) or declared_dtype(model)
    assert found is not None  # fetched: declared_dtype fetches an asset
    return found


def _floor(summary: SweepSummary, finished: Sequence[RunConfig], costs: Mapping[str, PassCost]) -> None:
    """The FLOP floor of the finished configs' passes and LoRA trainings, at torch.mm rates measured now (the
    machine's speed drifts: a floor measured in the same run makes the multiple comparable across days)."""
    rates: dict[tuple[str, str], float] = {}
    for config in finished:
        key = (config.model, str(config.model_dtype))
        if key not in rates:
            measured = gemm_rates(costs[config.model], COMPUTE_DTYPES[key[1]], device=config.device)
            rates[key] = max(measured.values())
            summary.rates[key[1]] = rates[key]
        cost = costs[config.model]
        summary.floor_s += cost.flops / rates[key]
        if config.recovery is not None:  # trained, then evaluated again
            summary.floor_s += (_training_flops(cost, config.recovery) + cost.flops) / rates[key]
            summary.trainings += 1


def _training_flops(cost: PassCost, recipe: RecoverySettings) -> float:
    """A LoRA training's FLOP floor: 6 × parameters × the tokens the recipe trains on."""
    return 6 * cost.n_params * recipe.steps * recipe.batch * recipe.sequence_length


# A sweep's wall time over the FLOP floor of its passes at the bf16 torch.mm rate of their GEMM shapes: the
# default sweep (gemma-3-270m, 16,384 tokens, 2 CPU cores, assets in place) measured 1.7; the rest is
# quantization, the decoder's non-GEMM work and logging.
SWEEP_OVERHEAD = 1.7
# A LoRA training step's time over 6 × parameters × tokens at that rate: benchmarks/recovery.py measured
# 2.8-3.0 on smollm2-135m (bf16, 4 × 128 tokens per step).
TRAINING_OVERHEAD = 2.9
# With activation checkpointing (each block's forward and its dropout masks again in the backward pass), the
# same benchmark with --checkpointing measured 4.5 × that floor against 2.8 without: 1.6 times as long.
CHECKPOINTING_COST = 1.6


def estimate(groups: Sequence[Shard], history: Sequence[RunRecord], costs: Mapping[str, PassCost]) -> str:
    """The sweep's expected duration, in words that say where it comes from: the median time of this
    experiment's earlier FINISHED runs of the same model, model dtype and method, else ``SWEEP_OVERHEAD`` ×
    the FLOP floor of its passes (one per config, and one more per model and dtype for the base reference)
    at this CPU's torch.mm rate in the model dtype on the pass's GEMM shapes, measured once per dtype. That
    floor holds round to nearest; another method's quantization (tens of seconds a config:
    ``benchmarks/methods.py``) is said to be left out."""
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in history:
        if r.status == "FINISHED" and math.isfinite(r.metric("time_total_s")):
            times.setdefault((r.model, r.model_dtype, r.method), []).append(r.metric("time_total_s"))
    timed = {key: float(np.median(found)) for key, found in times.items()}
    seconds, sources, rates = 0.0, set(), {}
    for group in groups:
        dtype, device = str(group.configs[0].model_dtype), group.configs[0].device
        untimed = []
        for config in group.configs:
            if (key := (group.model, dtype, config.method)) in timed:
                seconds += timed[key]
                sources.add("the median time of this experiment's earlier runs")
            else:
                untimed.append(config)
        if untimed and group.model in costs:
            cost = costs[group.model]
            if dtype not in rates:
                rates[dtype] = max(gemm_rates(cost, COMPUTE_DTYPES[dtype], device=device).values())
            seconds += SWEEP_OVERHEAD * (len(untimed) + 1) * cost.flops / rates[dtype]
            sources.add(
                f"{SWEEP_OVERHEAD:g} × the FLOP floor of each pass at the torch.mm rate on {device} in "
                f"{dtype} ({rates[dtype] / 1e9:.0f} GFLOP/s)"
            )
            if group.configs[0].eval.tasks:
                sources.add("zero-shot tasks not included")
            fitted = sorted({c.method for c in untimed if c.method != "rtn"})
            if fitted:
                sources.add(f"{' and '.join(fitted)}'s quantization not included")
            if (recipe := group.configs[0].recovery) is not None:  # the baseline trains the 16-bit target
                trainings = len(untimed) * _training_flops(cost, recipe)
                recompute = CHECKPOINTING_COST if recipe.checkpointing else 1.0
                seconds += TRAINING_OVERHEAD * recompute * trainings / rates[dtype]
                seconds += SWEEP_OVERHEAD * len(untimed) * cost.flops / rates[dtype]  # evaluated again
                overhead = f"{TRAINING_OVERHEAD * recompute:g}"
                sources.add(f"LoRA training at {overhead} × 6 × parameters × tokens at that rate")
    if not sources:
        return "no estimate of its duration"
    shown = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    return f"estimated {shown} ({'; '.join(sorted(sources))})"
