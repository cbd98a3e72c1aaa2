"""Blockwise quantization semantics: blocks, ties, zeros, bad input, storage, and both code paths."""

from __future__ import annotations

import pytest
import torch
from conftest import weight
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.quant.quantize as quantize_module
from harness.metrics import bits_per_param
from harness.quant.double_quant import DoubleQuantConfig
from harness.quant.formats import get_format
from harness.quant.packing import unpack
from harness.quant.quantize import QuantConfig, QuantizationError, dequantize, fake_quant, quantize

FOUR_BIT = ["nf4", "fp4", "fp4_e2m1", "fp4_e3m0", "int4", "af4", "int4_asym", "mxfp4", "nvfp4"]
ALL = [*FOUR_BIT, "nf2", "nf3", "int8", "int3_asym", "nf8", "fp8_e4m3", "fp8_e5m2"]


def codes_of(qt: quantize_module.QuantizedTensor) -> torch.Tensor:
    return unpack(qt.codes, qt.format.bits, qt.numel).long()


def test_seed_int8_worked_example() -> None:
    x = torch.tensor([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2])
    qt = quantize(x, QuantConfig("int8", "tensor"))
    assert (codes_of(qt) - 127).tolist() == [33, -14, -70, 35, -59, 10, 47, 127]


def test_ties_go_to_the_lower_level() -> None:
    # int4 levels are k/7; 0.5/7 sits exactly between 0 and 1/7 once scaled by absmax 1.
    x = torch.tensor([1.0, 0.5 / 7, -0.5 / 7, 1.5 / 7], dtype=torch.float64).float()
    values = dequantize(quantize(x, QuantConfig("int4", "tensor")))
    midpoint_lower = torch.tensor(get_format("int4").levels).float()
    assert values[1] <= x[1] and values[2] <= x[2]
    assert values[1] in midpoint_lower and values[2] in midpoint_lower


def test_partial_last_block_gets_its_own_constant() -> None:
    x = torch.cat([torch.full((64,), 8.0), torch.full((10,), 0.5)])
    qt = quantize(x, QuantConfig("nf4", 64))
    assert qt.scales.tolist() == [8.0, 0.5]
    assert torch.equal(dequantize(qt), x)


def test_all_zero_block_gives_zeros(weight_kind: str) -> None:
    for name in ALL:
        x = weight(weight_kind, (4, 64))
        x[1] = 0
        out = fake_quant(x, QuantConfig(name))
        assert torch.isfinite(out).all(), name
        assert (out[1] == 0).all(), name


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000, "channel", "tensor"])
def test_block_sizes(block_size: int | str) -> None:
    w = weight("gaussian", (48, 40))
    qt = quantize(w, QuantConfig("nf4", block_size))
    expected = {"channel": 40, "tensor": 48 * 40}.get(block_size, block_size)  # type: ignore[arg-type]
    assert qt.block_size == expected
    assert qt.scales.numel() == -(-w.numel() // expected)
    if block_size == "channel":
        assert torch.equal(qt.scales, w.abs().amax(dim=1))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_format_roundtrips_in_every_dtype(name: str, dtype: torch.dtype) -> None:
    w = weight("student_t", (33, 96), dtype)
    out = fake_quant(w, QuantConfig(name))
    assert out.dtype == dtype and out.shape == w.shape
    rel = (out.float() - w.float()).norm() / w.float().norm()
    assert rel < (0.7 if get_format(name).bits <= 3 else 0.25)


def test_fake_quant_into_compute_dtype() -> None:
    """The dequantized weight, cast once into the compute dtype: bf16 rounding of the fp32 values."""
    w = weight("gaussian", (64, 64))
    cast = fake_quant(w, QuantConfig("nf4"), torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, fake_quant(w, QuantConfig("nf4")).bfloat16())
    assert not torch.equal(cast.float(), fake_quant(w, QuantConfig("nf4")))  # it did round


@pytest.mark.parametrize("name", FOUR_BIT)
@pytest.mark.parametrize("block_size", [None, 3, 64, "channel"])
def test_fused_cpu_kernel_matches_torch_path(name: str, block_size: int | str | None) -> None:
    if get_format(name).block_size is not None and block_size is not None:
        return
    w = weight("real", (37, 70))
    fast = quantize(w, QuantConfig(name, block_size))
    quantize_module._CPU_KERNELS_ENABLED = False
    try:
        slow = quantize(w, QuantConfig(name, block_size))
        slow_values = dequantize(slow)
    finally:
        quantize_module._CPU_KERNELS_ENABLED = True
    assert torch.equal(fast.codes, slow.codes)
    assert torch.equal(dequantize(fast), slow_values)


def test_constant_dtype_option() -> None:
    w = weight("gaussian", (64, 128))
    qt = quantize(w, QuantConfig("nf4", 64, constant_dtype="float16"))
    assert qt.scales.dtype == torch.float16
    assert bits_per_param(qt) == pytest.approx(4 + 16 / 64)
    assert (dequantize(qt) - w).norm() / w.norm() < 0.1


def test_affine_int_is_exact_on_its_own_grid() -> None:
    # A tensor already on a per-block 4-bit affine grid (like GGUF Q4_1) re-quantizes with ~zero error.
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 32), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15  # every block uses its full range
    d, m = torch.rand(64, 1, generator=g) * 0.01, torch.randn(64, 1, generator=g) * 0.01
    w = q * d + m
    out = fake_quant(w, QuantConfig("int4_asym", 32))
    assert ((out - w).square().mean() / w.square().mean()) < 1e-10


def test_mx_scale_is_a_power_of_two() -> None:
    w = weight("gaussian", (8, 64))
    qt = quantize(w, QuantConfig("mxfp4"))
    scales = qt.block_scales()
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))
    amax = w.reshape(-1, 32).abs().amax(1)
    assert torch.equal(scales, torch.exp2(torch.floor(torch.log2(amax)) - 2))
    assert bits_per_param(qt) == 4.25


def test_nvfp4_scales() -> None:
    w = weight("gaussian", (8, 64))
    qt = quantize(w, QuantConfig("nvfp4"))
    assert qt.tensor_scale is not None and qt.tensor_scale == w.abs().max() / (6 * 448)
    assert bits_per_param(qt) == pytest.approx(4.5 + 32 / w.numel())


def test_empty_tensor() -> None:
    for name in ["nf4", "int4_asym", "mxfp4", "nvfp4"]:
        qt = quantize(torch.empty(0, 16), QuantConfig(name))
        assert torch.equal(dequantize(qt), torch.empty(0, 16))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: QuantConfig("nf9"), "unknown format 'nf9'"),
        (lambda: QuantConfig("nf4", 0), "block_size must be a positive integer"),
        (lambda: QuantConfig("nf4", -64), "block_size must be a positive integer"),
        (lambda: QuantConfig("nf4", 6.5), "block_size must be a positive integer"),  # type: ignore[arg-type]
        (lambda: QuantConfig("nf4", "row"), "block_size must be a positive integer"),  # type: ignore[arg-type]
        (lambda: QuantConfig("mxfp4", 64), "mxfp4 fixes its block size at 32"),
        (lambda: QuantConfig("int4_asym", 64, DoubleQuantConfig()), "double_quant applies to"),
        (lambda: QuantConfig("nf4", 64, constant_dtype="float8"), "constant_dtype must be one of"),
        (
            lambda: QuantConfig("nf4", 64, rounding="nearest"),  # type: ignore[arg-type]
            "rounding must be one of ties_down, ties_even, ties_away, got 'nearest'",
        ),
        (lambda: DoubleQuantConfig(code="int4"), "unknown double_quant.code"),
        (lambda: DoubleQuantConfig(block_size=0), "double_quant.block_size"),
    ],
)
def test_bad_options_give_clear_errors(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_tensors_name_the_tensor() -> None:
    with pytest.raises(QuantizationError, match=r"layers\.3\.q_proj: cannot quantize an integer tensor"):
        quantize(torch.ones(4, 4, dtype=torch.int32), QuantConfig("nf4"), name="layers.3.q_proj")
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    bad[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match=r"w: 2 NaN/Inf value\(s\)"):
        quantize(bad, QuantConfig("nf4"), name="w")


@pytest.mark.parametrize("name", ["nf4", "int4_asym", "mxfp4", "nvfp4"])  # one per scale rule
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_caught_by_every_scale_rule(name: str, value: float) -> None:
    w = torch.randn(3, 70)
    w[2, 69] = value  # in the partial last block of a flat 210 = 6 x 32 + 18
    with pytest.raises(QuantizationError, match=r"w: 1 NaN/Inf value\(s\)"):
        quantize(w, QuantConfig(name), name="w")


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300),
    name=st.sampled_from(["nf4", "fp4", "int4", "fp4_e2m1", "af4", "int8", "nf3"]),
    block_size=st.integers(1, 70),
)
def test_error_bounded_by_half_a_step(data: list[float], name: str, block_size: int) -> None:
    fmt = get_format(name)
    if fmt.block_size is not None:
        block_size = fmt.block_size
    x = torch.tensor(data, dtype=torch.float32)
    qt = quantize(x, QuantConfig(name, block_size))
    out = dequantize(qt)
    levels = torch.tensor(sorted(set(fmt.levels)))
    half_step = float(levels.diff().max()) / 2
    absmax = qt.block_scales().repeat_interleave(block_size)[: x.numel()]
    assert bool(((out - x).abs() <= half_step * absmax * (1 + 1e-5) + 1e-30).all())


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=200),
    name=st.sampled_from(["nf4", "fp4", "int4", "int4_asym", "mxfp4", "nvfp4", "fp8_e4m3"]),
)
def test_fake_quant_is_idempotent(data: list[float], name: str) -> None:
    x = torch.tensor(data, dtype=torch.float32)
    cfg = QuantConfig(name, 32 if get_format(name).block_size is None else None)
    once = fake_quant(x, cfg)
    twice = fake_quant(once, cfg)
    assert torch.allclose(once, twice, rtol=1e-6, atol=1e-6 * float(x.abs().max()) + 1e-30)
