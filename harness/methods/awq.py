"""AWQ-style activation-aware scaling (Lin et al. 2023, arXiv 2306.00978) on any format.

Input channel j is scaled by s_j = m_j^α, m_j = mean |x_j| over the layer's calibration inputs, normalised so
that max(s)·min(s) = 1; the weight is rounded as W·diag(s) and the layer computes with Ŵ·diag(1/s), which is
what folding 1/s into the previous norm or Linear gives. α runs over k / ``grid`` for k = 0 … grid − 1 (AWQ's
search), α = 0 being round to nearest, and the α with the least output error ‖X(W − Ŵ/s)ᵀ‖² on those inputs is
kept. s is stored in fp16 beside the weight (one value per input channel, counted in bits per parameter): a
layer's own s is not shared with its siblings, so it is not folded.
"""

from __future__ import annotations

import torch

from harness.methods import LayerQuantized, Method, register_method
from harness.quant.quantize import QuantConfig, quantize

SCALE_DTYPE = torch.float16


def quantize_layer(
    weight: torch.Tensor, inputs: torch.Tensor, config: QuantConfig, *, grid: int = 20, name: str = "tensor"
) -> LayerQuantized:
    """``weight`` (out × in) with its input channels scaled as ``inputs`` (rows × in) ask."""
    w = weight.detach().float()
    x = inputs.float()
    magnitude = x.abs().mean(dim=0).clamp(min=1e-4)
    reference = x @ w.T
    best: tuple[float, LayerQuantized] | None = None
    for k in range(grid):
        s = magnitude.pow(k / grid)
        s = (s / (s.max() * s.min()).sqrt()).to(SCALE_DTYPE)
        qt = quantize((w * s.float()).to(weight.dtype), config, name=name)
        candidate = LayerQuantized(qt, s)
        error = float((reference - x @ candidate.weight().T).square().mean())
        if best is None or error < best[0]:
            best = (error, candidate)
    assert best is not None
    return best[1]


register_method(
    Method(
        "awq",
        "AWQ-style activation-aware channel scaling (Lin et al. 2023)",
        ("absmax", "affine"),
        calibrated=True,
    )
)
