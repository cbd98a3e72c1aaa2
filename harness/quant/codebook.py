"""Nearest-level search in a codebook, and blockwise scaling: the two steps every format shares.

Semantics follow bitsandbytes' CPU path (``backends/default/ops.py``) exactly:
- a block is a contiguous run of the flattened tensor; a final partial block gets its own constant;
- full blocks are scaled by ``x * (1 / s)``, the partial block by ``x / s`` (bnb does both; they can differ
  in the last bit), with ``s`` clamped to at least 1e-38 so an all-zero block gives zeros, not NaN;
- the nearest level is ``bucketize(x, midpoints)``: an exact tie goes to the LOWER level.

That last point is the default tie rule, ``ties_down``. Weights that already sit on a grid (GGUF sources) can
land exactly on a midpoint in large numbers, and then the rule matters, so it is an option. For an exact tie
at the (float32) midpoint m between sorted levels a < b:
- ``ties_down``: a, as bitsandbytes (``torch.bucketize``);
- ``ties_away``: the level of larger magnitude: b if m > 0, a if m < 0, a if m == 0;
- ``ties_even``: the level an even number of sorted steps from the level nearest zero. For int formats that
  is round-half-to-even on the integer code j, as ``torch.round`` and torchao do; for nf4 the steps count
  from its zero level; for fp4 (levels ±0) from the zero on the same side, which is IEEE's even mantissa.
  Where both neighbours are equally far (a tie at 0 between ±0, or between ±c when no level is 0) it is a.
Between two equal levels (fp4's ±0) there is nothing to decide: every rule takes the lower, so zeros keep
bnb's code, and such a midpoint does not count as a tie.

The search uses a lookup table instead of a binary search: the scaled value's bin (exact, since bins are
powers of two wide) gives the candidate level, and one comparison against the one decision threshold that
can lie in that bin finishes it. The threshold is the midpoint, or, where a tie goes up, the float32 just
below it: ``x > nextafter(m, -inf)`` is ``x >= m`` for float32 x, so every rule costs one comparison. The
result is identical to ``torch.bucketize``, and several times faster on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal, get_args

import torch

Rounding = Literal["ties_down", "ties_even", "ties_away"]
ROUNDING_RULES: tuple[str, ...] = get_args(Rounding)
_MAX_LUT_BINS = 1 << 16
_SHORT = 4096  # below this many values, launching the lookup's operations costs more than a binary search


@dataclass(frozen=True)
class Codebook:
    levels: torch.Tensor  # float32, in code order
    sorted_levels: torch.Tensor
    code_of_sorted: torch.Tensor  # int64: code of the i-th smallest level
    midpoints: torch.Tensor  # float32, between consecutive sorted levels
    ties: torch.Tensor  # float32 per midpoint: the midpoint where its levels differ, else NaN (no tie)
    thresholds: torch.Tensor  # float32 per midpoint: above it, the upper level (see the module docstring)
    lut_shift: float  # 2**p: bin index = floor(x * 2**p) - lut_base
    lut_base: int
    lut_count: torch.Tensor | None  # int64 per bin: midpoints below the bin's lower edge; None = bucketize
    lut_tie: torch.Tensor | None  # float32 per bin: ``ties`` of the midpoint inside the bin, or +inf
    lut_threshold: torch.Tensor | None  # float32 per bin: that midpoint's threshold, or +inf

    @property
    def low(self) -> float:
        return float(self.sorted_levels[0])

    @property
    def high(self) -> float:
        return float(self.sorted_levels[-1])

    def nearest(self, scaled: torch.Tensor) -> torch.Tensor:
        """Codes (int64) of the levels nearest to float32 ``scaled``, which must lie in [low, high]. A short
        input (a column of a method that rounds one at a time) takes bucketize: fewer operations to launch,
        and the same answer."""
        if self.lut_count is None or scaled.numel() <= _SHORT:
            index = torch.bucketize(scaled, self.thresholds)
        else:
            bins = torch.floor(scaled * self.lut_shift).to(torch.int64).sub_(self.lut_base)
            index = self.lut_count[bins] + (scaled > self.lut_threshold[bins])
        return self.code_of_sorted[index]

    def on_midpoint(self, scaled: torch.Tensor) -> torch.Tensor:
        """Whether each float32 ``scaled`` value (in [low, high]) is exactly the midpoint of two distinct
        levels: a tie, which the rounding rule decides."""
        if self.lut_count is None:
            index = torch.bucketize(scaled, self.midpoints).clamp_(max=self.midpoints.numel() - 1)
            return scaled == self.ties[index]
        bins = torch.floor(scaled * self.lut_shift).to(torch.int64).sub_(self.lut_base)
        return scaled == self.lut_tie[bins]


@cache
def codebook(
    levels: tuple[float, ...], device: torch.device | str = "cpu", rounding: Rounding = "ties_down"
) -> Codebook:
    if rounding not in ROUNDING_RULES:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDING_RULES)}, got {rounding!r}")
    values = torch.tensor(levels, dtype=torch.float32)
    order = torch.argsort(values)  # not stable, as in bnb: decides which of ±0 a zero maps to
    sorted_levels = values[order]
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    ties = torch.where(sorted_levels[:-1] < sorted_levels[1:], midpoints, torch.tensor(math.nan))
    tie_up = _tie_up(sorted_levels, midpoints, rounding)
    below = torch.nextafter(midpoints, torch.tensor(-math.inf))
    thresholds = torch.where(tie_up, below, midpoints)
    assert bool((thresholds.diff() >= 0).all()), "decision thresholds must stay sorted"
    lut = _lookup_table(sorted_levels, midpoints)
    shift, base, count, index = lut if lut else (1.0, 0, None, None)
    to = {"device": device}

    def per_bin(per_midpoint: torch.Tensor) -> torch.Tensor | None:
        if index is None:
            return None
        padded = torch.cat([per_midpoint, torch.tensor([math.inf])])
        return padded[index].to(**to)

    return Codebook(
        levels=values.to(**to),
        sorted_levels=sorted_levels.to(**to),
        code_of_sorted=order.to(**to),
        midpoints=midpoints.to(**to),
        ties=ties.to(**to),
        thresholds=thresholds.to(**to),
        lut_shift=shift,
        lut_base=base,
        lut_count=None if count is None else count.to(**to),
        lut_tie=per_bin(ties),
        lut_threshold=per_bin(thresholds),
    )


def _tie_up(sorted_levels: torch.Tensor, midpoints: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """Per midpoint, whether the rule sends an exact tie to the upper level (see the module docstring)."""
    distinct = sorted_levels[:-1] < sorted_levels[1:]
    if rounding == "ties_down":
        return torch.zeros_like(distinct)
    if rounding == "ties_away":
        return distinct & (midpoints > 0)
    # ties_even: sorted steps from the level(s) nearest zero; the upper level wins when it alone is even.
    magnitude = sorted_levels.abs()
    nearest = torch.nonzero(magnitude == magnitude.min()).flatten()
    i = torch.arange(sorted_levels.numel())
    steps = torch.clamp(i - nearest.max(), min=0) + torch.clamp(nearest.min() - i, min=0)
    even = steps % 2 == 0
    return distinct & even[1:] & ~even[:-1]


def _lookup_table(
    sorted_levels: torch.Tensor, midpoints: torch.Tensor
) -> tuple[float, int, torch.Tensor, torch.Tensor] | None:
    """The coarsest power-of-two binning with at most one midpoint per bin, or None if it would be huge.

    Returns the shift, the base, the count of midpoints below each bin and the index of the midpoint inside
    each bin (``len(midpoints)`` where there is none)."""
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
    inside = padded[count].double() < upper
    # Bins are narrower than the smallest gap, so each holds at most one midpoint: one comparison will do.
    assert bool((torch.searchsorted(midpoints.double(), upper) - count <= 1).all())
    index = torch.where(inside, count, torch.tensor(midpoints.numel()))
    return shift, base, count, index


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
