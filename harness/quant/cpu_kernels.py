"""Fused CPU kernels (numba) for the hot path: 4-bit absmax formats, quantize-and-pack and unpack-and-scale.

They compute exactly what ``codebook`` computes with separate torch ops (same float32 arithmetic,
same lookup table, same decision thresholds, which carry the tie rule); tests assert bit-identical output.
Fusing scaling, level search and nibble packing into one pass over memory is what makes quantization several
times faster than bitsandbytes' CPU path, which runs a single-threaded ``torch.bucketize``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from harness.quant.codebook import Codebook

# Work is split into chunks of two blocks: a chunk always starts on a whole byte, even for odd block sizes.


@njit(cache=True, inline="always")
def _code(v, low, high, shift, base, lut_count, thresholds, code_of_sorted):
    v = min(max(v, low), high)
    k = np.int64(math.floor(v * shift)) - base
    return code_of_sorted[lut_count[k] + (1 if v > thresholds[k] else 0)]


@njit(parallel=True, cache=True)
def _quantize_pack4(
    x, block_size, scale, lut_count, thresholds, code_of_sorted, shift, base, low, high, pad_code
):
    n = x.shape[0]
    n_full = n - n % block_size
    out = np.empty((n + 1) // 2, dtype=np.uint8)
    for chunk in prange((scale.shape[0] + 1) // 2):
        start = 2 * chunk * block_size
        end = min(start + 2 * block_size, n)
        s0 = max(scale[2 * chunk], np.float32(1e-38))
        s1 = max(scale[min(2 * chunk + 1, scale.shape[0] - 1)], np.float32(1e-38))
        inv0 = np.float32(1.0) / s0
        inv1 = np.float32(1.0) / s1
        if block_size % 2 == 0 and end <= n_full:  # fast path: whole blocks, one scale per byte, no branches
            for b in range((end - start) // block_size):
                inv = inv1 if b else inv0
                first = start + b * block_size
                for e in range(first, first + block_size, 2):
                    first_code = _code(
                        x[e] * inv, low, high, shift, base, lut_count, thresholds, code_of_sorted
                    )
                    second_code = _code(
                        x[e + 1] * inv, low, high, shift, base, lut_count, thresholds, code_of_sorted
                    )
                    out[e // 2] = (first_code << 4) | second_code
            continue
        for e in range(start, end, 2):
            byte = 0
            for j in range(2):
                code = pad_code
                if e + j < end:
                    second = e + j - start >= block_size
                    if e + j >= n_full:  # bnb divides in the partial last block
                        v = x[e + j] / (s1 if second else s0)
                    else:
                        v = x[e + j] * (inv1 if second else inv0)
                    code = _code(v, low, high, shift, base, lut_count, thresholds, code_of_sorted)
                byte = (byte << 4) | code
            out[e // 2] = byte
    return out


@njit(parallel=True, cache=True)
def _unpack4_scale(packed, n, block_size, levels, scale):
    out = np.empty(n, dtype=np.float32)
    for chunk in prange((scale.shape[0] + 1) // 2):
        start = 2 * chunk * block_size
        end = min(start + 2 * block_size, n)
        s0 = scale[2 * chunk]
        s1 = scale[min(2 * chunk + 1, scale.shape[0] - 1)]
        if block_size % 2 == 0 and end - start == 2 * block_size:  # fast path, as in _quantize_pack4
            for b in range(2):
                s = s1 if b else s0
                first = start + b * block_size
                for e in range(first, first + block_size, 2):
                    byte = packed[e // 2]
                    out[e] = levels[byte >> 4] * s
                    out[e + 1] = levels[byte & 15] * s
            continue
        for e in range(start, end, 2):
            byte = packed[e // 2]
            out[e] = levels[byte >> 4] * (s1 if e - start >= block_size else s0)
            if e + 1 < end:
                out[e + 1] = levels[byte & 15] * (s1 if e + 1 - start >= block_size else s0)
    return out


def quantize_pack4(flat: torch.Tensor, block_size: int, scale: torch.Tensor, book: Codebook) -> torch.Tensor:
    """Packed 4-bit codes of a flat fp32 CPU tensor, given its fp32 per-block scales."""
    assert book.lut_count is not None and book.lut_threshold is not None
    pad_code = int(book.nearest(torch.zeros(1)))
    packed = _quantize_pack4(
        flat.contiguous().numpy(),
        block_size,
        scale.contiguous().numpy(),
        book.lut_count.numpy(),
        book.lut_threshold.numpy(),
        book.code_of_sorted.to(torch.uint8).numpy(),
        np.float32(book.lut_shift),
        book.lut_base,
        np.float32(book.low),
        np.float32(book.high),
        pad_code,
    )
    return torch.from_numpy(packed)


def unpack4_scale(
    packed: torch.Tensor, n: int, block_size: int, levels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``level[code] * scale`` in fp32 for n elements of a packed 4-bit tensor."""
    padded = torch.cat([levels, levels.new_zeros(16 - levels.numel())])
    return torch.from_numpy(
        _unpack4_scale(packed.numpy(), n, block_size, padded.numpy(), scale.contiguous().numpy())
    )
