"""Uncertainty of per-token results: a block bootstrap, paired differences, and the statistics a run logs.

Tokens of one text are not independent (a hard passage makes many hard tokens in a row), so an i.i.d.
standard error over tokens is too small. Every interval here comes from a non-overlapping block bootstrap:
the scored tokens, in order, are cut into blocks of ``BLOCK_TOKENS``; a resample draws as many blocks with
replacement and takes the ratio of summed values to summed counts. ``RESAMPLES`` resamples with a fixed seed
make every number reproducible. Comparisons between two configs are paired: both are resampled with the
same blocks of the same tokens, so what the two share (the text's difficulty) cancels.

Pure numpy on arrays; nothing here knows models or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 64
RESAMPLES = 1000
SEED = 0
METHOD = f"{BLOCK_TOKENS}-token block bootstrap, {RESAMPLES:,} resamples"
KLD_PERCENTILES = (100.0, 99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1, 0.0)  # llama.cpp's report


def _blocks(n: int) -> np.ndarray:
    """Block number of each of ``n`` tokens."""
    return np.arange(n) // BLOCK_TOKENS


def _same_tokens(*series: np.ndarray) -> None:
    if len({len(s) for s in series}) > 1:
        raise ValueError(f"paired series must have the same tokens, got lengths {[len(s) for s in series]}")


def resampled_means(*series: np.ndarray) -> list[np.ndarray]:
    """Bootstrap means (``RESAMPLES`` each) of every series, all resampled with the same blocks."""
    _same_tokens(*series)
    n = len(series[0])
    if n == 0:
        raise ValueError("no tokens to resample")
    block = _blocks(n)
    n_blocks = int(block[-1]) + 1
    counts = np.bincount(block, minlength=n_blocks).astype(np.float64)
    picks = np.random.default_rng(SEED).integers(0, n_blocks, size=(RESAMPLES, n_blocks))
    total = counts[picks].sum(axis=1)
    return [np.bincount(block, weights=s.astype(np.float64), minlength=n_blocks)[picks].sum(axis=1) / total
            for s in series]  # fmt: skip


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of bootstrap samples."""
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True)
class Difference:
    """mean(a − b) over the same tokens, with its paired block-bootstrap SE and 95 % interval."""

    mean: float
    se: float
    ci_low: float
    ci_high: float
    n_tokens: int

    @property
    def resolved(self) -> bool:
        """The 95 % interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


def paired_difference(a: np.ndarray, b: np.ndarray) -> Difference:
    _same_tokens(a, b)
    (means,) = resampled_means(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    low, high = interval(means)
    return Difference(float(np.mean(a) - np.mean(b)), float(means.std(ddof=1)), low, high, len(a))


def ppl_difference(nll_a: np.ndarray, nll_b: np.ndarray) -> Difference:
    """PPL(a) − PPL(b) on the same tokens, PPL = exp(mean NLL), with its paired block-bootstrap SE and
    95 % interval."""
    if len(nll_a) != len(nll_b):
        raise ValueError(
            f"paired series must have the same tokens, got lengths {len(nll_a)} and {len(nll_b)}"
        )
    means_a, means_b = resampled_means(nll_a, nll_b)
    samples = _exp(means_a) - _exp(means_b)
    low, high = interval(samples)
    shown = float(_exp(np.mean(nll_a)) - _exp(np.mean(nll_b)))
    return Difference(shown, float(samples.std(ddof=1)), low, high, len(nll_a))


def recovery(before: np.ndarray, after: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(ΔPPL before − ΔPPL after) / ΔPPL before, each ΔPPL against ``reference`` on the same tokens (the
    share of the gap to the reference that training closed), with its paired 95 % interval: value, low,
    high. All three NLL series are resampled with the same blocks."""
    samples = _recovered(*resampled_means(before, after, reference))
    finite = samples[np.isfinite(samples)]
    low, high = interval(finite) if len(finite) else (math.nan, math.nan)
    return _recovered_by_means(before, after, reference), low, high


def recovery_difference(a: np.ndarray, b: np.ndarray, reference: np.ndarray) -> Difference:
    """The recovery of ``a`` minus that of ``b`` (each a (before, after) pair of NLL series), against one
    ``reference`` on the same tokens, all five series resampled with the same blocks."""
    before_a, after_a, before_b, after_b, ref = resampled_means(*a, *b, reference)
    samples = _recovered(before_a, after_a, ref) - _recovered(before_b, after_b, ref)
    samples = samples[np.isfinite(samples)]
    value = _recovered_by_means(*a, reference) - _recovered_by_means(*b, reference)
    if len(samples) < 2:
        return Difference(value, math.nan, math.nan, math.nan, len(reference))
    low, high = interval(samples)
    return Difference(value, float(samples.std(ddof=1)), low, high, len(reference))


def _recovered_by_means(before: np.ndarray, after: np.ndarray, reference: np.ndarray) -> float:
    """The recovery fraction of the series' own means; NaN without a finite one (no gap to recover)."""
    (value,) = _recovered(*(np.array([np.mean(s)]) for s in (before, after, reference)))
    return float(value) if math.isfinite(value) else math.nan


def _recovered(before: np.ndarray, after: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The recovery fraction from mean NLLs (PPL = exp of each)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (_exp(before) - _exp(after)) / (_exp(before) - _exp(reference))


def unresolved_from_best(
    values: list[float],
    series: list[np.ndarray | None],
    better: str,
    skip: int,
    differ: Callable[[np.ndarray, np.ndarray], Difference] = paired_difference,
) -> set[int] | None:
    """Rows (from ``skip`` on) whose paired difference (``differ``) from the best row's per-token series has
    a 95 % interval holding 0: those a table cannot tell from the best. Each row's series is one array, its
    last axis the tokens (a stack of series for ``recovery_difference``). None when any row lacks its series
    or the rows do not share their tokens."""
    rows = [i for i in range(skip, len(values)) if math.isfinite(values[i])]
    if len(rows) < 2 or any(series[i] is None for i in rows):
        return None
    if len({np.shape(series[i])[-1] for i in rows}) != 1:
        return None
    best = (min if better == "lower" else max)(rows, key=lambda i: values[i])
    return {i for i in rows if i != best and not differ(series[i], series[best]).resolved}  # type: ignore[arg-type]


def _exp(x: np.ndarray | float) -> np.ndarray | float:
    with np.errstate(over="ignore"):
        return np.exp(x)


def token_statistics(nll: np.ndarray, base: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every logged statistic of one run's per-token results.

    ``nll`` is the run's NLL per scored token. ``base``, when the run is compared with the unquantized model
    on the same tokens, holds ``base_nll``, ``kld`` and ``top1_match`` per token.
    """
    nll = np.asarray(nll, np.float64)
    out: dict[str, float] = {"tokens_scored": float(len(nll))}
    if base is None:
        (means,) = resampled_means(nll)
    else:
        base_nll = np.asarray(base["base_nll"], np.float64)
        kld, top1 = np.asarray(base["kld"], np.float64), np.asarray(base["top1_match"], np.float64)
        means, base_means, kld_means, top1_means, diff_means = resampled_means(
            nll, base_nll, kld, top1, nll - base_nll
        )
        delta = _exp(means) - _exp(base_means)
        out |= {
            "ln_ppl_ratio": float(np.mean(nll - base_nll)),
            "ln_ppl_ratio_se": float(diff_means.std(ddof=1)),
            "delta_ppl": float(_exp(nll.mean()) - _exp(base_nll.mean())),
            "kld_mean": float(kld.mean()),
            "kld_mean_se": float(kld_means.std(ddof=1)),
            "top1_agreement": float(top1.mean()),
            "top1_agreement_se": float(top1_means.std(ddof=1)),
            "rms_delta_p": math.sqrt(float(np.mean((np.exp(-nll) - np.exp(-base_nll)) ** 2))),
        }
        out["delta_ppl_ci95_low"], out["delta_ppl_ci95_high"] = interval(delta)
        p50, p90, p99, p999 = np.percentile(kld, [50, 90, 99, 99.9])
        out |= {"kld_median": p50, "kld_p90": p90, "kld_p99": p99, "kld_p999": p999, "kld_max": kld.max()}
    out["ppl"] = float(_exp(nll.mean()))
    out["ppl_ci95_low"], out["ppl_ci95_high"] = (float(v) for v in _exp(np.array(interval(means))))
    return {k: float(v) for k, v in out.items()}


def kld_percentiles(kld: np.ndarray) -> dict[str, float]:
    """llama.cpp's KLD percentile set: max, 99.9, 99, 95, 90, median, 10, 5, 1, 0.1, min (nats)."""
    values = np.percentile(np.asarray(kld, np.float64), KLD_PERCENTILES)
    return {f"p{q:g}": float(v) for q, v in zip(KLD_PERCENTILES, values, strict=True)}
