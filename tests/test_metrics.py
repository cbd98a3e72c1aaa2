"""Storage accounting from stored bytes, error metrics, and the reference curves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import weight

from harness.metrics import (
    METRICS,
    bits_per_param,
    error_metrics,
    gaussian_rate_distortion,
    lloyd_max_mse,
    markdown_table,
    metric,
    register_metric,
    stored_bytes,
)
from harness.quant.double_quant import DoubleQuantConfig
from harness.quant.quantize import QuantConfig, dequantize, quantize


def test_qlora_storage_arithmetic() -> None:
    w = weight("gaussian", (4096, 1024))
    assert bits_per_param(quantize(w, QuantConfig("nf4", 64))) == 4.5
    dq = quantize(w, QuantConfig("nf4", 64, DoubleQuantConfig()))
    assert bits_per_param(dq) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel(), abs=1e-12)
    assert round(4 + 8 / 64 + 32 / (64 * 256), 6) == 4.126953


def test_partial_blocks_and_padding_are_counted() -> None:
    qt = quantize(torch.randn(101), QuantConfig("nf4", 64))
    assert stored_bytes(qt) == 51 + 2 * 4  # 101 nibbles -> 51 bytes, two fp32 constants


def test_registry_declares_each_metric_once() -> None:
    assert metric("nmse").better == "lower" and metric("nmse").aggregation == "numel_weighted"
    assert metric("nmse_max").layer_column == "nmse" and metric("ppl").layer_column is None
    with pytest.raises(ValueError, match="declared twice"):
        register_metric("ppl", "PPL", "", "lower", "model", "again")
    with pytest.raises(KeyError, match="undeclared metric 'perplexity'"):
        metric("perplexity")
    assert all(spec.definition and spec.name == name for name, spec in METRICS.items())


def test_task_families_fill_in_the_task() -> None:
    acc = metric("acc_piqa")
    assert (acc.name, acc.label, acc.stderr, acc.better) == (
        "acc_piqa",
        "piqa acc",
        "acc_piqa_stderr",
        "higher",
    )
    assert metric("acc_piqa_stderr").better is None  # the most specific family wins
    assert metric("acc_norm_arc_easy").stderr == "acc_norm_arc_easy_stderr"


def test_readme_metric_table_is_the_registry() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- metrics: generated from harness.metrics -->\n", "<!-- /metrics -->"
    assert begin in readme and end in readme, "README.md lost its metric table markers"
    shown = readme.split(begin, 1)[1].split(end, 1)[0]
    assert shown == markdown_table(), (
        "README's metric table differs from the registry: paste markdown_table()"
    )


def test_error_metrics_definitions() -> None:
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    approx = torch.tensor([1.0, -2.0, 2.0, 0.5])
    m = error_metrics(w, approx)
    assert m["mse"] == 0.25 and m["max_abs"] == 1.0
    assert m["nmse"] == pytest.approx(0.25 / (14.25 / 4))
    assert m["rel_fro"] == pytest.approx(1 / math.sqrt(14.25))
    assert m["sqnr_db"] == pytest.approx(10 * math.log10((14.25 / 4) / 0.25))
    assert m["cosine"] == pytest.approx(11.25 / (math.sqrt(14.25) * math.sqrt(9.25)))
    assert error_metrics(w, w)["sqnr_db"] == math.inf


def test_reference_numbers_reproduce() -> None:
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    nmse = error_metrics(w, dequantize(quantize(w, QuantConfig("nf4", 64))))["nmse"]
    assert nmse == pytest.approx(0.008462, abs=2e-5)  # REFERENCE.md, N(0,1)
    assert lloyd_max_mse(16) == pytest.approx(0.0095010, abs=1e-7)
    assert gaussian_rate_distortion(4) == 0.00390625
    assert gaussian_rate_distortion(4.127) == pytest.approx(0.003276, abs=1e-6)
    assert lloyd_max_mse(2) == pytest.approx(1 - 2 / math.pi, rel=1e-6)  # 1-bit optimum, closed form


def test_the_kld_definition_says_what_a_top_k_reference_computes() -> None:
    """The head of a top-k reference is exact and its tail an unbiased sampled estimate (see
    ``harness.evaluate.divergence``): the definition the tables and the README show says the same."""
    from harness.evaluate import divergence

    definition = metric("kld_mean").definition
    assert "lower bound" not in definition
    assert "head is exact" in definition and "without bias" in definition
    assert "has its head exact" in divergence.__doc__ and "without\n  bias" in divergence.__doc__
