"""Units and probes: what one probe quantizes, the probe itself (quantize one unit, evaluate, restore), the
proxies' rank correlations with ΔKLD, and ``Prober``, a model prepared once for many probes."""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from harness import NUMERICS_VERSION
from harness.cache import cache_dir
from harness.experiments import Choice, Experiment, LayerOverride, RunConfig
from harness.metrics import aggregate
from harness.models import Blocks, declared_dtype, layer_table, quantized
from harness.quant.quantize import COMPUTE_DTYPES, QuantConfig
from harness.sensitivity.prefix_cache import PrefixCache
from harness.session import ModelSession
from harness.stats import paired_difference, resampled_means

PROXIES = ("nmse", "output_rel_err", "kurtosis", "max_over_rms", "act_weighted_err")


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
