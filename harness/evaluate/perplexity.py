"""Perplexity of a causal LM on one token stream, under a named protocol.

The three protocols cut the same tokens into different windows and give different numbers, so every result
records which one produced it. L is ``context_length``, N the stream length, ``tokens[0]`` normally BOS.

- ``disjoint``: lm-eval's ``loglikelihood_rolling`` (``get_rolling_token_windows(context_len=1)`` then
  ``make_disjoint_window``), with the whole stream as one document and its first token as the prefix token.
  Window k feeds ``tokens[kL : kL+L]`` and scores ``tokens[kL+1 : kL+L+1]``, so each token after the first is
  scored exactly once and a window's first prediction sees only one token (the previous window's last
  target). The last, partial window is not short: lm-eval left-extends its input to L tokens of already-scored
  context and scores only the r tokens still missing.
- ``sliding``: the Hugging Face perplexity guide. Windows of L tokens start every ``stride`` S tokens; a
  window scores only the tokens past the previous window's end (labels before are -100, and the label at the
  window's first position falls off in the shift), so every token after the first is scored once with at least
  L - S tokens of context. Costs about L/S times a disjoint pass.
- ``llamacpp``: ``llama-perplexity``. floor(N/L) disjoint chunks of L tokens (the tail is dropped); each chunk
  scores tokens first+1 .. L-1 of itself with first = L//2, i.e. L - 1 - L//2 tokens per chunk, each with at
  least L//2 tokens of context. When the stream starts with BOS, each chunk's first token is replaced by BOS,
  as llama.cpp does for vocabularies that add BOS.

Text-normalised numbers are lm-eval's: bits_per_byte = nll_sum / (n_bytes ln 2), byte_perplexity =
exp(nll_sum / n_bytes), word_perplexity = exp(nll_sum / n_words), with n_bytes and n_words those of the text
under the scored tokens. Convention for partial scoring: n_bytes and n_words are the stream text's counts
times ``text_fraction`` = scored tokens / (N - 1) predictable tokens, i.e. scored tokens are taken to carry
the stream's mean bytes and words per token. The fraction is exactly 1 for disjoint and sliding (stride < L),
about 1/2 for llamacpp. ``text_counts`` gives the stream text's counts the way lm-eval counts a document.

Compute dtype: this module runs the model it is given as it is. harness.models decides the precision of each
layer (QLoRA-style 4-bit storage computes its matmuls in bf16/fp16); the logits, in whatever dtype the head
emits, are cast to float32 before any softmax, so no extra rounding is added here. benchmarks/eval.py measures
what bf16 costs or saves on CPU.

Memory: logits are never materialised for a whole batch. The decoder's hidden states are taken at the scored
positions only and projected through the output head a chunk of positions at a time (about 128 MB of fp32
logits per chunk), which for Gemma's 262k vocabulary also skips the head for the unscored half of a llamacpp
window. harness.models says where a model splits into decoder and head; the split is checked against the
model's own forward on a probe, and a model that has none or fails the check falls back to
``model(...).logits`` with ``logits_to_keep``.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from harness.models.anatomy import LogitSplit, logit_split

ProtocolName = Literal["disjoint", "sliding", "llamacpp"]
PROTOCOLS: tuple[str, ...] = ("disjoint", "sliding", "llamacpp")
LOGIT_CHUNK_BYTES = 128 << 20  # fp32 logits at once; each chunk re-reads the head (Gemma: 670 MB)


class NonFiniteError(ArithmeticError):
    """A model's losses are not finite: the numbers it would give mean nothing, so it gives none."""


def check_finite(nll: np.ndarray, what: str) -> None:
    """NonFiniteError naming the share of scored positions whose loss is NaN or infinite, if any."""
    bad = ~np.isfinite(nll)
    if bad.any():
        raise NonFiniteError(
            f"{what}: {bad.mean():.2%} of {len(nll):,} scored positions have a non-finite loss "
            f"(first at position {int(np.argmax(bad))})"
        )


@dataclass(frozen=True)
class PerplexityProtocol:
    """How a stream is cut into windows; ``stride`` is for sliding only (default ``context_length // 2``)."""

    name: ProtocolName
    context_length: int
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"unknown perplexity protocol {self.name!r}; known: {', '.join(PROTOCOLS)}")
        minimum = 4 if self.name == "llamacpp" else 2
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int):
            raise ValueError(f"context_length must be an integer, got {self.context_length!r}")
        if self.context_length < minimum:
            raise ValueError(f"{self.name} needs context_length >= {minimum}, got {self.context_length}")
        if self.name == "sliding":
            stride = self.context_length // 2 if self.stride is None else self.stride
            if not 1 <= stride <= self.context_length:
                raise ValueError(f"sliding stride must be in [1, context_length], got {stride}")
            object.__setattr__(self, "stride", stride)
        elif self.stride is not None:
            raise ValueError(f"stride applies to the sliding protocol only, not {self.name}")


@dataclass(frozen=True, eq=False)
class PerplexityResult:
    protocol: str
    context_length: int
    stride: int | None
    n_tokens_scored: int
    nll_sum: float  # nats, summed over the scored tokens
    ppl: float  # token-level: exp(nll_sum / n_tokens_scored)
    bits_per_byte: float
    word_perplexity: float
    byte_perplexity: float
    n_bytes: float  # text bytes under the scored tokens (text_bytes * text_fraction)
    n_words: float
    text_fraction: float  # scored tokens / predictable tokens (N - 1): the scaling of n_bytes and n_words
    bos: bool  # the stream starts with the tokenizer's BOS
    nll: np.ndarray = field(repr=False)  # float64, each scored token's NLL in protocol order


@dataclass(frozen=True)
class Window:
    """One forward pass: input ``tokens[start:end]``; its last ``n_scored`` positions are scored, position i
    predicting ``tokens[start + i + 1]``, so the targets are ``tokens[end - n_scored + 1 : end + 1]``."""

    start: int
    end: int
    n_scored: int

    @property
    def length(self) -> int:
        return self.end - self.start


def make_windows(protocol: PerplexityProtocol, n_tokens: int) -> list[Window]:
    """The protocol's windows over a stream of ``n_tokens`` (see the module docstring for each rule)."""
    L, n = protocol.context_length, n_tokens
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n}")
    windows: list[Window] = []
    if protocol.name == "disjoint":
        for s in range(0, n - 1, L):
            if s + L <= n - 1:
                windows.append(Window(s, s + L, L))
            else:  # the partial last window: lm-eval refills its input to L tokens from the left
                windows.append(Window(max(0, n - 1 - L), n - 1, n - 1 - s))
    elif protocol.name == "sliding":
        assert protocol.stride is not None
        prev_end = 0
        for begin in range(0, n, protocol.stride):
            end = min(begin + L, n)
            scored = min(end - prev_end, end - begin - 1)
            if scored > 0:
                # HF feeds tokens[begin:end] and ignores the last logit; feeding one token less is the same.
                windows.append(Window(begin, end - 1, scored))
            prev_end = end
            if end == n:
                break
    else:
        if n < L:
            raise ValueError(f"llamacpp needs at least one full chunk of {L} tokens, got {n}")
        first = L // 2
        windows = [Window(i * L, i * L + L - 1, L - 1 - first) for i in range(n // L)]
    return windows


def starts_with_bos(tokens: torch.Tensor, bos_token_id: int | None) -> bool:
    return bos_token_id is not None and int(tokens.reshape(-1)[0]) == bos_token_id


def text_counts(tokenizer: Any, tokens: torch.Tensor) -> tuple[int, int]:
    """UTF-8 bytes and words of the text a token stream holds, counted per document as lm-eval does
    (``len(doc.encode())``, ``len(re.split(r"\\s+", doc))``); special tokens (BOS, EOS separators) split
    documents and are no text."""
    special = set(tokenizer.all_special_ids)
    docs: list[list[int]] = [[]]
    for token in tokens.reshape(-1).tolist():
        if token in special:
            docs.append([])
        else:
            docs[-1].append(token)
    texts = [tokenizer.decode(ids).strip() for ids in docs if ids]
    texts = [text for text in texts if text]
    return sum(len(t.encode("utf-8")) for t in texts), sum(len(re.split(r"\s+", t)) for t in texts)


def summarize(
    protocol: PerplexityProtocol,
    nll: np.ndarray,
    n_stream: int,
    *,
    text_bytes: int,
    text_words: int,
    bos: bool,
) -> PerplexityResult:
    """Token- and text-normalised perplexities from the scored tokens' NLLs (the module docstring says how
    n_bytes is counted)."""
    n_scored, nll_sum = len(nll), float(nll.sum())
    fraction = n_scored / (n_stream - 1)
    n_bytes, n_words = text_bytes * fraction, text_words * fraction
    nan = float("nan")
    return PerplexityResult(
        protocol=protocol.name,
        context_length=protocol.context_length,
        stride=protocol.stride,
        n_tokens_scored=n_scored,
        nll_sum=nll_sum,
        ppl=_exp(nll_sum / n_scored),
        bits_per_byte=nll_sum / (n_bytes * math.log(2)) if n_bytes > 0 else nan,
        word_perplexity=_exp(nll_sum / n_words) if n_words > 0 else nan,
        byte_perplexity=_exp(nll_sum / n_bytes) if n_bytes > 0 else nan,
        n_bytes=n_bytes,
        n_words=n_words,
        text_fraction=fraction,
        bos=bos,
        nll=nll,
    )


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    *,
    text_bytes: int,
    text_words: int,
    bos_token_id: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on the stream ``tokens`` (1, N) under ``protocol``.

    ``text_bytes``/``text_words`` are the stream text's counts (``text_counts``); ``bos_token_id`` tells
    whether the stream starts with BOS (recorded, and used by llamacpp to re-seed every chunk).
    """
    tokens = check_tokens(tokens)
    nll = torch.empty(sum(w.n_scored for w in make_windows(protocol, tokens.shape[1])), dtype=torch.float64)
    at = 0
    for logits, targets in scored_logits(
        model,
        tokens,
        protocol,
        bos_token_id=bos_token_id,
        batch_size=batch_size,
        progress=progress,
        desc=f"ppl {protocol.name}",
    ):
        picked = logits.gather(1, targets[:, None])[:, 0]
        nll[at : at + len(targets)] = torch.logsumexp(logits, dim=-1) - picked
        at += len(targets)
    return summarize(
        protocol,
        nll.numpy(),
        tokens.shape[1],
        text_bytes=text_bytes,
        text_words=text_words,
        bos=starts_with_bos(tokens, bos_token_id),
    )


def check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be one stream of shape (1, N), got {tuple(tokens.shape)}")
    return tokens.to(torch.int64).cpu()


def scored_logits(
    model: nn.Module,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    *,
    bos_token_id: int | None,
    batch_size: int,
    progress: bool,
    desc: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (fp32 logits (C, V), targets (C,)) for every scored position, in window order, a chunk at a time.

    The windows come batched as ``window_batches`` makes them. The caller holds torch.inference_mode (a
    context manager inside a generator would leak to the caller).
    """
    batches = window_batches(tokens, protocol, bos_token_id=bos_token_id, batch_size=batch_size)
    stream = tokens[0]
    head = LogitHead(model, logit_split(model), stream[: min(16, len(stream))])
    bar = tqdm(
        total=sum(b.n_tokens for b in batches), unit="tok", desc=desc, disable=not progress, leave=False
    )
    device = _device(model)
    try:
        for batch in batches:
            done = 0
            for logits in head(batch.ids.to(device), batch.mask.to(device)):
                yield logits.cpu(), batch.targets[done : done + len(logits)]
                done += len(logits)
            bar.update(batch.n_tokens)
    finally:
        bar.close()


@dataclass(frozen=True)
class WindowBatch:
    """Windows fed together: input ids (B, L) right-padded, the scored positions (B, L), their targets."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    n_tokens: int  # input tokens of its windows (padding not counted)


def window_batches(
    tokens: torch.Tensor, protocol: PerplexityProtocol, *, bos_token_id: int | None, batch_size: int
) -> list[WindowBatch]:
    """A protocol's windows, ``batch_size`` at a time, right-padded: attention is causal, so padding after a
    row's last token cannot change its logits. Under llamacpp, when the stream starts with BOS, each window's
    first input token becomes BOS, as ``llama-perplexity`` re-seeds every chunk."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = make_windows(protocol, tokens.shape[1])
    reseed = protocol.name == "llamacpp" and starts_with_bos(tokens, bos_token_id)
    stream = tokens[0]
    batches = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(w.length for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.int64)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, w in enumerate(batch):
            ids[row, : w.length] = stream[w.start : w.end]
            if reseed:
                ids[row, 0] = bos_token_id
            mask[row, w.length - w.n_scored : w.length] = True
        targets = torch.cat([stream[w.end - w.n_scored + 1 : w.end + 1] for w in batch])
        batches.append(WindowBatch(ids, mask, targets, sum(w.length for w in batch)))
    return batches


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class LogitHead:
    """fp32 logits at chosen positions only: decoder hidden states, then the output head a chunk at a time.

    ``split`` (``harness.models.logit_split``) is checked once against ``model(probe).logits``; without a
    split, or when it does not reproduce the forward, ``model(..., logits_to_keep=k).logits`` is used instead.
    """

    def __init__(self, model: nn.Module, split: LogitSplit | None, probe: torch.Tensor) -> None:
        self.model = model
        reference = model(input_ids=probe[None].to(_device(model)), use_cache=False).logits[0].float()
        self.vocab = reference.shape[-1]
        self.chunk = max(1, LOGIT_CHUNK_BYTES // (4 * self.vocab))
        self.split = split
        if split is not None:
            mine = split.logits(split.hidden_states(probe[None].to(_device(model)))[0]).float()
            scale = float(reference.abs().max()) + 1.0
            if mine.shape != reference.shape or float((mine - reference).abs().max()) > 1e-4 * scale:
                self.split = None
        if self.split is None:
            warnings.warn(
                f"{type(model).__name__}: decoder + output head do not reproduce the forward; computing full "
                "logits (more memory and time)",
                stacklevel=3,
            )
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[torch.Tensor]:
        """Logits (C, V) fp32 of the positions where ``mask`` (B, L) is True, row-major, in chunks."""
        if self.split is not None:
            picked = self.split.hidden_states(ids)[mask]
            for c in range(0, len(picked), self.chunk):
                yield self.split.logits(picked[c : c + self.chunk]).float()
            return
        first = int(mask.float().argmax(dim=1).min())  # the earliest scored column of any row
        if self.keep:
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - first).logits
        else:
            logits = self.model(input_ids=ids).logits[:, first:]
        picked = logits[mask[:, first:]]
        for c in range(0, len(picked), self.chunk):
            yield picked[c : c + self.chunk].float()
