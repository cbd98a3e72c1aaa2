"""A causal LM's logits at chosen positions only, reduced over the vocabulary a slice at a time.

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
import itertools
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from harness.models.anatomy import LogitSplit, device_of, logit_split

VOCAB_SLICE = 1024  # logit columns reduced together: a tile of ROWS_PER_PASS × 1024 fp32 is 8 MiB
ROWS_PER_PASS = 2048  # scored positions per pass over the head; a pass reads its weight once (Gemma: 670 MB)
PROBE_TOKENS = 16  # the head's check: one forward of this many tokens
LOGIT_ROWS_BYTES = 64 << 20  # full-vocabulary fp32 rows held at once, where a caller needs whole rows


@dataclass(frozen=True)
class WindowBatch:
    """Windows fed together: input ids (B, L) right-padded, the scored positions (B, L), their targets."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    n_tokens: int  # input tokens of its windows (padding not counted)


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

    Each tile gives its max m_s and S_s = Σ exp(z − m_s), in fp32 (a bf16 tile is widened exactly first);
    then lse = M + log Σ_s S_s exp(m_s − M) in float64, with M the largest m_s. The argmax is the first index
    of M in the first tile holding it: a tile's argmax is taken only for the rows whose running maximum it
    raises (torch's max with indices costs ten times a plain max, and after the first few tiles a row's
    maximum rarely moves).
    ``index`` (C, P) asks for z at those vocabulary entries; ``weights`` (C, V) for the dot product
    Σ_v w_v z_v, in float64.

    The reduction runs where the tiles are (the device of the head's weight: nothing vocabulary-wide crosses
    to the host); the scores come back on the host."""
    tiles = iter(tiles)
    head = next(tiles)
    device = head[1].device
    wanted = targets[:, None] if index is None else torch.cat([targets[:, None], index], dim=1)
    flat = wanted.reshape(-1).to(device)
    order = torch.argsort(flat)
    ordered = flat[order]
    row_of = order // wanted.shape[1]
    picked = torch.empty(wanted.shape, dtype=torch.float32, device=device)
    dot = None if weights is None else torch.zeros(len(targets), dtype=torch.float64, device=device)
    maxima, sums = [], []
    best = torch.full((len(targets),), -torch.inf, device=device)
    argmax = torch.zeros(len(targets), dtype=torch.int64, device=device)
    scratch = torch.empty(0, device=device)
    for lo, z in itertools.chain([head], tiles):
        bounds = torch.tensor([lo, lo + z.shape[1]], device=device)
        first, last = torch.searchsorted(ordered, bounds).tolist()
        picked.view(-1)[order[first:last]] = z[row_of[first:last], ordered[first:last] - lo].float()
        if weights is not None and dot is not None:
            dot += (weights[:, lo : lo + z.shape[1]].to(device).double() * z.double()).sum(dim=1)
        if scratch.numel() < z.numel():
            scratch = torch.empty(z.numel(), device=device)
        wide = scratch[: z.numel()].view(z.shape)
        if z.dtype != torch.float32:  # widened exactly into a reused buffer (fresh pages per tile cost more
            wide.copy_(z)  # than the copy), then the very fp32 operations
            z = wide
        top = z.amax(dim=1)
        raised = (top > best).nonzero()[:, 0]
        if len(raised):
            argmax[raised] = z[raised].argmax(dim=1) + lo
            best[raised] = top[raised]
        torch.sub(z, top[:, None], out=wide)
        sums.append(wide.exp_().sum(dim=1))
        maxima.append(top)
    tops = torch.stack(maxima, dim=1)
    top = tops.amax(dim=1)
    scale = (tops.double() - top.double()[:, None]).exp_()
    lse = top.double() + (torch.stack(sums, dim=1).double() * scale).sum(dim=1).log()
    return Scores(lse.cpu(), argmax.cpu(), picked.cpu(), None if dot is None else dot.cpu())


class LogitHead:
    """A model's logits at chosen positions only: decoder hidden states, then the output head.

    ``split`` (``harness.models.logit_split``) is checked once against ``model(probe).logits``. With a plain
    Linear head, logits come a vocabulary slice at a time straight from its weight; with another head, its
    output rows; without a split, or when it does not reproduce the forward, ``model(...,
    logits_to_keep=k).logits``.
    """

    @classmethod
    def of(cls, model: nn.Module, tokens: torch.Tensor) -> LogitHead:
        """``model``'s head, checked (one forward of the stream ``tokens``' first ``PROBE_TOKENS``) the first
        time only: a model's configs share it. Checked again when the model's decoder or output head were
        replaced since (adapters on the head); weights changed in place (quantization, adapters inside the
        decoder) keep it valid."""
        split = logit_split(model)
        found = _HEADS.get(model)
        if found is None or found.parts != _parts(split):  # modules compare by identity
            found = _HEADS[model] = cls(model, split, tokens[0, :PROBE_TOKENS])
        return found

    def __init__(self, model: nn.Module, split: LogitSplit | None, probe: torch.Tensor) -> None:
        self._model = weakref.ref(model)  # held by ``_HEADS`` without keeping the model alive
        self.parts = _parts(split)
        probe_logits = model(input_ids=probe[None].to(device_of(model)), use_cache=False).logits[0]
        reference = probe_logits.float().cpu()  # ``full`` gathers the rows on the host
        self.vocab = reference.shape[-1]
        self.rows = max(1, LOGIT_ROWS_BYTES // (4 * self.vocab))  # full rows at once
        self.split = split
        self.linear = split is not None and _plain_linear(split.head)
        if split is not None:
            hidden = split.hidden_states(probe[None].to(device_of(model)))[0]
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

    @property
    def model(self) -> nn.Module:
        model = self._model()
        assert model is not None, "a LogitHead outlived its model"
        return model

    def passes(
        self, batches: list[WindowBatch], *, whole_rows: bool, progress: bool, desc: str
    ) -> Iterator[ScoredRows]:
        """Every scored position of ``batches``, in order (``rows_of`` says how many at a time)."""
        bar = tqdm(
            total=sum(b.n_tokens for b in batches), unit="tok", desc=desc, disable=not progress, leave=False
        )
        device = device_of(self.model)
        try:
            for batch in batches:
                ids, mask = batch.ids.to(device), batch.mask.to(device)
                if self.split is not None:
                    yield from self.rows_of(self.split.scored(ids, mask), batch.targets, whole_rows)
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
        head, softcap = self.split.head, self.split.softcap
        assert isinstance(head, nn.Linear)
        hidden = rows.hidden.to(head.weight.device)  # under a device map, the head's may be another GPU
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
            yield lo, z

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


_HEADS: weakref.WeakKeyDictionary[nn.Module, LogitHead] = weakref.WeakKeyDictionary()  # LogitHead.of


def _parts(split: LogitSplit | None) -> tuple[object, ...]:
    """What a head's check holds for: the decoder and output head modules themselves, and the soft cap."""
    return () if split is None else (split.decoder, split.head, split.softcap)


def _plain_linear(head: nn.Module) -> bool:
    """A Linear whose forward is its weight alone: no hooks (a quantized head's dtype casts) to honour, and
    its weight in it, not offloaded by a device map (a map's hook that only moves inputs is honoured by the
    tiles, which move the hidden states to the weight)."""
    return (
        type(head) is nn.Linear
        and not (head._forward_hooks or head._forward_pre_hooks)
        and not head.weight.is_meta
    )
