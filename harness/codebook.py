"""Nearest-level search in a codebook, and blockwise scaling: the two steps every format shares.

Semantics follow bitsandbytes' CPU path (``backends/default/ops.py``) exactly:
- a block is a contiguous run of the flattened tensor; a final partial block gets its own constant;
- full blocks are scaled by ``x * (1 / s)``, the partial block by ``x / s`` (bnb does both; they can differ
  in the last bit), with ``s`` clamped to at least 1e-38 so an all-zero block gives zeros, not NaN;
- the nearest level is ``bucketize(x, midpoints)``: an exact tie goes to the LOWER level.

The search uses a lookup table instead of a binary search: the scaled value's bin (exact, since bins are
powers of two wide) gives the candidate level, and one comparison against the one midpoint that can lie in
that bin finishes it. The result is identical to ``torch.bucketize``, and several times faster on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

_MAX_LUT_BINS = 1 << 16


@dataclass(frozen=True)
class Codebook:
    levels: torch.Tensor  # float32, in code order
    sorted_levels: torch.Tensor
    code_of_sorted: torch.Tensor  # int64: code of the i-th smallest level
    midpoints: torch.Tensor  # float32, between consecutive sorted levels
    lut_shift: float  # 2**p: bin index = floor(x * 2**p) - lut_base
    lut_base: int
    lut_count: torch.Tensor | None  # int64 per bin: midpoints below the bin's lower edge; None = bucketize
    lut_mid: torch.Tensor | None  # float32 per bin: the midpoint inside the bin, or +inf

    @property
    def low(self) -> float:
        return float(self.sorted_levels[0])

    @property
    def high(self) -> float:
        return float(self.sorted_levels[-1])

    def nearest(self, scaled: torch.Tensor) -> torch.Tensor:
        """Codes (int64) of the levels nearest to ``scaled``, which must lie in [low, high]."""
        if self.lut_count is None:
            index = torch.bucketize(scaled, self.midpoints)
        else:
            bins = torch.floor(scaled * self.lut_shift).to(torch.int64).sub_(self.lut_base)
            index = self.lut_count[bins] + (scaled > self.lut_mid[bins])
        return self.code_of_sorted[index]


@cache
def codebook(levels: tuple[float, ...], device: torch.device | str = "cpu") -> Codebook:
    values = torch.tensor(levels, dtype=torch.float32)
    order = torch.argsort(values)  # not stable, as in bnb: decides which of ±0 a zero maps to
    sorted_levels = values[order]
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    lut = _lookup_table(sorted_levels, midpoints)
    shift, base, count, mid = lut if lut else (1.0, 0, None, None)
    to = {"device": device}
    return Codebook(
        levels=values.to(**to),
        sorted_levels=sorted_levels.to(**to),
        code_of_sorted=order.to(**to),
        midpoints=midpoints.to(**to),
        lut_shift=shift,
        lut_base=base,
        lut_count=None if count is None else count.to(**to),
        lut_mid=None if mid is None else mid.to(**to),
    )


def _lookup_table(
    sorted_levels: torch.Tensor, midpoints: torch.Tensor
) -> tuple[float, int, torch.Tensor, torch.Tensor] | None:
    """The coarsest power-of-two binning with at most one midpoint per bin, or None if it would be huge."""
    low, high = float(sorted_levels[0]), float(sorted_levels[-1])
    gaps = torch.diff(midpoints)
    smallest_gap = float(gaps[gaps > 0].min()) if gaps.numel() else high - low
    if midpoints.numel() > 1 and torch.any(gaps == 0):
        return None  # duplicate midpoints (three equal levels): leave it to bucketize
    p = max(0, math.ceil(-math.log2(smallest_gap)) + 1) if smallest_gap > 0 else 0
    shift = float(2**p)
    base = math.floor(low * shift)
    n_bins = math.floor(high * shift) - base + 1
    if n_bins > _MAX_LUT_BINS:
        return None
    edges = (torch.arange(n_bins, dtype=torch.float64) + base) / shift  # exact lower edge of each bin
    count = torch.searchsorted(midpoints.double(), edges, right=False)  # midpoints strictly below the edge
    upper = edges + 1 / shift
    padded = torch.cat([midpoints, torch.tensor([math.inf])])
    candidate = padded[count]
    inside = candidate.double() < upper
    # Bins are narrower than the smallest gap, so each holds at most one midpoint: one comparison will do.
    assert bool((torch.searchsorted(midpoints.double(), upper) - count <= 1).all())
    mid = torch.where(inside, candidate, torch.tensor(math.inf))
    return shift, base, count, mid


def block_reduce(flat: torch.Tensor, block_size: int, op: str) -> torch.Tensor:
    """Per-block max |x| ("absmax"), "min" or "max" of a flat fp32 tensor; a partial block gets its own."""
    n = flat.numel()
    full = n - n % block_size

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if op == "absmax":  # max(max x, -min x): no full-size |x| temporary; .abs() fixes the sign of 0
            low, high = torch.aminmax(t, dim=-1)
            return torch.maximum(high, -low).abs_()
        return t.amin(dim=-1) if op == "min" else t.amax(dim=-1)

    parts = [reduce(flat[:full].view(-1, block_size))] if full else []
    if full < n:
        parts.append(reduce(flat[full:].view(1, -1)))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def scale_blocks(
    flat: torch.Tensor, block_size: int, scale: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """``clamp(x / scale, low, high)`` per block, in bnb's exact arithmetic (see the module docstring)."""
    n = flat.numel()
    full = n - n % block_size
    scale = scale.clamp(min=1e-38)
    out = torch.empty_like(flat)
    if full:
        blocks = flat[:full].view(-1, block_size)
        torch.mul(
            blocks, (1.0 / scale[: full // block_size]).unsqueeze(1), out=out[:full].view(-1, block_size)
        )
    if full < n:
        torch.div(flat[full:], scale[-1], out=out[full:])
    return out.clamp_(low, high)


def expand_blocks(values: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """``values * scale`` with one scale per block of the flat fp32 ``values``."""
    n = values.numel()
    full = n - n % block_size
    out = torch.empty_like(values)
    if full:
        torch.mul(
            values[:full].view(-1, block_size),
            scale[: full // block_size].unsqueeze(1),
            out=out[:full].view(-1, block_size),
        )
    if full < n:
        torch.mul(values[full:], scale[-1], out=out[full:])
    return out
