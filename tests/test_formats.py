"""Format descriptions: the codebooks are pinned to their definitions."""

from __future__ import annotations

import pytest
import torch

from harness.quant.formats import UnknownFormatError, get_format, known_format_names

NF4_BNB = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_is_bnb_table_bit_for_bit() -> None:
    assert torch.equal(torch.tensor(get_format("nf4").levels), torch.tensor(NF4_BNB, dtype=torch.float32))


@pytest.mark.parametrize("bits", range(2, 9))
def test_nf_k_construction(bits: int) -> None:
    levels = torch.tensor(get_format(f"nf{bits}").levels)
    assert levels.numel() == 2**bits
    assert levels.min() == -1 and levels.max() == 1 and (levels == 0).sum() == 1  # zero exact
    assert bool((levels.diff() > 0).all())
    assert (levels > 0).sum() == 2 ** (bits - 1)  # asymmetric: one more positive level


def test_fp4_variants_differ_only_where_documented() -> None:
    mags = {n: sorted({abs(v) for v in get_format(n).levels}) for n in ("fp4", "fp4_e2m1", "fp4_e3m0")}
    assert mags["fp4"] == pytest.approx([0, 1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])
    assert mags["fp4_e2m1"] == pytest.approx([0, 1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])
    assert mags["fp4"][2:] == mags["fp4_e2m1"][2:]
    assert mags["fp4_e3m0"] == pytest.approx([0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1])
    # bnb's fp4 code order: bit 3 is the sign, code 2 is the largest magnitude (8/12)
    assert get_format("fp4").levels[2] == pytest.approx(8 / 12) and get_format("fp4").levels[10] < 0


def test_int_levels() -> None:
    assert get_format("int4").levels == tuple(k / 7 for k in range(-7, 8))
    assert len(get_format("int8").levels) == 255
    assert get_format("int4_asym").levels[0] == 0 and get_format("int4_asym").levels[-1] == 1


def test_fp8_levels_are_the_finite_values() -> None:
    e4m3 = torch.tensor(get_format("fp8_e4m3").levels) * 448
    assert e4m3.numel() == 253 and e4m3.max() == 448
    assert torch.equal(e4m3, e4m3.to(torch.float8_e4m3fn).float())  # every level is representable
    assert len(get_format("fp8_e5m2").levels) == 247


def test_fixed_block_formats() -> None:
    assert get_format("mxfp4").block_size == 32 and get_format("mxfp4").scale_rule == "e8m0"
    assert get_format("nvfp4").block_size == 16 and get_format("nvfp4").scale_rule == "e4m3_fp32"
    assert get_format("nf4").block_size is None


def test_unknown_format_lists_known_ones() -> None:
    with pytest.raises(UnknownFormatError, match=r"unknown format 'nf9'.*nf4.*mxfp4"):
        get_format("nf9")
    assert "int4_asym" in known_format_names() and "fp8_e5m2" in known_format_names()
