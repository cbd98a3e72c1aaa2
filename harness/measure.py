"""One config's measurement as a pure function: ``measure(session, config) -> Measurement``.

The ``ModelSession`` (``harness.session``) holds what every config of one model shares. ``measure`` quantizes
the layers, measures weight and output error, evaluates perplexity, KLD and top-1 against the base and the
lm-eval tasks, and restores the model. It writes nothing: the sweep logs what it returns, and the report
derives every comparison between configs (Δ to the baseline).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness import NUMERICS_VERSION
from harness.cache import cache_dir
from harness.evaluate.divergence import DivergenceResult, evaluate_against
from harness.evaluate.tasks import run_tasks
from harness.evaluate.windows import (
    PerplexityResult,
    check_finite,
    perplexity,
)
from harness.experiments import RunConfig
from harness.memory import halving
from harness.methods import METHODS, awq
from harness.methods.sequential import SequentialGptq
from harness.metrics import aggregate
from harness.models import (
    CAPTURE_ROWS,
    ApplyResult,
    LayerQuantizer,
    held_out,
    layer_plan,
    layer_table,
    quantized,
)
from harness.plots import layer_error_plot
from harness.quant.quantize import COMPUTE_DTYPES
from harness.recovery import Evaluated, Training, adapted, cached_target, target_layers
from harness.session import ModelSession, located
from harness.stats import kld_percentiles, recovery, token_statistics

PROJECTIONS = {"7B": 7e9, "70B": 70e9}  # model sizes whose memory at the measured bits/param is reported


@dataclass(frozen=True)
class Measurement:
    """What one config measured: declared metrics, the per-layer table and the figures (nothing logged)."""

    config: RunConfig
    metrics: dict[str, float]
    layers: pd.DataFrame | None  # None for the baseline: nothing was quantized
    per_token: dict[str, np.ndarray]  # per scored token, in order: nll, and against the base kld, top1...
    figures: dict[str, Figure] = field(default_factory=dict)
    records: dict[str, dict[str, float]] = field(default_factory=dict)  # small JSON artifacts
    curves: dict[str, tuple[float, ...]] = field(default_factory=dict)  # step metrics: one value per step
    warnings: tuple[str, ...] = ()  # about the source precision; the sweep shows each once
    eval_s: float = 0.0


def measure(session: ModelSession, config: RunConfig) -> Measurement:
    """Quantize, measure, evaluate and restore one config; the model is as before when this returns."""
    lora16 = _lora16(session, config) if config.recovery is not None else None  # on the unquantized model
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    curves: dict[str, tuple[float, ...]] = {}
    with _applied(session, config) as result:
        quantize_s = time.perf_counter() - start
        layers = layer_table(result) if result is not None else None
        metrics = _storage_and_error(session, layers)
        eval_start = time.perf_counter()
        metrics_evaluated, per_token = _checked_evaluation(session, config)
        metrics |= metrics_evaluated
        eval_s = time.perf_counter() - eval_start
        if lora16 is not None:
            recovered, after, curves = _recovered(session, config, per_token, lora16)
            metrics |= recovered
            per_token |= after
    metrics |= {
        "time_quantize_s": quantize_s,
        "fit_tokens": _fit_tokens(session, config),
        "time_eval_s": eval_s,
        "time_total_s": time.perf_counter() - start,
    }
    figures = {"layer_nmse.png": layer_error_plot(layers)} if layers is not None else {}
    records = {"kld_percentiles.json": kld_percentiles(per_token["kld"])} if "kld" in per_token else {}
    found = tuple(result.warnings) if result is not None else ()
    return Measurement(config, metrics, layers, per_token, figures, records, curves, found, eval_s)


def _checked_evaluation(session: ModelSession, config: RunConfig) -> Evaluated:
    """``_evaluate``, with a non-finite NLL or KLD reported with the first module that makes it."""
    with located(session.loaded.model, session.evaluation, session.protocol):
        metrics, per_token = _evaluate(session, config)
        for name in ("nll", "kld"):
            if name in per_token:
                check_finite(per_token[name], f"{config.label} ({name})")
    return metrics, per_token


def _trained(session: ModelSession, config: RunConfig) -> tuple[Training, Evaluated]:
    """Train ``config.recovery``'s adapters on the model as it stands, evaluate with them on, remove them."""
    assert config.recovery is not None and session.training is not None
    model = session.loaded.model
    names = target_layers(model, config.recovery, [info.name for info in session.pristine.layers])
    with adapted(model, names, session.training.rows, config.recovery) as training:
        return training, _checked_evaluation(session, config)


def _lora16(session: ModelSession, config: RunConfig) -> tuple[Training, Evaluated]:
    """The 16-bit LoRA target: ``config.recovery`` trained on the unquantized model, evaluated; once per
    model and recipe (cached beside the base reference, which it is measured against)."""
    assert config.recovery is not None and session.training is not None
    assert session.reference is not None and session.reference.path is not None  # prepare caches it
    recipe = config.recovery.model_dump_json(exclude=config.recovery.UNHASHED)
    if recipe not in session.lora16:
        key = {
            "reference": session.reference.path.name,  # the model, tokens, protocol, threads and kernels
            "recipe": recipe,
            "rows": hashlib.sha256(session.training.rows.numpy().tobytes()).hexdigest(),
            "tasks": [list(config.eval.tasks), config.eval.limit],
            "numerics_version": NUMERICS_VERSION,
            "peft": version("peft"),
        }
        train = partial(_trained, session, config)
        session.lora16[recipe] = cached_target(cache_dir() / "lora16", key, train)
    return session.lora16[recipe]


def _recovered(
    session: ModelSession,
    config: RunConfig,
    before: dict[str, np.ndarray],
    lora16: tuple[Training, Evaluated],
) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, tuple[float, ...]]]:
    """Adapters trained on the quantized base (the baseline's are the 16-bit target itself) and the same
    evaluation with them on: the after-LoRA metrics with the recovery fractions, their per-token series, and
    the loss curve."""
    training, (after_metrics, after) = lora16 if config.is_baseline else _trained(session, config)
    target_metrics, target = lora16[1]
    metrics = {f"lora_{name}": after_metrics[name] for name in _AFTER_LORA if name in after_metrics}
    metrics |= {f"lora_{name}": value for name, value in after_metrics.items() if name.startswith("acc")}
    metrics |= {
        "lora16_ppl": target_metrics["ppl"],
        "lora_train_tokens": training.train_tokens,
        "lora_params": training.adapter_params,
        "lora_bits_per_param": 8 * training.adapter_bytes / session.params["params_quantized"],
        "time_lora_s": training.train_s,
    }
    if not config.is_baseline:  # the baseline has no gap to recover
        for reference, nll in (("base", before["base_nll"]), ("lora16", target["nll"])):
            value, low, high = recovery(before["nll"], after["nll"], nll)
            metrics[f"recovery_vs_{reference}"] = value
            metrics[f"recovery_vs_{reference}_ci95_low"] = low
            metrics[f"recovery_vs_{reference}_ci95_high"] = high
    per_token = {f"lora_{name}": after[name] for name in ("nll", "kld", "top1_match")}
    per_token["lora16_nll"] = target["nll"]
    return metrics, per_token, {"lora_train_loss": training.losses}


_AFTER_LORA = (
    "ppl", "ppl_ci95_low", "ppl_ci95_high", "kld_mean", "kld_mean_se", "top1_agreement", "top1_agreement_se"
)  # fmt: skip


@contextmanager
def _applied(session: ModelSession, config: RunConfig) -> Iterator[ApplyResult | None]:
    quant = config.quant_config()
    if quant is None:
        yield None
        return
    plan = None
    if config.overrides:
        names = [info.name for info in session.pristine.layers]
        plan = layer_plan(names, quant, config.layer_rules())
    dtype = COMPUTE_DTYPES[str(config.compute_dtype)]
    quantizer = layer_quantizer(session, config)
    # quiet: the warnings go into the Measurement, so that a sweep says each once
    with quantized(
        session.pristine, quant, dtype, session.calibration, plan, quiet=True, quantizer=quantizer
    ) as result:
        yield result


def _fit_tokens(session: ModelSession, config: RunConfig) -> int:
    positions = session.calibration_ids.numel()
    if config.method == "gptq":
        return positions - int(held_out(session.calibration_ids, config.seed).sum())
    if config.method == "awq":
        return min(config.method_settings.awq.rows, max(positions - CAPTURE_ROWS, 0))
    return 0


def layer_quantizer(session: ModelSession, config: RunConfig) -> LayerQuantizer:
    """``config.method``'s choice of each layer's codes and constants."""
    settings = config.method_settings
    if config.method == "gptq":
        ids, names = session.calibration_ids, [info.name for info in session.pristine.layers]
        return SequentialGptq(
            session.loaded.model, names, ids, ~held_out(ids, config.seed), settings.gptq.model_dump()
        )
    if config.method == "awq":
        inputs = session.fit_inputs(settings.awq.rows, config.seed)
        return lambda name, weight, quant: awq.quantize_layer(
            weight, inputs[name], quant, grid=settings.awq.grid, name=name
        )
    layer = METHODS[config.method].layer
    assert layer is not None, f"{config.method} fits on calibration data and has no quantizer here"
    return lambda name, weight, quant: layer(weight, quant, name=name)


def _storage_and_error(session: ModelSession, layers: pd.DataFrame | None) -> dict[str, float]:
    """Bits, memory and weight-space error of the quantized layers (for the baseline: its loaded dtype).

    Memory counts every parameter that is not quantized at its loaded dtype."""
    total = session.params["params_total"]
    if layers is None:
        bits = session.bits_per_param
        metrics = {"bits_per_param": bits, "model_memory_bytes": total * bits / 8}
    else:
        metrics = aggregate(layers)
        rest = total - float(layers["numel"].sum())
        metrics["model_memory_bytes"] = metrics["stored_bytes"] + rest * session.bits_per_param / 8
        nmse = metrics["nmse"]
        metrics["sqnr_db"] = -10 * math.log10(nmse) if nmse > 0 else math.inf
    for label, count in PROJECTIONS.items():
        metrics[f"projected_{label}_GB"] = count * metrics["bits_per_param"] / 8 / 1e9
    return metrics


def _evaluate(session: ModelSession, config: RunConfig) -> Evaluated:
    """Perplexity, KLD/top-1 against the base from the same forward passes, and the lm-eval tasks: the
    statistics, and the per-token results they come from."""
    model = session.loaded.model
    metrics: dict[str, float] = {}
    per_token: dict[str, np.ndarray]
    if session.reference is None:

        def scored(rows: int) -> PerplexityResult:
            return perplexity(
                model,
                session.evaluation,
                session.protocol,
                text_bytes=int(session.params["text_bytes"]),
                text_words=int(session.params["text_words"]),
                bos_token_id=session.bos_token_id,
                batch_size=rows,
                progress=False,
            )

        ppl, metrics["eval_windows_per_forward"] = halving(scored, session.rows, "evaluation")
        per_token = {"nll": ppl.nll}
        metrics |= token_statistics(ppl.nll)
    else:
        reference = session.reference

        def against(rows: int) -> tuple[PerplexityResult, DivergenceResult]:
            return evaluate_against(model, reference, batch_size=rows, progress=False)

        (ppl, divergence), metrics["eval_windows_per_forward"] = halving(
            against, reference.batch_size, "evaluation"
        )
        per_token = {
            "nll": ppl.nll,
            "base_nll": divergence.base_nll,
            "kld": divergence.kld,
            "top1_match": divergence.top1_match,
        }
        metrics |= token_statistics(ppl.nll, per_token)
        metrics["reference_bytes_per_token"] = session.reference.bytes_per_token
    metrics |= {"bits_per_byte": ppl.bits_per_byte, "word_ppl": ppl.word_perplexity}
    if config.eval.tasks:
        accuracies = run_tasks(
            model,
            session.tokenizer,
            list(config.eval.tasks),
            limit=config.eval.limit,
            batch_size=config.eval.batch_size,
        )
        for task, values in accuracies.items():
            for name in ("acc", "acc_norm", "ppl"):
                if name in values:
                    metrics[f"{name}_{task}"] = values[name]
                    metrics[f"{name}_{task}_stderr"] = values[f"{name}_stderr"]
    return metrics, per_token
