"""k-bit packing: bnb's nibble order for 4-bit, and a lossless round trip for every width."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.quant.packing import pack, packed_nbytes, unpack


def test_four_bit_is_bnb_order() -> None:
    codes = torch.tensor([1, 2, 3, 4, 15], dtype=torch.uint8)
    assert pack(codes, 4, pad_code=7).tolist() == [0x12, 0x34, 0xF7]


@pytest.mark.parametrize("bits", range(1, 9))
def test_sizes(bits: int) -> None:
    for n in (0, 1, 7, 8, 9, 1001):
        assert pack(torch.zeros(n, dtype=torch.uint8), bits).numel() == packed_nbytes(n, bits)


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_roundtrip(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=200))
    codes = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, len(values)), codes)


def test_bad_width() -> None:
    with pytest.raises(ValueError, match=r"1\.\.8 bits"):
        pack(torch.zeros(3, dtype=torch.uint8), 9)
