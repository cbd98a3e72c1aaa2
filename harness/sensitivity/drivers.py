"""The ``harness sensitivity`` and ``harness allocate`` drivers: probe an experiment's units on each model,
allocate bits under each budget, validate the allocations with full evaluations, and write the reports."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from harness import memory
from harness.experiments import Experiment, LayerOverride, RunConfig, SensitivitySettings
from harness.models import LayerInfo, source_bits
from harness.plots import allocation_pareto, save, sensitivity_heatmap
from harness.quant.double_quant import DoubleQuantConfig
from harness.quant.quantize import CONSTANT_DTYPES, QuantConfig
from harness.runner import Target, run_config
from harness.sensitivity.allocate import allocate, more_bits_allocation, random_allocation, use_more_bits
from harness.sensitivity.prefix_cache import SensitivityError
from harness.sensitivity.probe import Prober, choice_config, choice_label, correlations
from harness.stats import paired_difference
from harness.tracking import (
    KIND_TAG,
    Owner,
    Tracker,
    allocation_tags,
    config_params,
    ledger,
    provenance,
    read_tokens,
    sweep_tags,
)

LLAMA_CPP_MORE_BITS = ("v_proj", "down_proj")  # attn_v and ffn_down in llama.cpp's names
TABLE = "sensitivity.csv"
ALLOCATION_CLAIM = "allocation."  # its runs' claims: apart from a sweep's, which may hold a config's hash


# ---- harness sensitivity -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityReport:
    table: pd.DataFrame
    correlations: dict[str, float]
    paths: list[Path]


def run_sensitivity(
    experiment: Experiment,
    tracking_uri: str | None = None,
    out_dir: Path | None = None,
    prefix: bool = True,
    progress: bool = True,
) -> SensitivityReport:
    """Probe every unit of the experiment's ``sensitivity`` section on each model; log and write the table."""
    out = out_dir or Path.cwd() / "results" / experiment.name
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.of(tracking_uri)
    experiment_id = tracker.experiment_id(experiment.name)
    tables, paths, found = [], [], {}
    for model in experiment.models:
        suffix = _model_suffix(experiment.models, model)
        tags = sweep_tags() | {KIND_TAG: "sensitivity", "model": model}
        with tracker.run(experiment_id, f"sensitivity {model}", tags) as run:
            prober = Prober(experiment, model, prefix, progress)
            try:
                run.log_params(_sensitivity_params(prober, experiment.sensitivity))
                choices = [choice_config(c, prober.config) for c in experiment.sensitivity.probes]
                first_probe = choice_label(choices[0])
                table = prober.run(
                    prober.units(experiment.sensitivity.units), choices, f"sensitivity {model}"
                )
            finally:
                prober.close()
            table = table.sort_values("delta_kld", ascending=False, kind="stable").reset_index(drop=True)
            table.insert(0, "model", model)
            # over one kind of unit at one probe: single layers where probed, they are the most units
            kind = "layer" if "layer" in experiment.sensitivity.units else experiment.sensitivity.units[0]
            found = correlations(table[(table["kind"] == kind) & (table["probe"] == first_probe)])
            run.log_metrics(found | ({"probes_per_min": prober.probes_per_min} if prober.measured else {}))
            run.log_text(table.to_csv(index=False), TABLE)
            (out / f"sensitivity{suffix}.csv").write_text(table.to_csv(index=False))
            paths.append(out / f"sensitivity{suffix}.csv")
            layers = table[table["kind"] == "layer"]
            if not layers.empty:
                heat = layers[layers["probe"] == layers["probe"].iloc[0]].copy()
                structure = prober.cache.structure
                heat["block"] = [structure.index(u) for u in heat["unit"]]
                heat["part"] = [structure.part(u) for u in heat["unit"]]
                heat = heat.dropna(subset=["block"])
                note = _source_note(prober.session.pristine.layers)
                title = f"{model}: ΔKLD with one layer at {heat['probe'].iloc[0]}{note}"
                figure = sensitivity_heatmap(heat, title)
                run.log_figure(figure, "sensitivity.png")
                paths += save(figure, out / f"sensitivity{suffix}")
            tables.append(table)
    return SensitivityReport(pd.concat(tables, ignore_index=True), found, paths)


def _sensitivity_params(prober: Prober, settings: SensitivitySettings) -> dict[str, object]:
    cache = prober.cache
    return {
        **config_params(prober.config.baseline()),
        **prober.session.params,
        **provenance(),
        "units": ",".join(settings.units),
        "probes": ",".join(choice_label(choice_config(c, prober.config)) for c in settings.probes),
        "prefix_cache": "on" if prober.prefix else "off",
        "prefix_cache_bytes": cache.nbytes,
        "prefix_cache_on_disk": cache.on_disk,
    }


# ---- harness allocate --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluated:
    """A config evaluated for the allocation report."""

    method: str
    budget: float
    config: RunConfig
    metrics: dict[str, float]
    kld: np.ndarray
    predicted: float


def run_allocation(
    experiment: Experiment,
    budgets: list[float],
    tracking_uri: str | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> list[Path]:
    """Probe every layer with every menu choice, allocate at each budget, validate each allocation and its
    comparisons with full evaluations logged as runs, and write the report."""
    out = out_dir or Path.cwd() / "results" / experiment.name
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.of(tracking_uri)
    experiment_id = tracker.experiment_id(experiment.name)
    paths: list[Path] = []
    for model in experiment.models:
        suffix = _model_suffix(experiment.models, model)
        tags = sweep_tags() | {KIND_TAG: "allocate", "model": model}
        with tracker.run(experiment_id, f"allocate {model}", tags) as parent:
            prober = Prober(experiment, model, progress=progress)
            target = Target(
                tracker,
                experiment_id,
                ledger(tracker, experiment.name),
                parent,
                Owner.here(parent.id),
                provenance(),
            )
            try:
                evaluated = _allocations(prober, budgets, target)
            finally:
                prober.close()
            table = _comparison(evaluated)
            (out / f"allocation{suffix}.csv").write_text(table.to_csv(index=False))
            parent.log_text(table.to_csv(index=False), "allocation.csv")
            paths.append(out / f"allocation{suffix}.csv")
            for item in evaluated:
                if item.method == "allocated":
                    path = out / f"allocation{suffix}-{item.budget:g}.yaml"
                    path.write_text(_fragment(item.config))
                    paths.append(path)
            note = _source_note(prober.session.pristine.layers)
            title = f"{model}: KLD vs bits/param, allocations and uniform{note}"
            figure = allocation_pareto(table, title)
            parent.log_figure(figure, "pareto.png")
            paths += save(figure, out / f"pareto{suffix}")
    return paths


def _model_suffix(models: list[str], model: str) -> str:
    """Where an experiment has several models, each one's output files carry its name, made safe for a file
    name (``Qwen/Qwen2.5-0.5B`` → ``-Qwen-Qwen2.5-0.5B``)."""
    return "" if len(models) == 1 else "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")


def _source_note(layers: Sequence[LayerInfo]) -> str:
    """A plot title's note when the probed layers' source already lies on a quantized grid (a GGUF's
    Q4_1, Q8_0): their errors are those of re-quantizing it."""
    grids = sorted({i.source_precision for i in layers if source_bits(i.source_precision) <= 8})
    return f" (re-quantized {'/'.join(grids)} weights)" if grids else ""


def _allocations(prober: Prober, budgets: list[float], target: Target) -> list[Evaluated]:
    settings, base = prober.settings, prober.config
    menu = [choice_config(c, base) for c in settings.menu]
    units = prober.units(["layer"])
    probes = prober.run(units, menu, f"allocation probes {base.model}")
    shape = (len(units), len(menu))
    index = {(row.unit, row.probe): row for row in probes.itertuples()}
    costs = np.array(
        [[8.0 * index[u.name, choice_label(c)].stored_bytes for c in menu] for u in units]
    ).reshape(shape)
    losses = np.array([[index[u.name, choice_label(c)].delta_kld for c in menu] for u in units]).reshape(
        shape
    )
    numel = float(sum(info.numel for info in prober.session.pristine.layers))
    structure = prober.cache.structure
    n_blocks = len(structure.layers)
    boosted = np.array(
        [
            structure.part(u.name).split(".")[-1] in LLAMA_CPP_MORE_BITS
            and u.first_block is not None
            and use_more_bits(u.first_block, n_blocks)
            for u in units
        ]
    )
    plans: list[tuple[str, float, np.ndarray | None, RunConfig]] = []
    for c, config in enumerate(menu):  # the menu's uniform configs: the frontier an allocation should beat
        plans.append(("uniform", 0.0, np.full(len(units), c), _uniform(base, config)))
    for budget in budgets:
        total = budget * numel
        plans.append(("allocated", budget, allocate(costs, losses, total), base))
        plans.append(("use_more_bits", budget, more_bits_allocation(costs, boosted, total), base))
        plans.append(("random", budget, random_allocation(costs, total, settings.seed), base))
        plans.append(("nearest uniform", budget, None, _uniform(base, _nearest_uniform(budget, base))))
    tracker = target.tracker
    stored = tracker.finished_runs(target.experiment_id, kind="allocation")

    evaluated: list[Evaluated] = []
    seen: dict[str, Evaluated] = {}
    bar = tqdm(plans, desc=f"allocation runs {base.model}", unit="config", disable=not prober.progress)
    for method, budget, chosen, config in memory.collecting(bar):
        predicted = math.nan
        if chosen is not None:
            predicted = float(losses[np.arange(len(units)), chosen].sum())
            if method != "uniform":
                config = _mixed(
                    base, [u.name for u in units], [menu[c] for c in chosen], f"{method}-{budget:g}"
                )
        if config.hash in seen:
            evaluated.append(replace(seen[config.hash], method=method, budget=budget))
            continue
        if config.hash in stored:
            run_id, metrics = stored[config.hash]
            kld = read_tokens(tracker.download_artifact(run_id, "tokens.npz"))["kld"]
        else:
            tags = allocation_tags(config, method, budget)
            extra = {"predicted_delta_kld": predicted, "budget_bits": budget}
            outcome = run_config(
                target, lambda: prober.session, config, tags, extra, claim_as=ALLOCATION_CLAIM
            )
            if outcome.status != "finished" or outcome.kld is None:
                raise SensitivityError(f"allocation run {config.label} {outcome.status}: {outcome.detail}")
            metrics, kld = dict(outcome.metrics), outcome.kld
        seen[config.hash] = Evaluated(method, budget, config, metrics, np.asarray(kld, np.float64), predicted)
        evaluated.append(seen[config.hash])
    return evaluated


def _uniform(base: RunConfig, config: QuantConfig) -> RunConfig:
    return replace(base, format=config.format, block_size=config.block_size, double_quant=config.double_quant)


def _nearest_uniform(budget: float, base: RunConfig) -> QuantConfig:
    """nf4 (nf3 below 4 bits) at the power-of-two block size whose stored bits (k + c/B, c the bits of the
    config's constant dtype) are nearest the budget, the one under it on a tie."""
    bits = 4 if budget >= 4 else 3
    c = 8 * CONSTANT_DTYPES[base.constant_dtype].itemsize
    sizes = [2**k for k in range(4, 13)]
    size = min(sizes, key=lambda b: (abs(bits + c / b - budget), bits + c / b > budget))  # ties: under
    return QuantConfig(f"nf{bits}", size, None, base.constant_dtype, base.rounding)  # type: ignore[arg-type]


def _mixed(base: RunConfig, names: list[str], configs: list[QuantConfig], name: str) -> RunConfig:
    """A mixed config: the commonest choice as its base settings, one override per layer that differs."""
    labels = [choice_label(c) for c in configs]
    common = configs[labels.index(max(set(labels), key=labels.count))]
    rules = tuple(
        LayerOverride(n, c.format, c.block_size, c.double_quant)  # type: ignore[arg-type]
        for n, c in zip(names, configs, strict=True)
        if choice_label(c) != choice_label(common)
    )
    return replace(_uniform(base, common), overrides=rules, mix_name=name)


def _comparison(evaluated: list[Evaluated]) -> pd.DataFrame:
    """One row per evaluated config; each budget's rows paired with its allocation on the same tokens."""
    allocated = {e.budget: e for e in evaluated if e.method == "allocated"}
    rows = []
    for e in evaluated:
        row = {
            "method": e.method,
            "budget_bits": e.budget if e.method != "uniform" else math.nan,
            "label": e.config.label,
            "bits_per_param": e.metrics["bits_per_param"],
            "kld_mean": e.metrics["kld_mean"],
            "kld_mean_se": e.metrics["kld_mean_se"],
            "ppl": e.metrics["ppl"],
            "predicted_delta_kld": e.predicted,
        }
        mine = allocated.get(e.budget)
        if mine is not None and e.method not in ("allocated", "uniform"):
            diff = paired_difference(e.kld, mine.kld)
            row |= {
                "kld_minus_allocated": diff.mean,
                "kld_minus_allocated_se": diff.se,
                "resolved": diff.resolved,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def _fragment(config: RunConfig) -> str:
    """The allocation as an experiment YAML fragment: base settings plus one rule per differing layer."""

    def settings(format: str, block_size: object, dq: DoubleQuantConfig | None) -> dict[str, object]:
        return {"format": format, "block_size": block_size, "double_quant": dq.spec() if dq else "off"}

    body = {
        "fixed": settings(config.format or "", config.block_size, config.double_quant),
        "mixed": {
            "name": config.mix_name,
            "rules": [
                {"layers": o.layers, **settings(o.format, o.block_size, o.double_quant)}
                for o in config.overrides
            ],
        },
    }
    head = f"# {config.mix_name}: per-layer choices from `harness allocate`; add model, data and eval\n"
    return head + yaml.safe_dump(body, sort_keys=False, width=200)
