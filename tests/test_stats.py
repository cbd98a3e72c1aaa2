"""The block bootstrap against independent computations on synthetic per-token data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness.stats import (
    BLOCK_TOKENS,
    kld_percentiles,
    paired_difference,
    resampled_means,
    token_statistics,
    unresolved_from_best,
)


def standard_error(values: np.ndarray) -> float:
    """The block-bootstrap standard error of a mean: the spread of its resampled means."""
    (means,) = resampled_means(values)
    return float(means.std(ddof=1))


def ar1(n: int, rho: float, seed: int) -> np.ndarray:
    """A unit-variance AR(1) series: neighbouring tokens correlated like the difficulty of running text."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n) * math.sqrt(1 - rho**2)
    x = np.empty(n)
    x[0] = rng.standard_normal()
    for i in range(1, n):
        x[i] = rho * x[i - 1] + noise[i]
    return x


def test_block_se_matches_the_known_se_of_an_autocorrelated_mean() -> None:
    n, rho = 32_768, 0.8
    x = ar1(n, rho, seed=1)
    known = math.sqrt((1 + rho) / (1 - rho) / n)  # var(mean) of AR(1), large n
    assert standard_error(x) == pytest.approx(known, rel=0.15)
    iid = x.std(ddof=1) / math.sqrt(n)
    assert iid < 0.4 * known  # what treating tokens as independent would claim


def test_block_bootstrap_equals_scipy_bootstrap_of_block_means() -> None:
    x = ar1(BLOCK_TOKENS * 200, 0.5, seed=2)
    block_means = x.reshape(-1, BLOCK_TOKENS).mean(axis=1)
    reference = scipy_stats.bootstrap(
        (block_means,), np.mean, n_resamples=4000, method="percentile", random_state=0
    )
    assert standard_error(x) == pytest.approx(reference.standard_error, rel=0.1)
    (means,) = resampled_means(x)
    low, high = np.percentile(means, [2.5, 97.5])
    assert low == pytest.approx(reference.confidence_interval.low, abs=0.25 * reference.standard_error)
    assert high == pytest.approx(reference.confidence_interval.high, abs=0.25 * reference.standard_error)


def test_paired_se_is_far_below_the_unpaired_one_on_shared_difficulty() -> None:
    difficulty = 3 * ar1(20_000, 0.9, seed=3)  # what both configs see: the text
    rng = np.random.default_rng(4)
    a = difficulty + 0.05 + 0.2 * rng.standard_normal(len(difficulty))
    b = difficulty + 0.2 * rng.standard_normal(len(difficulty))
    paired = paired_difference(a, b)
    unpaired = math.hypot(standard_error(a), standard_error(b))
    assert paired.se < 0.1 * unpaired
    assert paired.resolved and paired.ci_low < 0.05 < paired.ci_high
    assert paired.mean == pytest.approx(np.mean(a - b))
    null = paired_difference(b + 0.2 * rng.standard_normal(len(b)), b)
    assert not null.resolved


def test_token_statistics_against_direct_computation() -> None:
    rng = np.random.default_rng(5)
    base_nll = 3 + ar1(4096, 0.7, seed=6)
    nll = base_nll + rng.exponential(0.1, len(base_nll))
    kld = rng.exponential(0.2, len(base_nll))
    top1 = rng.random(len(base_nll)) < 0.8
    found = token_statistics(nll, {"base_nll": base_nll, "kld": kld, "top1_match": top1})
    assert found["ppl"] == pytest.approx(math.exp(nll.mean()))
    assert found["ppl_ci95_low"] < found["ppl"] < found["ppl_ci95_high"]
    assert found["delta_ppl"] == pytest.approx(math.exp(nll.mean()) - math.exp(base_nll.mean()))
    assert found["delta_ppl_ci95_low"] < found["delta_ppl"] < found["delta_ppl_ci95_high"]
    assert found["ln_ppl_ratio"] == pytest.approx(np.mean(nll - base_nll))
    assert found["ln_ppl_ratio_se"] == pytest.approx(standard_error(nll - base_nll))
    assert found["kld_mean"] == pytest.approx(kld.mean()) and found["kld_max"] == kld.max()
    assert found["kld_p99"] == pytest.approx(np.percentile(kld, 99))
    assert found["top1_agreement"] == pytest.approx(top1.mean())
    p_quant, p_base = np.exp(-nll), np.exp(-base_nll)
    assert found["rms_delta_p"] == pytest.approx(math.sqrt(np.mean((p_quant - p_base) ** 2)))
    assert found["tokens_scored"] == 4096
    again = token_statistics(nll, {"base_nll": base_nll, "kld": kld, "top1_match": top1})
    assert again == found  # a fixed seed: bit-identical


def test_kld_percentiles_are_llamacpps_set() -> None:
    shown = kld_percentiles(np.arange(1001, dtype=float))
    assert list(shown) == ["p100", "p99.9", "p99", "p95", "p90", "p50", "p10", "p5", "p1", "p0.1", "p0"]
    assert shown["p100"] == 1000 and shown["p50"] == 500 and shown["p0"] == 0


def test_paired_series_must_share_tokens() -> None:
    with pytest.raises(ValueError, match="same tokens"):
        paired_difference(np.zeros(10), np.zeros(11))


def test_only_rows_a_paired_test_cannot_tell_from_the_best_are_unresolved() -> None:
    """Four configs on the same 8,192 tokens of shared difficulty: one best, one a hair worse (unresolved),
    one clearly worse; a row from before ``skip`` (the baseline) is never compared."""
    shared = ar1(8192, 0.8, seed=3)
    noise = np.random.default_rng(4).normal(0, 0.01, (3, 8192))
    noise -= noise.mean(axis=1, keepdims=True)  # so that the offsets alone order the rows
    series = [
        shared + 5.0,
        shared + noise[0],
        shared + 2e-5 + noise[1],
        shared + 0.1 + noise[2],
    ]  # 0: skipped
    values = [float(s.mean()) for s in series]
    assert unresolved_from_best(values, series, "lower", skip=1) == {2}
    flipped = [-s for s in series]
    assert unresolved_from_best([-v for v in values], flipped, "higher", skip=1) == {2}
    assert unresolved_from_best(values, [*series[:3], None], "lower", skip=1) is None  # a series missing
    assert (
        unresolved_from_best(values, [*series[:3], series[3][:-1]], "lower", skip=1) is None
    )  # other tokens
