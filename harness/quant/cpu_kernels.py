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
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from harness.quant.codebook import Codebook

# Work is split into chunks of two blocks: a chunk always starts on a whole byte, even for odd block sizes.


@njit(cache=True, inline="always")
def _bin(v, low, high, shift, base):
    """``v`` clamped to the codebook's range, and its lookup-table bin."""
    v = min(max(v, low), high)
    return v, np.int64(math.floor(v * shift)) - base


@njit(cache=True, inline="always")
def _code(v, low, high, shift, base, lut_count, thresholds, code_of_sorted):
    v, k = _bin(v, low, high, shift, base)
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
def _count_ties4(x, block_size, scale, lut_tie, shift, base, low, high):
    n = x.shape[0]
    n_full = n - n % block_size
    ties = 0
    for block in prange(scale.shape[0]):
        s = max(scale[block], np.float32(1e-38))
        inv = np.float32(1.0) / s
        for e in range(block * block_size, min((block + 1) * block_size, n)):
            scaled = x[e] / s if e >= n_full else x[e] * inv  # quantize's arithmetic, to the bit
            v, k = _bin(scaled, low, high, shift, base)
            if v == lut_tie[k]:
                ties += 1
    return ties


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


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a·b + c rounded once (LLVM's fma), as torch's ``addr_`` computes its rank-1 update."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        kind = args[0].type
        fma = builder.module.declare_intrinsic("llvm.fma", [kind], ir.FunctionType(kind, [kind] * 3))
        return builder.call(fma, args)

    return signature, codegen


@njit(parallel=True, cache=True)
def _round_columns(
    chunk, errors, codes, u, first, stop, column_group, inverse, scale, minimum, levels,
    lut_count, thresholds, code_of_sorted, shift, base, low, high,
):  # fmt: skip
    rows, batch = chunk.shape
    affine = minimum.shape[1] > 0
    for r in prange(rows):  # rows never meet: each is rounded and updated on its own
        for i in range(first, stop):
            g = column_group[i]
            v = chunk[r, i]
            source = v - minimum[g, r] if affine else v
            scaled = source * inverse[g, r]
            code = _code(scaled, low, high, shift, base, lut_count, thresholds, code_of_sorted)
            value = levels[code] * scale[g, r]
            if affine:
                value = value + minimum[g, r]
            error = (v - value) / u[i, i]
            codes[i, r] = code
            errors[i, r] = error
            for j in range(i, batch):
                chunk[r, j] = _fma(-u[i, j], error, chunk[r, j])


def round_columns(
    chunk: torch.Tensor,
    errors: torch.Tensor,
    codes: torch.Tensor,
    u: torch.Tensor,
    columns: range,
    column_group: torch.Tensor,
    grids: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    book: Codebook,
) -> None:
    """GPTQ's inner loop over ``columns`` of a lazy batch, in place: each column of ``chunk`` (rows × batch,
    fp32) rounded onto its block's grid (``grids``: inverse, scale and affine minimum, groups × rows, picked
    by ``column_group`` per column), its error over ``u``'s diagonal stored in ``errors`` and its code in
    ``codes`` (batch × rows), and the error fed to the batch's later columns through ``u`` (batch × batch).
    The rounding is ``BlockGrid.round``'s, to the bit."""
    assert book.lut_count is not None and book.lut_threshold is not None
    inverse, scale, minimum = grids
    _round_columns(
        chunk.numpy(),
        errors.numpy(),
        codes.numpy(),
        u.contiguous().numpy(),
        columns.start,
        columns.stop,
        column_group.numpy(),
        inverse.contiguous().numpy(),
        scale.contiguous().numpy(),
        (minimum if minimum is not None else scale.new_zeros(scale.shape[0], 0)).contiguous().numpy(),
        book.levels.numpy(),
        book.lut_count.numpy(),
        book.lut_threshold.numpy(),
        book.code_of_sorted.numpy(),
        np.float32(book.lut_shift),
        book.lut_base,
        np.float32(book.low),
        np.float32(book.high),
    )


def count_ties4(flat: torch.Tensor, block_size: int, scale: torch.Tensor, book: Codebook) -> int:
    """How many elements of a flat fp32 CPU tensor scale (as ``quantize_pack4`` scales them) to exactly a
    midpoint of two distinct levels: ``book.on_midpoint`` counted in one pass, without the scaled copy."""
    assert book.lut_tie is not None
    return int(
        _count_ties4(
            flat.contiguous().numpy(),
            block_size,
            scale.contiguous().numpy(),
            book.lut_tie.numpy(),
            np.float32(book.lut_shift),
            book.lut_base,
            np.float32(book.low),
            np.float32(book.high),
        )
    )


def unpack4_scale(
    packed: torch.Tensor, n: int, block_size: int, levels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``level[code] * scale`` in fp32 for n elements of a packed 4-bit tensor."""
    padded = torch.cat([levels, levels.new_zeros(16 - levels.numel())])
    return torch.from_numpy(
        _unpack4_scale(packed.numpy(), n, block_size, padded.numpy(), scale.contiguous().numpy())
    )
