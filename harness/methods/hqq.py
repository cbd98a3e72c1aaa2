"""HQQ (Badri & Shaji 2023): calibration-free constants that minimise an ℓp (p < 1) loss on the weight error
by half-quadratic splitting, with HQQ's settings (p 0.7, β 10 growing ×1.01, at most 20 steps, stopping when
the mean |W − Ŵ| stops falling).

- Affine integer formats (``int*_asym``): the ``hqq`` package's ``Quantizer.quantize`` with its base config's
  settings (axis 1, whose blocks are ours; the zero point rounded to an integer at 4 bits), whose codes c,
  scale s and zero z (Ŵ = (c − z)·s) are stored as our affine constants: range (2^k − 1)·s, minimum −z·s.
- Absmax formats (nf4, fp4, int4 and the rest): the same splitting on the block's scale, which is all such a
  format has: the error's shrunk part W_e is split off, then the scale that best fits W − W_e with the current
  levels ℓ is Σℓ(W − W_e) / Σℓ². HQQ itself has no absmax variant; the best scale seen is kept.
"""

from __future__ import annotations

import torch

from harness.methods import LayerQuantized, Method, register_method
from harness.quant.quantize import QuantConfig, QuantizationError, assemble, block_grid

LP_NORM, BETA, KAPPA, ITERATIONS = 0.7, 10.0, 1.01, 20  # HQQ's own defaults (hqq.core.optimize)


def quantize_layer(weight: torch.Tensor, config: QuantConfig, *, name: str = "tensor") -> LayerQuantized:
    block = config.resolve_block_size(tuple(weight.shape))
    if weight.numel() % block:
        raise QuantizationError(f"{name}: hqq needs whole blocks; {block} does not divide {weight.numel()}")
    if config.fmt.scale_rule == "affine":
        return _package(weight, config, block)
    return _absmax(weight, config, block)


def _package(weight: torch.Tensor, config: QuantConfig, block: int) -> LayerQuantized:
    from hqq.core.quantize import Quantizer

    codes, meta = Quantizer.quantize(
        weight.detach().float(),
        nbits=config.fmt.bits,
        group_size=block,
        axis=1,
        optimize=True,
        round_zero=config.fmt.bits == 4,  # HQQ's base config: integer zero points at 4 bits
        bitpack=False,
        device=weight.device.type,
    )
    scale, zero = meta["scale"].reshape(-1).float(), meta["zero"].reshape(-1).float()
    levels = 2**config.fmt.bits - 1
    codes = codes.reshape(weight.shape).to(torch.int64)
    return LayerQuantized(assemble(codes, levels * scale, -zero * scale, weight.dtype, config, block))


def _absmax(weight: torch.Tensor, config: QuantConfig, block: int) -> LayerQuantized:
    w = weight.detach().float().reshape(-1, block)
    grid = block_grid(w, config)
    best_scale, best_error, beta = grid.scale, float("inf"), BETA
    for _ in range(ITERATIONS):
        codes, approx = grid.round(w)
        error = float((w - approx).abs().mean())
        if error >= best_error:
            break
        best_scale, best_error = grid.scale, error
        shrunk = _shrink(w - approx, beta)
        levels = grid.book.levels[codes]
        fitted = (levels * (w - shrunk)).sum(dim=1) / (levels * levels).sum(dim=1).clamp(min=1e-30)
        grid = block_grid(w, config, torch.where(fitted > 0, fitted, grid.scale))
        beta *= KAPPA
    grid = block_grid(w, config, best_scale)
    codes, _ = grid.round(w)
    scales = grid.scale[:, None]
    return LayerQuantized(assemble(codes.reshape(weight.shape), scales, None, weight.dtype, config, block))


def _shrink(x: torch.Tensor, beta: float) -> torch.Tensor:
    """HQQ's generalised soft threshold for the ℓp norm: sign(x)·relu(|x| − |x|^(p−1)/β)."""
    magnitude = x.abs()
    return torch.sign(x) * (magnitude - magnitude.pow(LP_NORM - 1) / beta).clamp(min=0)


register_method(
    Method(
        "hqq",
        "HQQ: half-quadratic optimized constants (Badri & Shaji 2023)",
        ("absmax", "affine"),
        calibrated=False,
        layer=quantize_layer,
    )
)
