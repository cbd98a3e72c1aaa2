"""Round to nearest under the format's own constants: bitsandbytes' and QLoRA's recipe, every format."""

from __future__ import annotations

import torch

from harness.methods import LayerQuantized
from harness.quant.quantize import QuantConfig, quantize


def quantize_layer(weight: torch.Tensor, config: QuantConfig, *, name: str = "tensor") -> LayerQuantized:
    return LayerQuantized(quantize(weight, config, name=name))
