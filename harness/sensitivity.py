"""Which layers matter: per-unit probes with prefix caching, and bit allocation under a budget.

A probe quantizes one unit alone (a Linear layer, a whole block, or one projection type across the blocks)
and measures the model against the base on the evaluation tokens: ΔKLD and ΔNLL, paired with the base on the
same tokens (block bootstrap, ``harness.stats``), and top-1 agreement; beside them cheap proxies from the
weights and the calibration inputs (weight nMSE, output error, kurtosis, max/RMS, activation-weighted error).

Prefix caching: a unit whose layers lie in blocks b and later leaves blocks 0..b−1 as they are, so the hidden
states entering every block are computed once per evaluation window (``PrefixCache``), and a probe runs blocks
b..end and the head only. The cache lives in memory up to ``sensitivity.cache_memory_mb``, in a file under
the cache folder beyond that. The base is probed through the same path, so that every Δ is between two runs
of the very same code.

A probe's summary is kept on disk under its inputs (base reference, calibration, layers, quantization, the
numerics version), so ``harness allocate`` reuses what ``harness sensitivity`` measured.

``run_sensitivity`` and ``run_allocation`` drive a whole experiment: they log to MLflow through
``harness.tracking`` and write ``results/<experiment>/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.stats import spearmanr
from tqdm import tqdm

from harness import NUMERICS_VERSION
from harness.allocation import allocate, more_bits_allocation, random_allocation, use_more_bits
from harness.cache import cache_dir
from harness.errors import HarnessError
from harness.evaluate.divergence import BaseReference, divergence_of, whole_rows
from harness.evaluate.perplexity import LogitHead, ScoredRows, WindowBatch, window_batches
from harness.experiments import (
    Choice,
    Experiment,
    LayerOverride,
    RunConfig,
    SensitivitySettings,
)
from harness.measure import ModelSession
from harness.metrics import aggregate
from harness.models import (
    Blocks,
    LayerInfo,
    blocks,
    declared_dtype,
    layer_table,
    logit_split,
    quantized,
    source_bits,
)
from harness.plots import allocation_pareto, save, sensitivity_heatmap
from harness.quant.double_quant import DoubleQuantConfig
from harness.quant.quantize import COMPUTE_DTYPES, CONSTANT_DTYPES, QuantConfig
from harness.runner import Target, run_config
from harness.stats import paired_difference, resampled_means
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

PROXIES = ("nmse", "output_rel_err", "kurtosis", "max_over_rms", "act_weighted_err")
LLAMA_CPP_MORE_BITS = ("v_proj", "down_proj")  # attn_v and ffn_down in llama.cpp's names
TABLE = "sensitivity.csv"
ALLOCATION_CLAIM = "allocation."  # its runs' claims: apart from a sweep's, which may hold a config's hash


class SensitivityError(HarnessError, ValueError):
    """A sensitivity or allocation request that cannot be met (one line)."""


# ---- units and probes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """What one probe quantizes: its layers, and the first block they touch (None: outside the blocks)."""

    name: str
    kind: str  # layer, block or projection
    layers: tuple[str, ...]
    first_block: int | None


def make_units(layer_names: list[str], structure: Blocks, kinds: list[str]) -> list[Unit]:
    """Every unit of each kind: each layer; each block's layers; each projection type across the blocks."""
    index = {name: structure.index(name) for name in layer_names}

    def first(names: list[str]) -> int | None:
        found = [index[n] for n in names]
        return None if None in found else min(found)  # type: ignore[type-var]

    units = []
    for kind in kinds:
        if kind == "layer":
            units += [Unit(n, kind, (n,), index[n]) for n in layer_names]
            continue
        groups: dict[str, list[str]] = {}
        for name in layer_names:
            if index[name] is None:
                continue
            key = f"{structure.name}.{index[name]}" if kind == "block" else f"*.{structure.part(name)}"
            groups.setdefault(key, []).append(name)
        units += [Unit(key, kind, tuple(names), first(names)) for key, names in groups.items()]
    return units


def choice_config(choice: Choice | LayerOverride, base: RunConfig) -> QuantConfig:
    rule = choice if isinstance(choice, LayerOverride) else LayerOverride.of("*", choice)
    return QuantConfig(rule.format, rule.block_size, rule.double_quant, base.constant_dtype, base.rounding)  # type: ignore[arg-type]


def choice_label(config: QuantConfig) -> str:
    """A menu choice's name, as a config's label has it: ``nf4-b64-dq``, ``nf4-b64-dq-fp8_e4m3-256``."""
    dq = config.double_quant
    return f"{config.format}-b{config.block_size}{f'-{dq.label}' if dq else ''}"


class PrefixCache:
    """The hidden states entering every block for every evaluation window of the base, and probes that
    start from them.

    ``states[b, w, :n]`` holds what enters block b at window w's n input positions (right-padded as the
    windows are batched). In memory up to ``memory_bytes``, else in a file that is removed on ``close``."""

    def __init__(self, session: ModelSession, memory_bytes: int) -> None:
        reference = _reference(session)
        model = session.loaded.model
        self.session, self.reference = session, reference
        self.structure = blocks(model)
        self.batches: list[WindowBatch] = window_batches(
            reference.tokens,
            reference.protocol,
            bos_token_id=reference.bos_token_id,
            batch_size=reference.batch_size,
        )
        stream = reference.tokens[0]
        with torch.inference_mode():
            self.head = LogitHead(model, logit_split(model), stream[: min(16, len(stream))])
        if self.head.split is None:
            raise SensitivityError(f"{session.loaded.name}: prefix caching needs a decoder and output head")
        decoder = self.head.split
        windows = sum(len(b.ids) for b in self.batches)
        width = max(b.ids.shape[1] for b in self.batches)
        dtype = next(model.parameters()).dtype
        shape = (len(self.structure.layers), windows, width, self.structure.hidden_size)
        self.nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        if self.nbytes <= memory_bytes:
            self.states = torch.zeros(shape, dtype=dtype)
        else:
            (cache_dir() / "prefix").mkdir(parents=True, exist_ok=True)
            self._folder = tempfile.TemporaryDirectory(dir=cache_dir() / "prefix")
            path = Path(self._folder.name) / "states.bin"
            with open(path, "wb") as file:
                file.truncate(self.nbytes)
            self.states = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
            self.states = self.states.view(shape)
        self.rows: list[slice] = []
        at = 0
        for batch in self.batches:
            self.rows.append(slice(at, at + len(batch.ids)))
            at += len(batch.ids)
        current: slice = self.rows[0]

        def keep(block: int, hidden_states: torch.Tensor) -> None:
            self.states[block, current, : hidden_states.shape[1]] = hidden_states.detach()

        with torch.inference_mode(), self.structure.recording(keep):
            for rows, batch in zip(self.rows, self.batches, strict=True):
                current = rows
                decoder.hidden_states(batch.ids)

    @property
    def on_disk(self) -> bool:
        return self._folder is not None

    def close(self) -> None:
        if self._folder is not None:
            del self.states
            self._folder.cleanup()
            self._folder = None

    def passes(self, first_block: int | None) -> Iterator[ScoredRows]:
        """The scored positions' hidden states, from block ``first_block`` on (None: all)."""
        split = self.head.split
        assert split is not None
        for rows, batch in zip(self.rows, self.batches, strict=True):
            if first_block is None:
                picked = split.hidden_states(batch.ids)[batch.mask]
            else:
                entering = self.states[first_block, rows, : batch.ids.shape[1]]
                with self.structure.starting_at(first_block, lambda: entering):  # noqa: B023 (used at once)
                    picked = split.hidden_states(batch.ids)[batch.mask]
            yield from self.head.rows_of(picked, batch.targets, whole_rows(self.reference))

    def evaluate(self, first_block: int | None) -> dict[str, np.ndarray]:
        """Per scored token against the base reference: nll, kld, top1_match."""
        with torch.inference_mode():
            ppl, divergence = divergence_of(self.reference, self.head, self.passes(first_block))
        return {"nll": ppl.nll, "kld": divergence.kld, "top1_match": divergence.top1_match}


def probe(
    cache: PrefixCache,
    base: dict[str, np.ndarray],
    unit: Unit,
    config: QuantConfig,
    prefix: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, float | str | int]:
    """Quantize ``unit`` alone to ``config``, evaluate (from its first block when ``prefix``), restore. The
    dequantized layers compute in ``compute_dtype``, by default the dtype their weights are loaded in."""
    session = cache.session
    start = time.perf_counter()
    plan = {name: config for name in unit.layers}
    dtype = compute_dtype or session.pristine.weights[unit.layers[0]].dtype
    # quiet: the source-precision warning is said once per run by ``Prober.run``
    with quantized(session.pristine, config, dtype, session.calibration, plan, quiet=True) as result:
        tokens = cache.evaluate(unit.first_block if prefix else None)
    layers = aggregate(layer_table(result))
    kld = paired_difference(tokens["kld"], base["kld"])
    nll = paired_difference(tokens["nll"], base["nll"])
    (top1_means,) = resampled_means(tokens["top1_match"].astype(np.float64))
    return {
        "unit": unit.name,
        "kind": unit.kind,
        "probe": choice_label(config),
        "n_layers": len(unit.layers),
        "numel": sum(info.numel for info in session.pristine.layers if info.name in plan),
        "delta_kld": kld.mean,
        "delta_kld_se": kld.se,
        "delta_nll": nll.mean,
        "delta_nll_se": nll.se,
        "top1_agreement": float(tokens["top1_match"].mean()),
        "top1_agreement_se": float(top1_means.std(ddof=1)),
        **{proxy: layers.get(proxy, math.nan) for proxy in PROXIES},
        "bits_per_param": layers["bits_per_param"],
        "stored_bytes": int(layers["stored_bytes"]),
        "seconds": time.perf_counter() - start,
        "source_warning": bool(result.warnings),
    }


def correlations(table: pd.DataFrame) -> dict[str, float]:
    """Spearman's ρ of each proxy with ΔKLD over the table's units (NaN where a proxy is missing)."""
    out = {}
    for proxy in PROXIES:
        values = table[[proxy, "delta_kld"]].dropna()
        rho = spearmanr(values[proxy], values["delta_kld"]).statistic if len(values) > 2 else math.nan
        out[f"spearman_{proxy}"] = float(rho)
    return out


# ---- one model's prepared probes ---------------------------------------------------------------------------


class Prober:
    """A model loaded once with its prefix cache and base probe; probes are read from the probe store when
    the same probe was measured before."""

    def __init__(
        self, experiment: Experiment, model: str, prefix: bool = True, progress: bool = True
    ) -> None:
        self.experiment, self.settings, self.prefix, self.progress = (
            experiment,
            experiment.sensitivity,
            prefix,
            progress,
        )
        declared = declared_dtype(model)
        assert declared is not None  # fetched: an asset is
        first = next(c for c in experiment.configs if c.model == model).resolved(declared.dtype)
        self.config = replace(first, overrides=(), mix_name=None)  # its data, evaluation, dtypes and tie rule
        self.session = ModelSession.prepare(self.config)
        self.compute_dtype = COMPUTE_DTYPES[str(self.config.compute_dtype)]
        self.cache = PrefixCache(self.session, self.settings.cache_memory_mb * 2**20)
        self.base = self.cache.evaluate(None)
        self.layer_names = [info.name for info in self.session.pristine.layers]
        self.measured = 0  # probes computed (not read back) and their seconds, for the speed figure
        self.seconds = 0.0

    def close(self) -> None:
        self.cache.close()

    def units(self, kinds: list[str]) -> list[Unit]:
        return make_units(self.layer_names, self.cache.structure, kinds)

    def run(self, units: list[Unit], choices: list[QuantConfig], desc: str) -> pd.DataFrame:
        rows = []
        todo = [(u, c) for c in choices for u in units]
        for unit, config in tqdm(todo, desc=desc, unit="probe", disable=not self.progress):
            path = self._stored(unit, config)
            if path.is_file():
                rows.append(json.loads(path.read_text()))
                continue
            row = probe(self.cache, self.base, unit, config, self.prefix, self.compute_dtype)
            self.measured += 1
            self.seconds += float(row["seconds"])
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(row))
            partial.replace(path)  # whole or absent
            rows.append(row)
        table = pd.DataFrame(rows)
        if table["source_warning"].any():
            warnings.warn(
                f"{int(table['source_warning'].sum())} of {len(table)} probes quantize layers stored at or "
                "below the probe's bits in the source (a GGUF grid): these are re-quantization results",
                stacklevel=2,
            )
        return table

    def _stored(self, unit: Unit, config: QuantConfig) -> Path:
        key = {
            "numerics_version": NUMERICS_VERSION,
            "reference": str(self.session.reference.path if self.session.reference else ""),
            "data": self.config.data.model_dump(),
            "seed": self.config.seed,
            "dtypes": [self.config.model_dtype, self.config.compute_dtype],
            "layers": unit.layers,
            "first_block": unit.first_block if self.prefix else None,
            "choice": [
                config.format,
                config.block_size,
                str(config.double_quant),
                config.constant_dtype,
                config.rounding,
            ],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return cache_dir() / "probes" / f"{digest}.json"

    @property
    def probes_per_min(self) -> float:
        return 60 * self.measured / self.seconds if self.seconds else math.nan


def _reference(session: ModelSession) -> BaseReference:
    if session.reference is None:
        raise SensitivityError("sensitivity needs KLD against the base: set eval.kld: true")
    return session.reference


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
    for method, budget, chosen, config in tqdm(
        plans, desc=f"allocation runs {base.model}", unit="config", disable=not prober.progress
    ):
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
