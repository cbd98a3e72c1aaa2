"""One config's measurement as a pure function: ``measure(session, config) -> Measurement``.

A ``ModelSession`` holds what every config of one model shares: the loaded model with its chosen layers'
pristine weights, the calibration inputs, the evaluation tokens and the base model's reference statistics
(built once, cached on disk). ``measure`` quantizes the layers, measures weight and output error, evaluates
perplexity, KLD and top-1 against the base and the lm-eval tasks, and restores the model. It writes nothing:
the sweep logs what it returns, and the report derives every comparison between configs (Δ to the baseline).
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
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness import NUMERICS_VERSION, assets, gemm
from harness.cache import cache_dir
from harness.data import TokenizedCorpus, TrainingSplit, tokenize_corpus
from harness.devices import device_type
from harness.evaluate.divergence import evaluate_against
from harness.evaluate.reference import BaseReference, ReferenceStorage
from harness.evaluate.tasks import run_tasks
from harness.evaluate.windows import (
    NonFiniteError,
    PerplexityProtocol,
    PerplexityResult,
    check_finite,
    perplexity,
)
from harness.experiments import RunConfig
from harness.memory import release_freed
from harness.methods import METHODS, awq
from harness.methods.sequential import SequentialGptq
from harness.metrics import aggregate
from harness.models import (
    CAPTURE_ROWS,
    ApplyResult,
    LayerQuantizer,
    LoadedModel,
    Pristine,
    capture_inputs,
    declared_dtype,
    discover_layers,
    first_nonfinite_module,
    held_out,
    layer_plan,
    layer_table,
    load_model,
    load_tokenizer,
    quantized,
    snapshot,
)
from harness.plots import layer_error_plot
from harness.quant.quantize import COMPUTE_DTYPES
from harness.recovery import Evaluated, Training, adapted, cached_target, target_layers
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


@dataclass
class ModelSession:
    """A loaded model with what every config of its group shares: layers, data, base statistics."""

    loaded: LoadedModel
    tokenizer: Any | None  # kept only for the lm-eval tasks
    bos_token_id: int | None  # None unless eval.bos; marks a stream opening with BOS; llamacpp re-seeds
    pristine: Pristine
    calibration: dict[str, torch.Tensor]  # each layer's inputs at the held-out calibration positions
    calibration_ids: torch.Tensor  # the calibration sequences (n_seq, seq_len)
    evaluation: torch.Tensor  # the evaluation token stream (1, N)
    protocol: PerplexityProtocol
    reference: BaseReference | None  # None when the experiment turns KLD off
    params: dict[str, Any]  # facts of the session, logged as params of every run
    training: TrainingSplit | None = None  # the LoRA recovery's training rows, when the configs train
    fitted: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)  # fit_inputs
    lora16: dict[str, tuple[Training, Evaluated]] = field(default_factory=dict)  # 16-bit LoRA, by recipe

    @classmethod
    def prepare(cls, config: RunConfig, corpus: TokenizedCorpus | None = None) -> ModelSession:
        """Load ``config.model`` in its model dtype (``config`` resolved) and what its configs share; the
        tokenizer loads only to tokenize the corpus when ``corpus`` (the preflight's) is None, or for the
        lm-eval tasks."""
        assert config.is_resolved, "ModelSession.prepare takes a resolved config (RunConfig.resolved)"
        torch.manual_seed(config.seed)
        dtype = COMPUTE_DTYPES[config.model_dtype]
        tokenizer = load_tokenizer(config.model, dtype) if corpus is None or config.eval.tasks else None
        corpus = corpus or tokenize_corpus(config, tokenizer)
        splits, text_bytes, text_words = corpus.splits, corpus.text_bytes, corpus.text_words
        training = corpus.training
        if not config.eval.tasks:  # let go before the weights load, so that the peak holds one, not both
            tokenizer = None
            release_freed()
        loaded = load_model(config.model, dtype, config.device)
        layers = discover_layers(loaded, list(config.include) or None, list(config.exclude) or None)
        calibration = (
            capture_inputs(loaded.model, layers, splits.calibration, seed=config.seed)
            if config.data.calibration_sequences
            else {}
        )
        protocol = PerplexityProtocol(config.eval.protocol, config.eval.context_length, config.eval.stride)
        reference = None
        if config.eval.kld:
            reference_dtype = str(config.eval.reference_dtype)
            base = loaded
            if reference_dtype != config.model_dtype:  # KLD against the base in another dtype, as asked
                base = load_model(config.model, COMPUTE_DTYPES[reference_dtype], config.device)
            with _located(base.model, splits.evaluation, protocol):
                reference = BaseReference.build(
                    base.model,
                    splits.evaluation,
                    protocol,
                    cache_dir=cache_dir() / "reference",
                    key=f"{loaded.source}|{config.data.corpus}|{reference_dtype}{_on(config.device)}",
                    text_bytes=text_bytes,
                    text_words=text_words,
                    bos_token_id=corpus.bos_token_id,
                    storage=ReferenceStorage(config.eval.kld_reference, config.eval.kld_topk),  # type: ignore[arg-type]
                    batch_size=config.eval.batch_size,
                    progress=True,
                )
            del base
        declared = declared_dtype(config.model)
        assert declared is not None
        params = {
            "text_bytes": text_bytes,
            "text_words": text_words,
            "n_layers_quantized": len(layers),
            "params_quantized": sum(info.numel for info in layers),
            "params_total": sum(p.numel() for p in loaded.model.parameters()),
            "asset": _asset_pin(config.model),
            "n_docs_calibration": splits.n_docs_cal,
            "n_docs_eval": splits.n_docs_eval,
            "declared_dtype": declared.dtype,
            "declared_dtype_rule": declared.rule,
            **gemm.methods(),
        }
        if training is not None:
            params["lora_train_split"] = training.described
        pristine = snapshot(loaded.model, layers)
        return cls(
            loaded,
            tokenizer,
            corpus.bos_token_id,
            pristine,
            calibration,
            splits.calibration,
            splits.evaluation,
            protocol,
            reference,
            params,
            training,
        )

    def fit_inputs(self, rows: int, seed: int) -> dict[str, torch.Tensor]:
        """Each layer's inputs on the unquantized model at ``rows`` calibration positions apart from the
        held-out ones: what a method fits on (AWQ), captured once per row count and seed."""
        if (rows, seed) not in self.fitted:
            self.fitted[rows, seed] = capture_inputs(
                self.loaded.model,
                self.pristine.layers,
                self.calibration_ids,
                positions=slice(CAPTURE_ROWS, CAPTURE_ROWS + rows),
                seed=seed,
            )
        return self.fitted[rows, seed]

    @property
    def bits_per_param(self) -> float:
        """Of the model as loaded: its parameters' bytes over their count (16.000 for bf16)."""
        parameters = list(self.loaded.model.parameters())
        return 8.0 * sum(p.nbytes for p in parameters) / sum(p.numel() for p in parameters)


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
    with _located(session.loaded.model, session.evaluation, session.protocol):
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
    recipe = config.recovery.model_dump_json()
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


@contextmanager
def _located(model: torch.nn.Module, tokens: torch.Tensor, protocol: PerplexityProtocol) -> Iterator[None]:
    """A NonFiniteError leaves with the first module whose output is non-finite on the first window."""
    try:
        yield
    except NonFiniteError as exc:
        window = tokens[:, : protocol.context_length]
        where = first_nonfinite_module(model, window)
        found = (
            f"first non-finite output: {where}" if where else "every module's output is finite on window 0"
        )
        raise NonFiniteError(f"{exc}; {found}") from None


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
        ppl: PerplexityResult = perplexity(
            model,
            session.evaluation,
            session.protocol,
            text_bytes=int(session.params["text_bytes"]),
            text_words=int(session.params["text_words"]),
            bos_token_id=session.bos_token_id,
            batch_size=config.eval.batch_size,
            progress=False,
        )
        per_token = {"nll": ppl.nll}
        metrics |= token_statistics(ppl.nll)
    else:
        ppl, divergence = evaluate_against(model, session.reference, progress=False)
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


def _on(device: str) -> str:
    """The base reference's key suffix for a device kind: none on the CPU, whose references came first."""
    kind = device_type(device)
    return "" if kind == "cpu" else f"|{kind}"


def _asset_pin(model: str) -> str:
    if model not in assets.ASSETS:
        return model
    return ", ".join(f"{p.name}=={p.version}" for p in assets.ASSETS[model].packages)
