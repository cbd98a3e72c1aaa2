"""Blockwise quantize / dequantize / fake_quant for every format in ``harness.quant.formats``.

A tensor is flattened (row-major) and cut into contiguous blocks of ``block_size`` elements, as
bitsandbytes does; ``channel`` means one block per output row (the leading dimension) and ``tensor`` one
block for everything. Each block gets its constant(s) from the format's scale rule, each element the code
of its nearest level, an exact tie decided by ``rounding`` (see ``codebook``). For nf4 and fp4 with
fp32 constants and the default ``ties_down``, the codes, constants and dequantized values are bit-identical
to ``bitsandbytes.functional.quantize_4bit``/``dequantize_4bit`` (tests pin this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from harness.errors import HarnessError
from harness.quant import cpu_kernels
from harness.quant.codebook import (
    ROUNDING_RULES,
    Codebook,
    Rounding,
    block_reduce,
    codebook,
    expand_blocks,
    scale_blocks,
)
from harness.quant.double_quant import DoubleQuantConfig, DoubleQuantized, double_quantize
from harness.quant.formats import Format, get_format
from harness.quant.packing import pack, unpack

BlockSize = int | Literal["channel", "tensor"]
CONSTANT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# The dtypes a dequantized weight may be computed in (QLoRA computes in bf16); the one table of them.
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_E2M1_MAX = 6.0
_E4M3_MAX = 448.0
_CPU_KERNELS_ENABLED = True  # tests flip this to check the fused kernels against the plain torch path


class QuantizationError(HarnessError, ValueError):
    """Bad input to the quantizer: the message names the tensor or option at fault."""


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize a weight to. ``block_size=None`` means the format's own block size, or 64."""

    format: str
    block_size: BlockSize | None = None
    double_quant: DoubleQuantConfig | None = None
    constant_dtype: str = "float32"
    rounding: Rounding = "ties_down"  # how an exact tie between two levels is decided; bnb's by default
    fmt: Format = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        object.__setattr__(self, "fmt", fmt)
        bs = self.block_size
        named = bs is None or bs in ("channel", "tensor")
        if not named and (isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0):
            raise QuantizationError(
                f"block_size must be a positive integer, 'channel' or 'tensor', got {bs!r}"
            )
        if fmt.block_size is not None and bs not in (None, fmt.block_size):
            raise QuantizationError(f"{fmt.name} fixes its block size at {fmt.block_size}; got {bs!r}")
        if self.double_quant is not None and fmt.scale_rule != "absmax":
            raise QuantizationError(
                f"double_quant applies to formats with one fp32 absmax per block; {fmt.name} uses "
                f"'{fmt.scale_rule}' constants"
            )
        if self.constant_dtype not in CONSTANT_DTYPES:
            raise QuantizationError(
                f"constant_dtype must be one of {', '.join(CONSTANT_DTYPES)}, got {self.constant_dtype!r}"
            )
        if self.constant_dtype != "float32" and fmt.scale_rule not in ("absmax", "affine"):
            raise QuantizationError(
                f"{fmt.name} stores its scales in its own format; constant_dtype is fixed"
            )
        if self.rounding not in ROUNDING_RULES:
            raise QuantizationError(
                f"rounding must be one of {', '.join(ROUNDING_RULES)}, got {self.rounding!r}"
            )

    def resolve_block_size(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for d in shape:
            numel *= d
        if self.block_size is None:
            return self.fmt.block_size or 64
        if self.block_size == "tensor":
            return max(numel, 1)
        if self.block_size == "channel":
            return max(numel // shape[0], 1) if shape else 1
        return int(self.block_size)


@dataclass(frozen=True)
class QuantizedTensor:
    """What is stored: packed codes plus the constants. ``stored_tensors`` is what the bytes count."""

    codes: torch.Tensor  # uint8, densely packed (harness.quant.packing)
    scales: torch.Tensor | DoubleQuantized  # per block: absmax, range, E8M0 byte or E4M3 byte
    minimums: torch.Tensor | None  # affine formats: the block minimum (a float zero point)
    tensor_scale: torch.Tensor | None  # nvfp4: the fp32 second-level scale
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int
    config: QuantConfig

    @property
    def format(self) -> Format:
        return self.config.fmt

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes}
        if isinstance(self.scales, DoubleQuantized):
            out.update(self.scales.stored_tensors())
        else:
            out["scales"] = self.scales
        if self.minimums is not None:
            out["minimums"] = self.minimums
        if self.tensor_scale is not None:
            out["tensor_scale"] = self.tensor_scale.reshape(1)
        return out

    def block_scales(self) -> torch.Tensor:
        """The fp32 multiplier of each block, as dequantization uses it."""
        rule = self.format.scale_rule
        if isinstance(self.scales, DoubleQuantized):
            return self.scales.dequantize()
        if rule == "e8m0":
            return torch.exp2(self.scales.float() - 127)
        if rule == "e4m3_fp32":
            assert self.tensor_scale is not None
            return self.scales.view(torch.float8_e4m3fn).float() * self.tensor_scale
        return self.scales.float()


def quantize(weight: torch.Tensor, config: QuantConfig | str, *, name: str = "tensor") -> QuantizedTensor:
    """Quantize ``weight`` (any float dtype, any device). ``name`` labels errors, e.g. the layer's name."""
    config = QuantConfig(config) if isinstance(config, str) else config
    _check_input(weight, name)
    fmt = config.fmt
    shape = tuple(weight.shape)
    block_size = config.resolve_block_size(shape)
    flat = weight.detach().reshape(-1).float()
    book = codebook(fmt.levels, flat.device, config.rounding)
    if flat.numel() == 0:
        return _empty(config, shape, weight.dtype, block_size, flat.device)
    scales, minimums, tensor_scale, source, divisor = _apply_scale_rule(
        flat, config, block_size, weight, name
    )

    if _use_cpu_kernel(flat, fmt.bits, book):
        packed = cpu_kernels.quantize_pack4(source, block_size, divisor, book)
    else:
        codes = book.nearest(scale_blocks(source, block_size, divisor, book.low, book.high))
        packed = pack(codes, fmt.bits, pad_code=int(book.nearest(flat.new_zeros(1))))

    if config.double_quant is not None:  # its second level keeps ties_down whatever ``rounding`` says
        scales = double_quantize(scales.float(), config.double_quant)
    return QuantizedTensor(
        codes=packed,
        scales=scales,
        minimums=minimums,
        tensor_scale=tensor_scale,
        shape=shape,
        dtype=weight.dtype,
        block_size=block_size,
        config=config,
    )


@dataclass(frozen=True)
class BlockGrid:
    """The values one block of each row of a weight may take under that block's constants as stored:
    ``level × scale`` (absmax) or ``level × range + minimum`` (affine). A method that chooses codes itself
    (GPTQ) rounds columns onto it, and ``assemble`` stores what it chose."""

    book: Codebook
    scale: torch.Tensor  # (rows,) fp32: each row's stored absmax or range, widened
    minimum: torch.Tensor | None  # (rows,) fp32: each row's stored affine minimum, widened
    inverse: torch.Tensor = field(init=False, repr=False)  # 1 / scale, as quantize multiplies by it

    def __post_init__(self) -> None:
        object.__setattr__(self, "inverse", 1.0 / self.scale.clamp(min=1e-38))

    def round(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes (int64) and grid values (fp32) of ``values`` (rows,) or (rows, k): the nearest level
        after the block's scaling, in ``quantize``'s arithmetic (× the reciprocal, clamped), ties by the
        format's rule."""
        column = values.dim() == 1
        scale = self.scale if column else self.scale[:, None]
        inverse = self.inverse if column else self.inverse[:, None]
        minimum = None if self.minimum is None else self.minimum if column else self.minimum[:, None]
        source = values if minimum is None else values - minimum
        scaled = (source * inverse).clamp_(self.book.low, self.book.high)
        codes = self.book.nearest(scaled)
        grid = self.book.levels[codes] * scale
        if minimum is not None:
            grid += minimum
        return codes, grid


def block_grid(block: torch.Tensor, config: QuantConfig, constants: torch.Tensor | None = None) -> BlockGrid:
    """The grid of each row of ``block`` (rows × one block's columns) under the format's own constants of its
    values, stored in ``config.constant_dtype``, as ``quantize`` stores them; ``constants`` (rows,) gives a
    method's own absmax instead. Formats with absmax or affine constants."""
    fmt = config.fmt
    if fmt.scale_rule not in ("absmax", "affine"):
        raise QuantizationError(
            f"{fmt.name} keeps '{fmt.scale_rule}' constants; a grid needs absmax or affine"
        )
    stored = CONSTANT_DTYPES[config.constant_dtype]
    flat, width = block.detach().reshape(-1).float(), block.shape[1]
    book = codebook(fmt.levels, flat.device, config.rounding)
    if fmt.scale_rule == "absmax":
        amax = block_reduce(flat, width, "absmax") if constants is None else constants.float()
        return BlockGrid(book, amax.to(stored).float(), None)
    low, high = block_reduce(flat, width, "min"), block_reduce(flat, width, "max")
    minimum = low.to(stored).float()
    return BlockGrid(book, (high - minimum).to(stored).float(), minimum)


def assemble(
    codes: torch.Tensor,
    scales: torch.Tensor,
    minimums: torch.Tensor | None,
    dtype: torch.dtype,
    config: QuantConfig,
    block_size: int,
) -> QuantizedTensor:
    """A ``QuantizedTensor`` of chosen ``codes`` (the weight's shape) and per-block constants (block order,
    fp32 values of ``config.constant_dtype``): packed as ``quantize`` packs, the constants double-quantized
    when ``config`` says so. How a method's choice is stored: the format is never the method's."""
    if config.fmt.scale_rule not in ("absmax", "affine"):
        raise QuantizationError(f"{config.fmt.name}: only absmax or affine constants are assembled")
    stored = CONSTANT_DTYPES[config.constant_dtype]
    book = codebook(config.fmt.levels, codes.device, config.rounding)
    packed = pack(codes.reshape(-1), config.fmt.bits, pad_code=int(book.nearest(codes.new_zeros(1).float())))
    constants: torch.Tensor | DoubleQuantized = scales.reshape(-1).to(stored)
    if config.double_quant is not None:
        constants = double_quantize(constants.float(), config.double_quant)
    return QuantizedTensor(
        codes=packed,
        scales=constants,
        minimums=None if minimums is None else minimums.reshape(-1).to(stored),
        tensor_scale=None,
        shape=tuple(codes.shape),
        dtype=dtype,
        block_size=block_size,
        config=config,
    )


def tie_mask(weight: torch.Tensor, config: QuantConfig | str, *, name: str = "tensor") -> torch.Tensor:
    """Per element of the flattened ``weight``, whether its scaled value is exactly the midpoint of two
    distinct levels: a tie, which ``rounding`` alone decides. Weights already on a grid (GGUF) can have many.
    The scaling is quantize's own, so the values tested are bit-identical to those the level search sees."""
    book, block_size, source, divisor = _tie_scaling(weight, config, name)
    return book.on_midpoint(scale_blocks(source, block_size, divisor, book.low, book.high))


def tie_fraction(weight: torch.Tensor, config: QuantConfig | str, *, name: str = "tensor") -> float:
    """The share of ``weight``'s elements that are ties for ``config`` (see ``tie_mask``); 0 when empty.
    On the CPU counted by a fused kernel, without the mask."""
    book, block_size, source, divisor = _tie_scaling(weight, config, name)
    if source.numel() == 0:
        return 0.0
    if fused_on_cpu(source, book):
        ties = cpu_kernels.count_ties4(source, block_size, divisor, book)
    else:
        ties = int(book.on_midpoint(scale_blocks(source, block_size, divisor, book.low, book.high)).sum())
    return ties / source.numel()


def _tie_scaling(
    weight: torch.Tensor, config: QuantConfig | str, name: str
) -> tuple[Codebook, int, torch.Tensor, torch.Tensor]:
    """What ties are found in: the codebook, block size, input and per-block divisor of quantize's scaling
    (an empty input and divisor for an empty weight)."""
    config = QuantConfig(config) if isinstance(config, str) else config
    _check_input(weight, name)
    flat = weight.detach().reshape(-1).float()
    book = codebook(config.fmt.levels, flat.device)
    if flat.numel() == 0:
        return book, 1, flat, flat
    block_size = config.resolve_block_size(tuple(weight.shape))
    *_, source, divisor = _apply_scale_rule(flat, config, block_size, weight, name)
    return book, block_size, source, divisor


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct the tensor: ``level[code] * scale`` (+ minimum) in fp32, then cast to ``dtype``."""
    dtype = dtype or qt.dtype
    n = qt.numel
    if n == 0:
        return torch.empty(qt.shape, dtype=dtype, device=qt.codes.device)
    book = codebook(qt.format.levels, qt.codes.device)
    if _use_cpu_kernel(qt.codes, qt.format.bits, book):
        out = cpu_kernels.unpack4_scale(qt.codes, n, qt.block_size, book.levels, qt.block_scales())
    else:
        out = expand_blocks(
            _decode(qt.codes, book.levels, qt.format.bits, n), qt.block_scales(), qt.block_size
        )
    if qt.minimums is not None:
        out += _per_element(qt.minimums.float(), qt.block_size, n)
    return out.reshape(qt.shape).to(dtype)


def fake_quant(
    weight: torch.Tensor, config: QuantConfig | str, dtype: torch.dtype | None = None, *, name: str = "tensor"
) -> torch.Tensor:
    """Quantize then dequantize, into ``dtype`` (default: the weight's dtype) — what a QLoRA matmul sees."""
    return dequantize(quantize(weight, config, name=name), dtype or weight.dtype)


def _decode(packed: torch.Tensor, levels: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    levels = torch.cat([levels, levels.new_zeros(2**bits - levels.numel())])  # unused codes (int4: 15 levels)
    if bits == 4:
        # One gather of a 256-entry table of level pairs decodes a whole byte: both nibbles at once.
        byte = torch.arange(256, device=packed.device)
        pairs = torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1)
        return pairs[packed.long()].reshape(-1)[:n]
    return levels[unpack(packed, bits, n).long()]


def _apply_scale_rule(
    flat: torch.Tensor, config: QuantConfig, block_size: int, weight: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The format's scale rule on a non-empty flat fp32 tensor: the per-block constants to store (scales,
    minimums, tensor scale), and the input and per-block divisor that put each block onto the codebook's
    range. One place for quantize and tie_mask, so both see the same scaled values."""
    fmt = config.fmt
    const_dtype = CONSTANT_DTYPES[config.constant_dtype]
    minimums = tensor_scale = None
    # One pass of block statistics; max/min propagate NaN and Inf, so they also decide finiteness.
    if fmt.scale_rule == "affine":
        low, high = block_reduce(flat, block_size, "min"), block_reduce(flat, block_size, "max")
        _check_finite(weight, torch.stack([low, high]), name)
    else:
        amax = block_reduce(flat, block_size, "absmax")
        _check_finite(weight, amax, name)
    if fmt.scale_rule == "absmax":
        scales = amax.to(const_dtype)
        source, divisor = flat, scales.float()
    elif fmt.scale_rule == "affine":
        minimums = low.to(const_dtype)
        scales = (high - minimums.float()).to(const_dtype)
        source, divisor = flat - _per_element(minimums.float(), block_size, flat.numel()), scales.float()
    elif fmt.scale_rule == "e8m0":
        exponent = _e8m0_exponent(amax)
        scales = (exponent + 127).to(torch.uint8)
        source, divisor = flat, torch.exp2(exponent)
    else:  # e4m3_fp32 (NVFP4)
        tensor_scale = amax.max() / (_E2M1_MAX * _E4M3_MAX)
        tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
        block_scale = (amax / _E2M1_MAX / tensor_scale).clamp(max=_E4M3_MAX).to(torch.float8_e4m3fn)
        scales = block_scale.view(torch.uint8)
        source, divisor = flat, block_scale.float() * tensor_scale
    return scales, minimums, tensor_scale, source, divisor


def fused_on_cpu(t: torch.Tensor, book: Codebook) -> bool:
    """Whether the fused CPU kernels (``cpu_kernels``) take ``t``: a CPU tensor, a codebook with a lookup
    table, and the kernels not switched off (tests compare them with the torch path that way)."""
    return t.device.type == "cpu" and book.lut_count is not None and _CPU_KERNELS_ENABLED


def _use_cpu_kernel(t: torch.Tensor, bits: int, book: Codebook) -> bool:
    return bits == 4 and fused_on_cpu(t, book)


def _empty(
    config: QuantConfig, shape: tuple[int, ...], dtype: torch.dtype, block_size: int, device: torch.device
) -> QuantizedTensor:
    rule = config.fmt.scale_rule
    const_dtype = CONSTANT_DTYPES[config.constant_dtype] if rule in ("absmax", "affine") else torch.uint8
    none = torch.zeros(0, dtype=const_dtype, device=device)
    return QuantizedTensor(
        codes=torch.zeros(0, dtype=torch.uint8, device=device),
        scales=none,
        minimums=none.clone() if rule == "affine" else None,
        tensor_scale=torch.ones((), device=device) if rule == "e4m3_fp32" else None,
        shape=shape,
        dtype=dtype,
        block_size=block_size,
        config=config,
    )


def _per_element(per_block: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    return per_block.repeat_interleave(block_size)[:n]


def _e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """OCP MX shared exponent: floor(log2(amax)) - emax(E2M1) = floor(log2(amax)) - 2, within E8M0's range."""
    _, e = torch.frexp(amax)  # amax = m · 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1
    exponent = (e - 1 - 2).float()
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -127.0))
    return exponent.clamp_(-127, 127)


def _check_input(weight: torch.Tensor, name: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise QuantizationError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise QuantizationError(
            f"{name}: cannot quantize an integer tensor ({weight.dtype}); pass float weights"
        )


def _check_finite(weight: torch.Tensor, block_stat: torch.Tensor, name: str) -> None:
    """``block_stat`` is a per-block reduction that is non-finite iff its block holds a NaN or Inf."""
    if not bool(torch.isfinite(block_stat).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise QuantizationError(
            f"{name}: {bad} NaN/Inf value(s) in a {tuple(weight.shape)} tensor; refusing to quantize"
        )
