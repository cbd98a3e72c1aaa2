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
about 1/2 for llamacpp. ``harness.data.text_counts`` gives the stream text's counts the way lm-eval counts a
document.

The model's logits at the scored positions, and the reductions each position's numbers come from, are
``harness.evaluate.logits``'s: its docstring says in which dtype they are computed and how memory stays
bounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from harness.evaluate.logits import LogitHead, ScoredRows, WindowBatch

ProtocolName = Literal["disjoint", "sliding", "llamacpp"]
PROTOCOLS: tuple[str, ...] = ("disjoint", "sliding", "llamacpp")


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

    ``text_bytes``/``text_words`` are the stream text's counts (``harness.data.text_counts``);
    ``bos_token_id`` tells whether the stream starts with BOS (recorded, and used by llamacpp to re-seed every
    chunk).
    """
    tokens = check_tokens(tokens)
    head, passes = scored_rows(
        model,
        tokens,
        protocol,
        bos_token_id=bos_token_id,
        batch_size=batch_size,
        progress=progress,
        desc=f"ppl {protocol.name}",
    )
    nll = torch.cat([head.scores(rows).nll for rows in passes])
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


def scored_rows(
    model: nn.Module,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    *,
    bos_token_id: int | None,
    batch_size: int,
    progress: bool,
    desc: str,
    whole_rows: bool = False,
) -> tuple[LogitHead, Iterator[ScoredRows]]:
    """The model's head, and every scored position of the protocol in window order, for
    ``LogitHead.scores``; ``whole_rows`` when the caller holds vocabulary-wide data per row
    (``LogitHead.rows_of``).

    The windows come batched as ``window_batches`` makes them. The caller holds torch.inference_mode (a
    context manager inside a generator would leak to the caller).
    """
    batches = window_batches(tokens, protocol, bos_token_id=bos_token_id, batch_size=batch_size)
    head = LogitHead.of(model, tokens)
    return head, head.passes(batches, whole_rows=whole_rows, progress=progress, desc=desc)


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
