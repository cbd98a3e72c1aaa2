"""Every element data type as a small frozen description, in one registry.

A format is a codebook (its levels, listed in code order) plus the rule that produces the per-block scale:

- ``absmax``: one fp32 constant per block, the block's absolute maximum; levels span [-1, 1]. This is the
  bitsandbytes/QLoRA scheme (nf4, fp4, int4, af4, fp8 elements) and it accepts any block size.
- ``affine``: two constants per block, the minimum and the range; levels span [0, 1]. The zero point is the
  float block minimum (as in llama.cpp's Q4_1), not an integer, so grids that start at the minimum are exact.
- ``e8m0``: OCP MX, a power-of-two scale per 32 elements; levels are element values (E2M1 up to 6).
- ``e4m3_fp32``: NVFP4, an FP8 E4M3 scale per 16 elements times one fp32 scale for the tensor.

Quantization picks the nearest level; an exact tie goes to the lower level, as bitsandbytes does.

The fp4 variants differ in their magnitudes (normalised to a maximum of 1):
- ``fp4``      bitsandbytes' fp4: {0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}; QLoRA's "Float4 (E2M1)" row.
- ``fp4_e2m1`` OCP E2M1:          {0, 1/12, 1/6, 1/4, 1/3, 1/2, 2/3, 1}; differs only in the smallest value.
- ``fp4_e3m0`` exponent-only:     {0, 1/64, 1/32, 1/16, 1/8, 1/4, 1/2, 1}; QLoRA Table 2's "Float4 (E3M0)".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

from harness.errors import HarnessError

ScaleRule = Literal["absmax", "affine", "e8m0", "e4m3_fp32"]


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    levels: tuple[float, ...]  # in code order: code i decodes to levels[i] * scale
    scale_rule: ScaleRule = "absmax"
    block_size: int | None = None  # fixed by the format (MX, NVFP4, AF4); None = any block size
    description: str = ""


# ---- codebook constructions ------------------------------------------------------------------------------


def normal_float_levels(bits: int) -> tuple[float, ...]:
    """NF-k by QLoRA's construction (bitsandbytes ``create_normal_map``), generalised from 4 bits.

    Quantiles of N(0, 1), asymmetric so that 0 is exact: 2^(k-1) positive levels, 2^(k-1)-1 negative ones.
    The outermost quantile is the mean of 1 - 1/(2(2^k - 1)) and 1 - 1/(2·2^k), which for k = 4 is bnb's
    0.9677083. The arithmetic (float32 linspace, float64 ppf, float32 normalisation) follows bnb so that
    nf4 reproduces its table bit for bit.
    """
    from scipy.stats import norm

    n = 2**bits
    offset = ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) / 2
    if bits == 4:
        offset = 0.9677083  # bnb's literal, one ulp away from the formula in float32
    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, half)[:-1].numpy())).tolist()
    values = torch.tensor([*positive, 0.0, *negative], dtype=torch.float32).sort().values
    values /= values.max()
    return tuple(values.tolist())


def symmetric_int_levels(bits: int) -> tuple[float, ...]:
    """Symmetric absmax integers: j / (2^(k-1) - 1) for |j| <= 2^(k-1) - 1; one code stays unused."""
    qmax = 2 ** (bits - 1) - 1
    return tuple(j / qmax for j in range(-qmax, qmax + 1))


def affine_int_levels(bits: int) -> tuple[float, ...]:
    qmax = 2**bits - 1
    return tuple(j / qmax for j in range(qmax + 1))


def fp8_levels(dtype: torch.dtype) -> tuple[float, ...]:
    """All finite values of an FP8 dtype, normalised by its maximum; ±0 merged. Codes index these levels."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values)]
    values = torch.unique(values)  # sorted, and -0.0 == 0.0 so they merge
    return tuple((values / values.abs().max()).tolist())


# E2M1 element values in OCP bit-pattern order (bit 3 is the sign).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# bitsandbytes' fp4 in its code order (functional.get_4bit_type), before division by 12.
_BNB_FP4 = (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3)
# bnb's create_fp8_map(signed=True, exponent_bits=3, precision_bits=0, total_bits=4), sorted; its max is 1.
_E3M0 = (
    -1.0,
    -0.5,
    -0.25,
    -0.125,
    -0.0625,
    -0.03125,
    -0.015625,
    0.0,
    0.0,
    0.015625,
    0.03125,
    0.0625,
    0.125,
    0.25,
    0.5,
    1.0,
)
# bitsandbytes' AF4 table (get_4bit_type("af4", blocksize=64)), in its code order; defined for block 64 only.
_AF4 = (
    1.0,
    0.72424863,
    0.55496234,
    0.42563882,
    0.31675666,
    0.21961274,
    0.12934483,
    0.04273164,
    0.0,
    -0.04934812,
    -0.14982478,
    -0.25607552,
    -0.3736951,
    -0.51243739,
    -0.69441008,
    -1.0,
)


def _normalised(values: tuple[float, ...]) -> tuple[float, ...]:
    t = torch.tensor(values, dtype=torch.float32)
    return tuple((t / t.abs().max()).tolist())


# ---- registry ----------------------------------------------------------------------------------------------

FORMATS: dict[str, Format] = {}  # the formats of fixed levels, by name; the families are generated below


def register_format(fmt: Format) -> Format:
    """Declare a format: experiments, ``get_format`` and ``harness show`` accept its name from then on."""
    if fmt.name in FORMATS or fmt.name in known_format_names():
        raise ValueError(f"format {fmt.name!r} is declared twice")
    FORMATS[fmt.name] = fmt
    return fmt


_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"nf([2-8])", "NormalFloat quantiles of N(0,1) (QLoRA), absmax scale"),
    (r"int([2-8])", "symmetric integers j/(2^(k-1)-1), absmax scale"),
    (r"int([2-8])_asym", "affine integers j/(2^k-1) over [min, max], float zero point"),
)


@cache
def get_format(name: str) -> Format:
    """The format called ``name``; an unknown name raises with the list of known ones."""
    if name in FORMATS:
        return FORMATS[name]
    if m := re.fullmatch(r"nf([2-8])", name):
        bits = int(m[1])
        return Format(name, bits, normal_float_levels(bits), description=_FAMILIES[0][1])
    if m := re.fullmatch(r"int([2-8])", name):
        bits = int(m[1])
        return Format(name, bits, symmetric_int_levels(bits), description=_FAMILIES[1][1])
    if m := re.fullmatch(r"int([2-8])_asym", name):
        bits = int(m[1])
        return Format(name, bits, affine_int_levels(bits), scale_rule="affine", description=_FAMILIES[2][1])
    raise UnknownFormatError(f"unknown format {name!r}; known formats: {', '.join(known_format_names())}")


def known_format_names() -> list[str]:
    families = [f"{p}{k}{s}" for p, s in (("nf", ""), ("int", ""), ("int", "_asym")) for k in range(2, 9)]
    return sorted(families) + sorted(FORMATS)


class UnknownFormatError(HarnessError, ValueError):
    """A format name no registry entry has; the message lists the known ones."""


# The formats of fixed levels (the nf/int/int_asym families come from ``get_format``).
for _fmt in (
    Format("fp4", 4, _normalised(_BNB_FP4), description="bitsandbytes fp4 (QLoRA's 'Float4 (E2M1)' row)"),
    Format("fp4_e2m1", 4, _normalised(_E2M1), description="OCP E2M1 elements with an absmax scale"),
    Format("fp4_e3m0", 4, _E3M0, description="exponent-only 4-bit float (QLoRA Table 2 'Float4 (E3M0)')"),
    Format("af4", 4, _normalised(_AF4), block_size=64, description="bitsandbytes AbnormalFloat4 (b64)"),
    Format("fp8_e4m3", 8, fp8_levels(torch.float8_e4m3fn), description="FP8 E4M3 elements, absmax scale"),
    Format("fp8_e5m2", 8, fp8_levels(torch.float8_e5m2), description="FP8 E5M2 elements, absmax scale"),
    Format(
        "mxfp4",
        4,
        _E2M1,
        scale_rule="e8m0",
        block_size=32,
        description="OCP MX v1.0: E2M1 elements, E8M0 power-of-two scale per 32",
    ),
    Format(
        "nvfp4",
        4,
        _E2M1,
        scale_rule="e4m3_fp32",
        block_size=16,
        description="NVFP4: E2M1 elements, E4M3 scale per 16, fp32 tensor scale",
    ),
):
    register_format(_fmt)
