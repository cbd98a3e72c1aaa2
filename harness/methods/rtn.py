"""Round to nearest under the format's own constants: bitsandbytes' and QLoRA's recipe, every format."""

from __future__ import annotations

import torch

from harness.methods import LayerQuantized, Method, register_method
from harness.quant.quantize import QuantConfig, quantize


def quantize_layer(weight: torch.Tensor, config: QuantConfig, *, name: str = "tensor") -> LayerQuantized:
    return LayerQuantized(quantize(weight, config, name=name))


register_method(
    Method(
        "rtn",
        "round to nearest, the format's own constants",
        ("absmax", "affine", "e8m0", "e4m3_fp32"),
        calibrated=False,
        layer=quantize_layer,
    )
)
