"""The tie rule: exact ties between two levels, decided by ``rounding``, on both code paths; non-ties
untouched; the share of ties (``tie_fraction``) exact; and the ties a real GGUF source has."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import weight

import harness.quant.quantize as quantize_module
from harness import assets
from harness.quant.codebook import ROUNDING_RULES, codebook
from harness.quant.formats import get_format
from harness.quant.packing import unpack
from harness.quant.quantize import QuantConfig, dequantize, quantize, tie_fraction, tie_mask

FOUR_BIT = ["nf4", "fp4", "fp4_e2m1", "fp4_e3m0", "int4", "af4", "int4_asym", "mxfp4", "nvfp4"]
TORCH_PATH_ONLY = ["int8", "nf3", "fp8_e4m3", "fp8_e5m2"]  # fp8: no lookup table, the bucketize path
_TENSOR_SCALE_EXPONENT = -10  # nvfp4: the fp32 tensor scale made a power of two, 2**-10


def codes(x: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    qt = quantize(x, config)
    return unpack(qt.codes, qt.format.bits, qt.numel).long()


@pytest.fixture(params=["kernel", "torch"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both code paths: the fused numba kernel (4-bit on CPU) and the plain torch ops."""
    quantize_module._CPU_KERNELS_ENABLED = request.param == "kernel"
    try:
        yield request.param
    finally:
        quantize_module._CPU_KERNELS_ENABLED = True


def tie_rich(
    name: str, size: int | None = None, blocks: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``size`` (default: the format's, else 64) that scale exactly (power-of-two divisors) onto a
    third midpoints, a third levels and a third random values, and the mask of the ties (the midpoints of
    distinct levels)."""
    fmt = get_format(name)
    book = codebook(fmt.levels)
    size = size or fmt.block_size or 64
    g = torch.Generator().manual_seed(seed)
    distinct = book.midpoints[book.sorted_levels[:-1] < book.sorted_levels[1:]]
    levels = book.sorted_levels[torch.randint(book.sorted_levels.numel(), (blocks, size), generator=g)]
    kind = torch.randint(3, (blocks, size), generator=g)
    uniform = book.low + (book.high - book.low) * torch.rand(blocks, size, generator=g)
    scaled = torch.where(
        kind == 0,
        distinct[torch.randint(distinct.numel(), (blocks, size), generator=g)],
        torch.where(kind == 1, levels, uniform),
    )
    mask = kind == 0
    # Anchors fix each block's statistic so that its divisor is exactly 2**exponent.
    exponent = torch.randint(-6, 1, (blocks, 1), generator=g).float()
    if fmt.scale_rule == "absmax":
        scaled[:, 0] = torch.where(torch.rand(blocks, generator=g) < 0.5, -1.0, 1.0)
    elif fmt.scale_rule == "affine":
        scaled[:, 0], scaled[:, 1] = 0.0, 1.0
        mask[:, 1] = False
    elif fmt.scale_rule == "e8m0":
        scaled[:, 0] = 6.0  # floor(log2 6) - 2 = 0
    else:  # e4m3_fp32: block 0 sets the tensor scale, every other block's amax/6 is a power of two
        exponent = torch.randint(0, 8, (blocks, 1), generator=g).float() + _TENSOR_SCALE_EXPONENT
        exponent[0] = _TENSOR_SCALE_EXPONENT
        scaled[:, 0] = 6.0
        scaled[0] = levels[0] * 448  # its divisor is 448 times the tensor scale: not exact, so no ties
        scaled[0, 0] = 6.0 * 448
        mask[0] = False
    mask[:, 0] = False
    return (scaled * torch.exp2(exponent)).reshape(-1), mask.reshape(-1)


# Hand-made ties: pairs of codes (lower level first) and the code each rule picks, per format.
HAND_MADE = {
    # int4 code c is level (c - 7)/7: ties at j + 1/2 for j = 0, 1, -1, -2, 6
    "int4": (
        [(7, 8), (8, 9), (6, 7), (5, 6), (13, 14)],
        {"ties_down": [7, 8, 6, 5, 13], "ties_even": [7, 9, 7, 5, 13], "ties_away": [8, 9, 6, 5, 14]},
    ),
    # nf4 codes are sorted; code 7 is its zero
    "nf4": (
        [(7, 8), (8, 9), (6, 7), (5, 6), (14, 15)],
        {"ties_down": [7, 8, 6, 5, 14], "ties_even": [7, 9, 7, 5, 15], "ties_away": [8, 9, 6, 5, 15]},
    ),
    # bnb fp4 magnitudes by code: 1 → 1/192, 6 → 1/6, 7 → 1/4, 5 → 1/2, 2 → 2/3, 3 → 1; 8 + c is −(c)
    "fp4": (
        [(1, 6), (6, 7), (5, 2), (2, 3), (15, 14), (11, 10)],
        {
            "ties_down": [1, 6, 5, 2, 15, 11],
            "ties_even": [6, 6, 2, 2, 14, 10],
            "ties_away": [6, 7, 2, 3, 15, 11],
        },
    ),
}


@pytest.mark.parametrize("rounding", ROUNDING_RULES)
@pytest.mark.parametrize("name", list(HAND_MADE))
def test_each_rule_on_hand_made_ties(name: str, rounding: str, path: str) -> None:
    pairs, expected = HAND_MADE[name]
    levels = torch.tensor(get_format(name).levels)
    ties = torch.stack([(levels[a] + levels[b]) / 2 for a, b in pairs])  # the codebook's own float32 sums
    x = torch.cat([torch.ones(1), ties])  # absmax 1: scaled values are the ties themselves
    config = QuantConfig(name, "tensor", rounding=rounding)  # type: ignore[arg-type]
    assert codes(x, config)[1:].tolist() == expected[rounding]
    assert tie_mask(x, config).tolist() == [False] + [True] * len(pairs)


def test_int4_ties_even_is_round_half_to_even() -> None:
    halves = torch.tensor([0.5, 1.5, -0.5, -1.5, 6.5, -6.5, 2.5, -3.5])
    levels = torch.tensor(get_format("int4").levels)
    lower = torch.floor(halves).long() + 7  # int4 code c is level (c - 7)/7
    x = torch.cat([torch.ones(1), (levels[lower] + levels[lower + 1]) / 2])
    picked = codes(x, QuantConfig("int4", "tensor", rounding="ties_even"))[1:] - 7
    assert torch.equal(picked, torch.round(halves).long())  # torch.round and torchao round half to even


@pytest.mark.parametrize("name", ["fp4", "fp4_e2m1", "mxfp4"])
def test_zero_is_no_tie_and_keeps_its_code(name: str) -> None:
    x = torch.tensor([1.0, 0.0, -0.0] * 4) * (6.0 if name == "mxfp4" else 1.0)
    found = {rule: codes(x, QuantConfig(name, rounding=rule)) for rule in ROUNDING_RULES}  # type: ignore[arg-type]
    assert all(torch.equal(found["ties_down"], c) for c in found.values())
    assert not tie_mask(x, QuantConfig(name)).any()


@pytest.mark.parametrize("name", FOUR_BIT)
@pytest.mark.parametrize("block_size", [None, 63])  # 63: the kernel's general (odd block) path
def test_kernel_matches_torch_path_for_every_rule(name: str, block_size: int | None) -> None:
    if get_format(name).block_size is not None and block_size is not None:
        return
    x, mask = tie_rich(name, block_size)
    x = x[:-5]  # and a partial last block, which is divided rather than multiplied by the reciprocal
    for rounding in ROUNDING_RULES:
        config = QuantConfig(name, block_size, rounding=rounding)  # type: ignore[arg-type]
        fast = quantize(x, config)
        quantize_module._CPU_KERNELS_ENABLED = False
        try:
            slow = quantize(x, config)
        finally:
            quantize_module._CPU_KERNELS_ENABLED = True
        assert torch.equal(fast.codes, slow.codes), rounding
    assert torch.equal(tie_mask(x, QuantConfig(name, block_size)), mask[:-5])  # the ties are really there
    counted = tie_fraction(x, QuantConfig(name, block_size))  # the fused count
    quantize_module._CPU_KERNELS_ENABLED = False
    try:
        assert counted == tie_fraction(x, QuantConfig(name, block_size)) == int(mask[:-5].sum()) / len(x)
    finally:
        quantize_module._CPU_KERNELS_ENABLED = True


@pytest.mark.parametrize("name", FOUR_BIT + TORCH_PATH_ONLY)
def test_tie_mask_and_fraction_are_exact(name: str) -> None:
    x, mask = tie_rich(name)
    config = QuantConfig(name)
    assert torch.equal(tie_mask(x, config), mask)
    assert tie_fraction(x, config) == int(mask.sum()) / mask.numel()
    assert tie_fraction(x.reshape(4, -1), config) == tie_fraction(x, config)  # the shape does not matter


def test_tie_fraction_counts_a_known_number() -> None:
    book = codebook(get_format("int4").levels)
    x = book.sorted_levels[torch.arange(200) % 15].clone()  # levels: no tie
    x[::64] = 1.0  # absmax 1 in every block of 64, and in the partial last one (200 = 3·64 + 8)
    ties = [3, 10, 70, 100, 150, 199]
    x[ties] = book.midpoints[torch.tensor([0, 5, 7, 9, 13, 6])]
    assert tie_fraction(x, QuantConfig("int4", 64)) == len(ties) / 200
    assert tie_mask(x, QuantConfig("int4", 64)).nonzero().flatten().tolist() == ties
    assert tie_fraction(torch.empty(0, 8), QuantConfig("int4")) == 0.0


@pytest.mark.parametrize("name", FOUR_BIT + TORCH_PATH_ONLY)
def test_rules_change_codes_only_at_ties(name: str) -> None:
    x, mask = tie_rich(name)
    gaussian = weight("gaussian", (64, 256)).reshape(-1)
    down = QuantConfig(name)
    for rounding in ("ties_even", "ties_away"):
        other = QuantConfig(name, rounding=rounding)  # type: ignore[arg-type]
        differ = codes(x, down) != codes(x, other)
        assert differ.any() and not (differ & ~mask).any(), rounding
        assert torch.equal(codes(gaussian, down), codes(gaussian, other)), rounding  # no exact ties there
        assert not tie_mask(gaussian, down).any()


def test_rounding_does_not_change_the_error_of_a_tie() -> None:
    x, _ = tie_rich("int4")
    errors = [(dequantize(quantize(x, QuantConfig("int4", rounding=r))) - x).abs() for r in ROUNDING_RULES]
    for e in errors[1:]:
        assert torch.allclose(e, errors[0], rtol=1e-6, atol=0)


@pytest.mark.integration
def test_smollm2_q4_1_weights_have_int4_ties() -> None:
    """SmolLM2's Q4_1 weights sit on a grid: some land exactly on int4-b64 midpoints, and only those move."""
    if not assets.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched: run `harness fetch smollm2-135m`")
    from harness.models import discover_layers, load_model

    loaded = load_model("smollm2-135m")
    config = QuantConfig("int4", 64)
    layers = discover_layers(loaded, include=["model.layers.1[05].*"])  # 14 of 210 layers
    weights = [loaded.model.get_submodule(info.name).weight.detach() for info in layers]
    fractions = [tie_fraction(w, config) for w in weights]
    assert max(fractions) > 2e-4  # measured: 0.03 % over all layers, up to 0.07 % (layers.10.v_proj)
    w = weights[fractions.index(max(fractions))]
    mask = tie_mask(w, config)
    differ = codes(w, config) != codes(w, QuantConfig("int4", 64, rounding="ties_even"))
    assert differ.any() and not (differ & ~mask).any()


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int4_asym", "af4", "nf3", "int8", "mxfp4"])
@pytest.mark.parametrize("rounding", ROUNDING_RULES)
def test_the_lookup_table_and_bucketize_find_the_same_levels(fmt: str, rounding: str) -> None:
    """Long inputs take the lookup table, short ones (a method's column) bucketize: the same level for every
    value, midpoints and their float32 neighbours included."""
    book = codebook(get_format(fmt).levels, "cpu", rounding)  # type: ignore[arg-type]
    midpoints = book.midpoints
    values = torch.cat(
        [
            torch.empty(20_000).uniform_(book.low, book.high, generator=torch.Generator().manual_seed(0)),
            midpoints,
            torch.nextafter(midpoints, torch.tensor(torch.inf)),
            torch.nextafter(midpoints, torch.tensor(-torch.inf)),
            book.sorted_levels,
        ]
    ).clamp(book.low, book.high)
    whole = book.nearest(values)
    in_columns = torch.cat([book.nearest(part) for part in values.split(1024)])
    assert torch.equal(whole, in_columns)
