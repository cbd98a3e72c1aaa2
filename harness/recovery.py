"""LoRA recovery: adapters trained with peft on a model as it stands (a config's quantized base, or the
unquantized model for the 16-bit LoRA target), kept on for one evaluation, then removed.

The base stays exactly as it was: only the adapters' parameters reach the optimizer, every base parameter is
frozen for the training, and peft's ``unload`` puts the original modules back. Adapters are kept in float32
(peft's default, ``autocast_adapter_dtype``) while the base runs in the model dtype; QLoRA's reference script
casts them to bf16 instead. Each optimizer step accumulates the gradients of its ``batch`` rows over as few
forwards as a budget of rows × sequence length × vocabulary allows (it fixes which rows share a forward, and
so the sums a step's gradients take); the training is one epoch, each row once, in order. With
``checkpointing`` each block's activations are recomputed in the backward pass.

The loss is transformers' causal-LM loss (the mean next-token NLL from float32 log-softmax), taken through the
output head ``HEAD_CHUNK`` logits at a time: the logits, their float32 copy, log-softmax and gradients exist
for one chunk of tokens, not for the whole forward (on Gemma 3 a row's 256 × 262,144 logits took 1 GB with
them). Each chunk's rows are the same matmuls on fewer rows, so on the CPU the loss and every gradient are
transformers' own bit for bit (``tests/test_recovery.py`` compares them; on CUDA a tiny Llama's in
``tests/test_cuda.py``, where cuBLAS may pick another kernel for another row count). The output head takes no
adapter, and a mixture of experts' router loss is not added: both are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from harness.cache import building
from harness.errors import HarnessError
from harness.evaluate.logits import LogitHead
from harness.experiments.schema import RecoverySettings
from harness.models import discover_layers
from harness.models.anatomy import LogitSplit, device_of

# rows × length × vocabulary of one forward; the logits no longer live whole, but the budget stays: it fixes
# which rows share a forward, and so every number of earlier trainings
LOGIT_BUDGET = 2**25
HEAD_CHUNK = 2**22  # logits alive at once in the loss (about 60 MB with their float32 copies and gradients)
IGNORED = -100  # the label of a position with no next token (transformers' ignore_index)
_TARGET = "target.json"  # a cached 16-bit LoRA target's marker, written last

Evaluated = tuple[dict[str, float], dict[str, np.ndarray]]  # metrics, and the per-token series they come from


class RecoveryError(HarnessError, ValueError):
    """A recovery recipe this model cannot take; one line."""


@dataclass(frozen=True)
class Training:
    """What a LoRA training did: the loss per optimizer step, and the adapters' size."""

    losses: tuple[float, ...]
    step_s: tuple[float, ...]  # wall seconds of each optimizer step
    adapter_params: int
    adapter_bytes: int
    train_tokens: int
    train_s: float


def target_layers(model: nn.Module, settings: RecoverySettings, quantized: list[str]) -> list[str]:
    """The Linear layers that take adapters: ``settings.target_modules`` globs, else the quantized layers.
    RecoveryError for a glob that matches nothing, a rank above a layer's smaller side, an adapter on the
    output head (the loss takes the head a chunk of tokens at a time), a mixture of experts that adds its
    router's loss, or checkpointing on a model that cannot recompute its activations."""
    kind = type(model).__name__
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        raise RecoveryError(f"recovery: {kind} adds a router loss (output_router_logits), which is left out")
    if settings.checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise RecoveryError(f"recovery.checkpointing: {kind} cannot recompute its activations; turn it off")
    names = quantized
    if settings.target_modules:
        try:
            names = [info.name for info in discover_layers(model, list(settings.target_modules))]
        except HarnessError:
            raise RecoveryError(
                f"recovery.target_modules {settings.target_modules} matches no Linear layer; list them "
                "with `harness layers`"
            ) from None
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    for name in names:
        if modules[name] is head:
            raise RecoveryError(
                f"recovery: {name} is the output head, which takes no adapter; list recovery.target_modules "
                "without it"
            )
        smaller = min(modules[name].in_features, modules[name].out_features)
        if settings.rank > smaller:
            raise RecoveryError(
                f"recovery.rank {settings.rank} exceeds {name}'s smaller side ({smaller}); lower the rank"
            )
    return names


def cached_target(
    folder: Path, key: dict[str, Any], train: Callable[[], tuple[Training, Evaluated]]
) -> tuple[Training, Evaluated]:
    """The 16-bit LoRA target from the cache entry of ``key`` (the base reference's entry, the recipe, the
    training rows, the tasks, the numerics version), trained by ``train`` and stored first when missing: a
    resumed sweep trains it once per model and recipe, not once per session. Stored exactly (float64 JSON
    reprs, uncompressed arrays), so a cached target gives bit-identical fractions."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    final = folder / digest
    with building(final, _TARGET) as build:
        if build is not None:
            training, (metrics, per_token) = train()
            np.savez(build / "per_token.npz", **per_token)
            record = {"key": key, "metrics": metrics, "training": asdict(training)}
            (build / _TARGET).write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads((final / _TARGET).read_text())
    with np.load(final / "per_token.npz") as stored:
        per_token = {name: stored[name] for name in stored.files}
    fields = record["training"]
    training = Training(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    return training, (record["metrics"], per_token)


@contextmanager
def adapted(
    model: PreTrainedModel, names: list[str], rows: torch.Tensor, settings: RecoverySettings
) -> Iterator[Training]:
    """``model`` with LoRA adapters on ``names``, trained on ``rows`` (n, sequence_length) by
    ``settings``; the adapters are removed and every parameter's ``requires_grad`` restored on exit.
    RecoveryError when the model's decoder and output head do not reproduce its forward (a model that scales
    its logits after the head): the loss is computed from them."""
    with torch.no_grad():  # checked on the model's forward the first time (an evaluation did it already)
        head = LogitHead.of(model, rows)
    if (split := head.split) is None:
        kind = type(model).__name__
        raise RecoveryError(f"recovery: {kind}'s decoder and output head do not reproduce its forward")
    with injected(model, names, settings) as wrapped, checkpointed(model, settings.checkpointing):
        yield _train(wrapped, split, head.vocab, rows, settings)


@contextmanager
def checkpointed(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """With ``enabled``, each block's activations are recomputed in the backward pass instead of kept
    (transformers' activation checkpointing, non-reentrant). torch replays the RNG state for the recompute, so
    the dropout masks, and every number, are those of a training without it."""
    if not enabled:
        yield
        return
    model.activation_checkpointing_enable()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        # enabling added this hook; transformers removes it by itself only under its own peft integration
        model.disable_input_require_grads()


@contextmanager
def injected(model: nn.Module, names: list[str], settings: RecoverySettings) -> Iterator[nn.Module]:
    """``model`` with freshly initialised adapters on ``names`` (B = 0: the model's outputs are unchanged)
    and every base parameter frozen; yields peft's wrapper. On exit the adapters are removed and every
    parameter's ``requires_grad`` is restored."""
    from peft import LoraConfig, get_peft_model

    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(settings.seed)  # the adapters' initialisation (A: Kaiming uniform, B: zeros)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="|".join(re.escape(name) for name in names),  # a string: matched whole, by name
        bias="none",
    )
    with warnings.catch_warnings():  # peft asks transformers a question that transformers 5 renamed
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    try:
        yield wrapped
    finally:
        model.eval()
        wrapped.unload()
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])


def micro_batch(model: nn.Module, settings: RecoverySettings) -> int:
    """Rows per forward: as many of the step's rows as keep their logits within ``LOGIT_BUDGET`` values (one
    row of Gemma's 262k vocabulary at 256 tokens already holds 67 M), at least one."""
    vocabulary = model.get_output_embeddings().out_features
    return max(1, min(settings.batch, LOGIT_BUDGET // (settings.sequence_length * vocabulary)))


def _train(
    model: nn.Module, split: LogitSplit, vocab: int, rows: torch.Tensor, settings: RecoverySettings
) -> Training:
    adapters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in name for name, _ in adapters), "only adapters may train"
    parameters = [p for _, p in adapters]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (settings.warmup + 1))
    )
    assert len(rows) == settings.steps * settings.batch, "one epoch: each row trains once, in order"
    micro = micro_batch(model, settings)
    losses, step_s = [], []
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(settings.steps), desc="LoRA training", unit="step", leave=False):
        began = time.perf_counter()
        total = 0.0
        batch = rows[step * settings.batch : (step + 1) * settings.batch].to(device_of(model))
        for part in batch.split(micro):  # rows of equal length: the step's mean is Σ part means × share
            total += _loss_backward(split, vocab, part, len(part) / settings.batch)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        step_s.append(time.perf_counter() - began)
    model.eval()
    return Training(
        tuple(losses),
        tuple(step_s),
        sum(p.numel() for p in parameters),
        sum(p.nbytes for p in parameters),
        settings.steps * settings.batch * rows.shape[1],
        time.perf_counter() - start,
    )


def _loss_backward(split: LogitSplit, vocab: int, rows: torch.Tensor, scale: float) -> float:
    """Backpropagate ``scale`` × the causal-LM loss of ``rows`` (transformers' ``labels`` loss: the mean NLL
    of each next token) and return its value, with the head's logits a ``HEAD_CHUNK`` at a time. The loss'
    gradient reaches each chunk's log-softmax as transformers' mean reduction gives it, −scale / count at
    each target, and the chunks' gradients reach the last hidden state together."""
    hidden = split.hidden_states(rows)
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = nn.functional.pad(rows, (0, 1), value=IGNORED)[:, 1:].reshape(-1).to(flat.device)
    scored = targets != IGNORED
    per_target = torch.tensor(scale, dtype=torch.float32, device=flat.device) / scored.sum().to(torch.float32)
    # never a chunk of one row: a matmul of one row takes another kernel, whose sums round differently
    chunks = max(1, min(len(flat) // 2, -(-len(flat) * vocab // HEAD_CHUNK)))
    picked, gradients = [], []
    for states, target in zip(flat.detach().tensor_split(chunks), targets.tensor_split(chunks), strict=True):
        states.requires_grad_()
        logprobs = nn.functional.log_softmax(split.logits(states).float(), dim=-1)
        nn.functional.nll_loss(logprobs, target, ignore_index=IGNORED, reduction="sum").backward(per_target)
        picked.append(logprobs.detach().gather(1, target.clamp(min=0)[:, None]))
        gradients.append(states.grad)
    flat.backward(torch.cat(gradients))
    # the mean over the same values in the same order as transformers' loss: the same cascaded sum
    picked_targets = torch.where(scored, 0, IGNORED)  # column 0 of ``picked``, or no target
    return (nn.functional.nll_loss(torch.cat(picked), picked_targets, ignore_index=IGNORED) * scale).item()
