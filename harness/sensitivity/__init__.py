"""Which layers matter: per-unit probes with prefix caching, and bit allocation under a budget.

A probe quantizes one unit alone (a Linear layer, a whole block, or one projection type across the blocks)
and measures the model against the base on the evaluation tokens: ΔKLD and ΔNLL, paired with the base on the
same tokens (block bootstrap, ``harness.stats``), and top-1 agreement; beside them cheap proxies from the
weights and the calibration inputs (weight nMSE, output error, kurtosis, max/RMS, activation-weighted error).
Units, probes, proxy correlations and ``Prober`` (a model prepared once for many probes) are in ``probe``.

Prefix caching: a unit whose layers lie in blocks b and later leaves blocks 0..b−1 as they are, so the hidden
states entering every block are computed once per evaluation window (``PrefixCache``, in ``prefix_cache``),
and a probe runs blocks b..end and the head only. The cache lives in memory up to
``sensitivity.cache_memory_mb``, in a file under the cache folder beyond that. The base is probed through the
same path, so that every Δ is between two runs of the very same code.

A probe's summary is kept on disk under its inputs (base reference, calibration, layers, quantization, the
numerics version), so ``harness allocate`` reuses what ``harness sensitivity`` measured.

The allocation under a budget is arithmetic on probe results (``allocate``). ``run_sensitivity`` and
``run_allocation`` (in ``drivers``) drive a whole experiment: they log to MLflow through ``harness.tracking``
and write ``results/<experiment>/``.
"""

from __future__ import annotations

from harness.sensitivity.drivers import (
    ALLOCATION_CLAIM,
    LLAMA_CPP_MORE_BITS,
    TABLE,
    Evaluated,
    SensitivityReport,
    run_allocation,
    run_sensitivity,
)
from harness.sensitivity.prefix_cache import PrefixCache, SensitivityError
from harness.sensitivity.probe import (
    PROXIES,
    Prober,
    Unit,
    choice_config,
    choice_label,
    correlations,
    make_units,
    probe,
)

__all__ = [
    "ALLOCATION_CLAIM",
    "LLAMA_CPP_MORE_BITS",
    "PROXIES",
    "TABLE",
    "Evaluated",
    "PrefixCache",
    "Prober",
    "SensitivityError",
    "SensitivityReport",
    "Unit",
    "choice_config",
    "choice_label",
    "correlations",
    "make_units",
    "probe",
    "run_allocation",
    "run_sensitivity",
]
