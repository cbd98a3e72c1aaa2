"""A model prepared for its configs: ``ModelSession`` loads the model in its dtype onto its device, and holds
what every config of it shares: the chosen layers' pristine weights, the calibration inputs, the evaluation
tokens, the base model's reference statistics (built once, cached on disk) and the facts logged with each
run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import assets, gemm
from harness.cache import cache_dir
from harness.data import TokenizedCorpus, TrainingSplit, tokenize_corpus
from harness.devices import device_type
from harness.evaluate.reference import BaseReference, ReferenceStorage
from harness.evaluate.windows import NonFiniteError, PerplexityProtocol, make_windows
from harness.experiments import RunConfig
from harness.memory import halving, release_freed, rows_that_fit
from harness.models import (
    CAPTURE_ROWS,
    LoadedModel,
    Pristine,
    capture_inputs,
    declared_dtype,
    device_of,
    discover_layers,
    first_nonfinite_module,
    load_model,
    load_tokenizer,
    placement,
    snapshot,
)
from harness.quant.quantize import COMPUTE_DTYPES
from harness.recovery import Evaluated, Training


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
    rows: int  # windows per forward pass: eval.batch_size on the CPU, what fits on a CUDA device
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
        loaded = load_model(config.model, dtype, config.device, config.device_map)
        layers = discover_layers(loaded, list(config.include) or None, list(config.exclude) or None)
        calibration = (
            capture_inputs(loaded.model, layers, splits.calibration, seed=config.seed)
            if config.data.calibration_sequences
            else {}
        )
        protocol = PerplexityProtocol(config.eval.protocol, config.eval.context_length, config.eval.stride)
        device = device_of(loaded.model)
        rows = rows_that_fit(
            device,
            config.eval.batch_size,
            len(make_windows(protocol, splits.evaluation.shape[1])),
            lambda: loaded.model(
                input_ids=splits.evaluation[:, : protocol.context_length].to(device), use_cache=False
            ),
        )
        reference = _base_reference(config, loaded, corpus, protocol, rows) if config.eval.kld else None
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
            "placement": placement(loaded.model),
            "windows_per_forward": rows,
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
            rows,
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


@contextmanager
def located(model: torch.nn.Module, tokens: torch.Tensor, protocol: PerplexityProtocol) -> Iterator[None]:
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


def _base_reference(
    config: RunConfig, loaded: LoadedModel, corpus: TokenizedCorpus, protocol: PerplexityProtocol, rows: int
) -> BaseReference:
    """The unquantized model's reference on the evaluation tokens (cached on disk), in the reference dtype
    the config asks for; ``rows`` windows per forward, fewer where a pass runs out of memory."""
    reference_dtype = str(config.eval.reference_dtype)
    base = loaded
    if reference_dtype != config.model_dtype:  # KLD against the base in another dtype, as asked
        base = load_model(config.model, COMPUTE_DTYPES[reference_dtype], config.device, config.device_map)

    def build(rows: int) -> BaseReference:
        return BaseReference.build(
            base.model,
            corpus.splits.evaluation,
            protocol,
            cache_dir=cache_dir() / "reference",
            key=f"{loaded.source}|{config.data.corpus}|{reference_dtype}{_on(config.device)}",
            text_bytes=corpus.text_bytes,
            text_words=corpus.text_words,
            bos_token_id=corpus.bos_token_id,
            storage=ReferenceStorage(config.eval.kld_reference, config.eval.kld_topk),  # type: ignore[arg-type]
            batch_size=rows,
            progress=True,
        )

    with located(base.model, corpus.splits.evaluation, protocol):
        return halving(build, rows, "the base reference")[0]


def _on(device: str) -> str:
    """The base reference's key suffix for a device kind: none on the CPU, whose references came first."""
    kind = device_type(device)
    return "" if kind == "cpu" else f"|{kind}"


def _asset_pin(model: str) -> str:
    if model not in assets.ASSETS:
        return model
    return ", ".join(f"{p.name}=={p.version}" for p in assets.ASSETS[model].packages)
