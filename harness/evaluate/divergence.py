"""KL(base ‖ quantized) per token and top-1 agreement, against a cached reference of the base model.

The base model's distribution at every scored position is computed once per (model, tokens, protocol) and
reused by every quantization config of a sweep, so a config costs one forward pass, which also yields its
perplexity (``evaluate_against``). The windows and scored positions are a perplexity protocol's (llama.cpp's
``--kl-divergence`` uses its llamacpp windows; that is the usual choice).

Two ways to keep the base distribution (``ReferenceStorage``):

- ``topk`` (the default, k = 64, m = 48): per scored position the base's k most likely tokens and m tokens
  drawn from the rest of its distribution (the tail, drawn ∝ p with a fixed seed at build time), each with
  its fp32 log-probability, and the tail's mass r: 8·(k + m) + 24 bytes a token whatever the vocabulary
  (920 B at the defaults; 512 KiB for exact Gemma 3). The quantized model's full distribution q is computed
  online, so KL = Σ_topk p log(p/q) + Σ_tail p log(p/q) has its head exact, and the tail estimated without
  bias as r · mean_j log(p/q)(s_j) over the samples s_j. log q is rounded to float32 as the stored log p was,
  so the base against itself gives exactly 0, in any model dtype; a single
  token's KLD is an estimate (it can dip below 0), and over thousands of tokens the error of the mean is
  small: ``benchmarks/topk.py`` measures it against exact mode.
- ``exact``: the full vector of base log-probabilities in float16 (or float32): 2 bytes × vocab, 96 KiB/token
  for SmolLM2 (49,152) and 512 KiB/token for Gemma 3 (262,144). float16 keeps 11 significant bits, a stored
  log-prob l carrying an error |d| <= 2^-12 |l|. The stored vector is renormalised, p~ = exp(l~) / Σ exp(l~),
  so the KL computed is a true KL of a proper distribution p~ against q; KL(p~ ‖ p) is second order, about
  Var_p(d)/2 < 1e-7, the floor the self-check (base against its own cache) measures. Per position it costs
  one exp of the stored vector, one dot product and one logsumexp, by KL = [Σ p~ log p~] − Σ p~ z + lse(z),
  z the quantized logits (the dot product summed in float64, a vocabulary slice at a time), the bracket
  precomputed at build time.

``harness.evaluate.reference`` builds the reference, caches it and loads it back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harness.evaluate.logits import LogitHead, ScoredRows, Scores
from harness.evaluate.reference import BaseReference
from harness.evaluate.windows import PerplexityResult, scored_rows, summarize


@dataclass(frozen=True, eq=False)
class DivergenceResult:
    """Per scored token, in protocol order: KL(base ‖ quantized) and whether both argmaxes agree."""

    kld: np.ndarray  # float64, nats
    top1_match: np.ndarray  # bool: base and quantized argmax agree ("same top p")
    base_nll: np.ndarray  # float64: the base model's NLL of each target, from the reference
    storage: str  # how the reference holds the base distribution
    protocol: str

    @property
    def n_tokens(self) -> int:
        return len(self.kld)

    @property
    def kld_mean(self) -> float:
        return float(self.kld.mean())

    @property
    def top1_agreement(self) -> float:
        return float(self.top1_match.mean())


@torch.inference_mode()
def evaluate_against(
    model: nn.Module,
    reference: BaseReference,
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[PerplexityResult, DivergenceResult]:
    """Perplexity and divergence of ``model`` against the base, from one forward pass per window.

    ``batch_size`` defaults to the reference's, so that the base against itself runs the very same GEMMs and
    agrees exactly on top-1.
    """
    head, passes = scored_rows(
        model,
        reference.tokens,
        reference.protocol,
        bos_token_id=reference.bos_token_id,
        batch_size=batch_size or reference.batch_size,
        progress=progress,
        desc=f"kld {reference.protocol.name}",
        whole_rows=whole_rows(reference),
    )
    return divergence_of(reference, head, passes)


def whole_rows(reference: BaseReference) -> bool:
    """Whether a pass against ``reference`` holds vocabulary-wide data per row: an exact reference's rows."""
    return reference.storage.kind == "exact"


def divergence_of(
    reference: BaseReference, head: LogitHead, passes: Iterable[ScoredRows]
) -> tuple[PerplexityResult, DivergenceResult]:
    """Perplexity and divergence from a model's scored positions, in the reference's order (``scored_rows``,
    or a sensitivity probe's prefix-cached passes)."""
    if head.vocab != reference.vocab_size:
        raise ValueError(f"model has {head.vocab} logits, the base reference {reference.vocab_size}")
    n = reference.n_tokens
    kld = np.empty(n, np.float64)
    nll = np.empty(n, np.float64)
    same_top = np.empty(n, bool)
    at = 0
    for part in passes:
        rows = slice(at, at + len(part))
        scores, kld[rows] = _kld(reference, rows, head, part)
        nll[rows] = scores.nll.numpy()
        same_top[rows] = scores.argmax.numpy() == reference.top1[rows]
        at += len(part)
    assert at == n
    divergence = DivergenceResult(
        kld, same_top, reference.nll, reference.storage.label, reference.protocol.name
    )
    ppl = summarize(
        reference.protocol,
        nll,
        reference.tokens.shape[1],
        text_bytes=reference.text_bytes,
        text_words=reference.text_words,
        bos=reference.bos,
    )
    return ppl, divergence


def _kld(
    reference: BaseReference, rows: slice, head: LogitHead, part: ScoredRows
) -> tuple[Scores, np.ndarray]:
    """The quantized logits' scores at ``rows`` and KL(base ‖ quantized) there."""
    stored = reference.rows(rows)
    mass = reference.mass[rows]
    if reference.storage.kind == "exact":
        weights = torch.from_numpy(stored["logprobs"]).to(torch.float32, copy=True).exp_()
        scores = head.scores(part, weights=weights)
        assert scores.dot is not None
        dot = scores.dot.numpy()
        return scores, reference.stats["neg_entropy"][rows] - dot / mass + scores.lse.numpy()
    index = np.concatenate([stored["topk_index"], stored["tail_index"]], axis=1)
    scores = head.scores(part, index=torch.from_numpy(index).long())
    log_p = torch.from_numpy(np.concatenate([stored["topk_logprob"], stored["tail_logprob"]], axis=1))
    # log p − log q at the stored tokens, in float64, with log q rounded to float32 as the stored log p was:
    # a model against its own reference then gives exactly 0, at a cost below 6e-8·|log q| per term
    log_ratio = log_p.double() - scores.log_probs().float().double()
    k = stored["topk_index"].shape[1]
    head_terms = (log_p[:, :k].double().exp() * log_ratio[:, :k]).sum(dim=-1).numpy()
    return scores, head_terms + mass * log_ratio[:, k:].mean(dim=-1).numpy()  # tail: r · mean log(p/q)
