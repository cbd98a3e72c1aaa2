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

Dtype: this module runs the model it is given as it is, in the dtype harness.models loaded it in (by default
the checkpoint's own, bf16 for today's models: embeddings, blocks, head and attention alike); the logits, in
whatever dtype the head emits, are cast to float32 before any softmax, and sums over positions and over
vocabulary slices are taken in float64, so no rounding beyond the model's own is added here.
benchmarks/eval.py measures both dtypes against their FLOP floors.

Memory and speed: logits are never materialised for a whole batch. The decoder's hidden states are taken at
the scored positions only (up to ``ROWS_PER_PASS`` of them at once) and projected through the output head one
slice of ``VOCAB_SLICE`` vocabulary entries at a time. Each (rows × slice) fp32 tile is reduced while it sits
in the CPU's cache (``reduce_logits``: its max, argmax, Σ exp, and the logits at the targets and at any
requested indices), and the slices combine into the exact log-sum-exp in float64. So one pass reads the head's
weight once for all its rows, and for Gemma's 262k vocabulary skips the head for the unscored half of a
llamacpp window. harness.models says where a model splits into decoder and head; the split is checked against
the model's own forward on a probe. A model that has none, or fails the check, or whose head is not a plain
Linear, falls back to full logits rows (the head's output, or ``model(...).logits`` with ``logits_to_keep``),
a few rows at a time, reduced by the same tiles.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from harness.models.anatomy import LogitSplit, logit_split

ProtocolName = Literal["disjoint", "sliding", "llamacpp"]
PROTOCOLS: tuple[str, ...] = ("disjoint", "sliding", "llamacpp")
VOCAB_SLICE = 1024  # logit columns reduced together: a tile of ROWS_PER_PASS × 1024 fp32 is 8 MiB
ROWS_PER_PASS = 2048  # scored positions per pass over the head; a pass reads its weight once (Gemma: 670 MB)
LOGIT_ROWS_BYTES = 64 << 20  # full-vocabulary fp32 rows held at once, where a caller needs whole rows


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
    stream = tokens[0]
    head = LogitHead(model, logit_split(model), stream[: min(16, len(stream))])
    return head, head.passes(batches, whole_rows=whole_rows, progress=progress, desc=desc)


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


@dataclass(frozen=True)
class ScoredRows:
    """Scored positions and their targets, with what their logits come from: the decoder's last hidden states
    (projected through the head a vocabulary slice at a time) or the model's own logits rows."""

    targets: torch.Tensor  # int64 (C,)
    hidden: torch.Tensor | None = None  # (C, H)
    logits: torch.Tensor | None = None  # (C, V)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Scores:
    """What the metrics need of a model's logits z at some scored positions, reduced over the vocabulary."""

    lse: torch.Tensor  # float64 (C,): log Σ_v exp z_v
    argmax: torch.Tensor  # int64 (C,): the first index of the largest z
    picked: torch.Tensor  # float32 (C, 1 + P): z at the target, then at each requested index
    dot: torch.Tensor | None  # float64 (C,): Σ_v w_v z_v for the weights w asked for

    @property
    def nll(self) -> torch.Tensor:
        """float64 (C,): −log softmax(z) at the target."""
        return self.lse - self.picked[:, 0].double()

    def log_probs(self) -> torch.Tensor:
        """float64 (C, P): log softmax(z) at the requested indices."""
        return self.picked[:, 1:].double() - self.lse[:, None]


def reduce_logits(
    tiles: Iterable[tuple[int, torch.Tensor]],
    targets: torch.Tensor,
    index: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> Scores:
    """Scores of logits that arrive as column tiles ``(lo, z[:, lo:lo + w])`` (in the head's dtype, in
    vocabulary order, covering it; a tile is read, never written, and need not outlive its step).

    Each tile gives its max m_s, argmax and S_s = Σ exp(z − m_s), in fp32 (a bf16 tile is widened exactly
    first); then lse = M + log Σ_s S_s exp(m_s − M) in float64, with M the largest m_s, and the argmax is the
    first of the tile holding M.
    ``index`` (C, P) asks for z at those vocabulary entries; ``weights`` (C, V) for the dot product
    Σ_v w_v z_v, in float64."""
    wanted = targets[:, None] if index is None else torch.cat([targets[:, None], index], dim=1)
    flat = wanted.reshape(-1)
    order = torch.argsort(flat)
    ordered = flat[order]
    row_of = order // wanted.shape[1]
    picked = torch.empty(wanted.shape, dtype=torch.float32)
    dot = None if weights is None else torch.zeros(len(targets), dtype=torch.float64)
    maxima, argmaxes, sums = [], [], []
    scratch = torch.empty(0)
    for lo, z in tiles:
        first, last = torch.searchsorted(ordered, torch.tensor([lo, lo + z.shape[1]])).tolist()
        picked.view(-1)[order[first:last]] = z[row_of[first:last], ordered[first:last] - lo].float()
        if weights is not None and dot is not None:
            dot += (weights[:, lo : lo + z.shape[1]].double() * z.double()).sum(dim=1)
        if scratch.numel() < z.numel():
            scratch = torch.empty(z.numel())
        wide = scratch[: z.numel()].view(z.shape)
        if z.dtype == torch.float32:
            top, arg = z.max(dim=1)
            torch.sub(z, top[:, None], out=wide)
        else:  # widened exactly into a reused buffer (fresh pages per tile cost more than the copy), then
            wide.copy_(z)  # the very fp32 operations
            top, arg = wide.max(dim=1)
            wide.sub_(top[:, None])
        sums.append(wide.exp_().sum(dim=1))
        maxima.append(top)
        argmaxes.append(arg + lo)
    tops = torch.stack(maxima, dim=1)
    top, which = tops.max(dim=1)
    argmax = torch.stack(argmaxes, dim=1).gather(1, which[:, None])[:, 0]
    scale = (tops.double() - top.double()[:, None]).exp_()
    lse = top.double() + (torch.stack(sums, dim=1).double() * scale).sum(dim=1).log()
    return Scores(lse, argmax, picked, dot)


class LogitHead:
    """A model's logits at chosen positions only: decoder hidden states, then the output head.

    ``split`` (``harness.models.logit_split``) is checked once against ``model(probe).logits``. With a plain
    Linear head, logits come a vocabulary slice at a time straight from its weight; with another head, its
    output rows; without a split, or when it does not reproduce the forward, ``model(...,
    logits_to_keep=k).logits``.
    """

    def __init__(self, model: nn.Module, split: LogitSplit | None, probe: torch.Tensor) -> None:
        self.model = model
        reference = model(input_ids=probe[None].to(_device(model)), use_cache=False).logits[0].float()
        self.vocab = reference.shape[-1]
        self.rows = max(1, LOGIT_ROWS_BYTES // (4 * self.vocab))  # full rows at once
        self.split = split
        self.linear = split is not None and _plain_linear(split.head)
        if split is not None:
            hidden = split.hidden_states(probe[None].to(_device(model)))[0]
            mine = torch.cat([self.full(rows) for rows in self.rows_of(hidden, probe, whole_rows=False)])
            # A slice of the head may round differently from the whole product: by 2 ulps of its dtype
            tolerance = max(1e-4, 2 * torch.finfo(split.head.weight.dtype).eps) * (reference.abs().max() + 1)
            if mine.shape != reference.shape or float((mine - reference).abs().max()) > tolerance:
                self.split = None
                self.linear = False
        if self.split is None:
            warnings.warn(
                f"{type(model).__name__}: decoder + output head do not reproduce the forward; computing full "
                "logits (more memory and time)",
                stacklevel=3,
            )
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def passes(
        self, batches: list[WindowBatch], *, whole_rows: bool, progress: bool, desc: str
    ) -> Iterator[ScoredRows]:
        """Every scored position of ``batches``, in order (``rows_of`` says how many at a time)."""
        bar = tqdm(
            total=sum(b.n_tokens for b in batches), unit="tok", desc=desc, disable=not progress, leave=False
        )
        device = _device(self.model)
        try:
            for batch in batches:
                ids, mask = batch.ids.to(device), batch.mask.to(device)
                if self.split is not None:
                    yield from self.rows_of(self.split.hidden_states(ids)[mask], batch.targets, whole_rows)
                else:
                    yield from self._model_rows(ids, mask, batch.targets)
                bar.update(batch.n_tokens)
        finally:
            bar.close()

    def rows_of(self, hidden: torch.Tensor, targets: torch.Tensor, whole_rows: bool) -> Iterator[ScoredRows]:
        """Decoder hidden states (C, H) at scored positions as ScoredRows: ``ROWS_PER_PASS`` at a time, or
        ``self.rows`` (the whole logits rows ``LOGIT_ROWS_BYTES`` holds) when the head gives whole rows or
        the caller keeps vocabulary-wide data per row."""
        assert self.split is not None
        step = ROWS_PER_PASS if self.linear and not whole_rows else self.rows
        for c in range(0, len(hidden), step):
            part, aimed = hidden[c : c + step], targets[c : c + step]
            if self.linear:
                yield ScoredRows(aimed, hidden=part)
            else:
                yield ScoredRows(aimed, logits=self.split.logits(part))

    def _model_rows(
        self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
    ) -> Iterator[ScoredRows]:
        first = int(mask.float().argmax(dim=1).min())  # the earliest scored column of any row
        if self.keep:
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - first).logits
        else:
            logits = self.model(input_ids=ids).logits[:, first:]
        picked = logits[mask[:, first:]]
        for c in range(0, len(picked), self.rows):
            yield ScoredRows(targets[c : c + self.rows], logits=picked[c : c + self.rows])

    def tiles(self, rows: ScoredRows) -> Iterator[tuple[int, torch.Tensor]]:
        """The logits of ``rows`` in the head's dtype as column tiles (lo, z[:, lo:lo + VOCAB_SLICE]); each
        tile is valid until the next one is drawn (its buffer is reused)."""
        if rows.hidden is None:
            assert rows.logits is not None
            yield from column_tiles(rows.logits)
            return
        assert self.split is not None
        head, softcap, hidden = self.split.head, self.split.softcap, rows.hidden
        assert isinstance(head, nn.Linear)
        buffer = torch.empty(len(hidden) * VOCAB_SLICE, dtype=head.weight.dtype, device=hidden.device)
        for lo in range(0, head.out_features, VOCAB_SLICE):
            weight = head.weight[lo : lo + VOCAB_SLICE]
            shape = (len(hidden), len(weight))
            out = buffer[: shape[0] * shape[1]].view(shape)
            if head.bias is None:
                z = torch.mm(hidden, weight.T, out=out)
            else:
                z = torch.addmm(head.bias[lo : lo + VOCAB_SLICE], hidden, weight.T, out=out)
            if softcap is not None:  # in place, the very operations of the model's forward
                z.div_(softcap).tanh_().mul_(softcap)
            yield lo, z.cpu()

    def scores(
        self, rows: ScoredRows, index: torch.Tensor | None = None, weights: torch.Tensor | None = None
    ) -> Scores:
        """``reduce_logits`` of the rows' logits."""
        return reduce_logits(self.tiles(rows), rows.targets, index, weights)

    def full(self, rows: ScoredRows, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows' whole fp32 logits (C, V), the very values their tiles hold, written into ``out`` when
        given (a buffer reused across passes: no fresh pages to fault in for each)."""
        logits = torch.empty(len(rows), self.vocab) if out is None else out
        for lo, z in self.tiles(rows):
            logits[:, lo : lo + z.shape[1]] = z
        return logits


def column_tiles(logits: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Whole logits rows (C, V) as ``reduce_logits`` tiles: the same slices the head's weight gives."""
    for lo in range(0, logits.shape[1], VOCAB_SLICE):
        yield lo, logits[:, lo : lo + VOCAB_SLICE]


def _plain_linear(head: nn.Module) -> bool:
    """A Linear whose forward is its weight alone: no hooks (a quantized head's dtype casts) to honour."""
    return type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
