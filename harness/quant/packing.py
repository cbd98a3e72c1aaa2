"""Dense k-bit packing of codes into bytes.

The codes form one big-endian bit stream: the first code occupies the most significant bits of the first
byte. For 4-bit this is exactly bitsandbytes' layout, ``code[2i] << 4 | code[2i+1]``. The unused
bits of the last byte hold ``pad_code`` (bnb pads with the code of 0.0; we do too, so the bytes match).
``unpack(pack(c, k), k, len(c)) == c`` for every k in 1..8.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int, pad_code: int = 0) -> torch.Tensor:
    """Pack a flat tensor of codes (each < 2**bits) into uint8."""
    _check_bits(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    if bits == 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), pad_code)])
        return (codes[0::2] << 4) | codes[1::2]
    n = codes.numel()
    pad = (-n) % (8 // math.gcd(8, bits))  # enough pad codes to fill whole bytes; the excess is cut below
    if pad:
        codes = torch.cat([codes, codes.new_full((pad,), pad_code)])
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)[: packed_nbytes(n, bits) * 8]
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], device=codes.device, dtype=torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes (uint8) of a packed stream."""
    _check_bits(bits)
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:n].clone()
    if bits == 4:
        return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
    byte_shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: n * bits]
    weights = (1 << torch.arange(bits - 1, -1, -1, device=packed.device)).to(torch.uint8)
    return (stream.view(n, bits) * weights).sum(dim=1, dtype=torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits per code, got {bits}")
