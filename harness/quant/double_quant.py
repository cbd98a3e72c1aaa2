"""Double quantization: quantizing the per-block fp32 constants themselves (QLoRA §3).

The QLoRA/bitsandbytes default subtracts the mean of the constants (one fp32 offset per tensor), then
quantizes the centred constants blockwise (block 256) with bnb's signed 8-bit dynamic map and an fp32
absmax per second-level block. That costs 8/64 + 32/(64·256) bits per parameter at block 64, instead of 32/64.

The second-level code is an option:
- ``dynamic``: bnb's ``create_dynamic_map()`` (signed, 7 exponent bits), the QLoRA default;
- ``linear_int8``: levels j/128 for j in [-128, 127], torchao NF4's variant (``round(x·128/absmax)``);
- ``fp8_e4m3``: the finite FP8 E4M3 values normalised to [-1, 1].

Difference from bitsandbytes, by design: we pick the exact nearest code (ties to the lower one), which is
what bnb's pure-torch path does. bnb's native CPU kernel looks codes up in a 65,536-bin table and is
approximate: about 0.2 % of its codes, all near zero, differ from the exact nearest (tests pin this).
torchao's linear_int8 rounds ties to even; ours go to the lower level, which changes only exact ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

from harness.quant.codebook import block_reduce, codebook, expand_blocks, scale_blocks
from harness.quant.formats import fp8_levels

DoubleQuantCode = Literal["dynamic", "linear_int8", "fp8_e4m3"]
DOUBLE_QUANT_CODES: tuple[str, ...] = ("dynamic", "linear_int8", "fp8_e4m3")


@dataclass(frozen=True)
class DoubleQuantConfig:
    block_size: int = 256
    code: DoubleQuantCode = "dynamic"

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"double_quant.block_size must be a positive integer, got {self.block_size!r}")
        if self.code not in DOUBLE_QUANT_CODES:
            raise ValueError(
                f"unknown double_quant.code {self.code!r}; known codes: {', '.join(DOUBLE_QUANT_CODES)}"
            )

    @property
    def label(self) -> str:
        """Its part of a config's label: ``dq`` for QLoRA's default, else ``dq-CODE-BLOCK``."""
        return "dq" if self == DoubleQuantConfig() else f"dq-{self.code}-{self.block_size}"

    @property
    def text(self) -> str:
        """``CODE/BLOCK``, as params and notes show it."""
        return f"{self.code}/{self.block_size}"

    def spec(self) -> dict[str, int | str]:
        """As an experiment writes it: ``{block_size: N, code: C}``; part of the config hash."""
        return {"block_size": self.block_size, "code": self.code}


@dataclass(frozen=True)
class DoubleQuantized:
    codes: torch.Tensor  # uint8, one per first-level constant
    absmax: torch.Tensor  # fp32, one per second-level block
    offset: torch.Tensor  # fp32 scalar: the mean that was subtracted
    config: DoubleQuantConfig

    def dequantize(self) -> torch.Tensor:
        """The reconstructed fp32 constants: ``level[code] * absmax2 + offset``, as bnb's dequantize_4bit."""
        levels = codebook(second_level_levels(self.config.code), self.codes.device).levels
        return expand_blocks(levels[self.codes.long()], self.absmax, self.config.block_size) + self.offset

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"dq_codes": self.codes, "dq_absmax": self.absmax, "dq_offset": self.offset.reshape(1)}


def double_quantize(constants: torch.Tensor, config: DoubleQuantConfig) -> DoubleQuantized:
    """Quantize fp32 per-block constants: subtract their mean, then blockwise absmax with the chosen code."""
    constants = constants.float()
    offset = constants.mean()
    centred = constants - offset
    book = codebook(second_level_levels(config.code), constants.device)
    absmax = block_reduce(centred, config.block_size, "absmax")
    scaled = scale_blocks(centred, config.block_size, absmax, book.low, book.high)
    return DoubleQuantized(book.nearest(scaled).to(torch.uint8), absmax, offset, config)


@cache
def second_level_levels(code: str) -> tuple[float, ...]:
    if code == "dynamic":
        return tuple(dynamic_map().tolist())
    if code == "linear_int8":
        return tuple(j / 128 for j in range(-128, 128))
    if code == "fp8_e4m3":
        return fp8_levels(torch.float8_e4m3fn)
    raise ValueError(f"unknown double_quant.code {code!r}; known codes: {', '.join(DOUBLE_QUANT_CODES)}")


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map``), built with the same float32 steps.

    Each exponent 10^-(6-i) carries a linear fraction whose resolution grows with i; plus 0 and 1.0. Sorted.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)
