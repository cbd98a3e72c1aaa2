"""Quantization methods: which codes and constants each layer's weight takes. The storage format is never a
method's to change: every method stores a ``QuantizedTensor`` of the config's format, block size and double
quantization, so bits per parameter are the format's (plus AWQ's per-channel scales, counted).

- ``rtn``: round to nearest under the format's own constants (bitsandbytes, QLoRA). Every format.
- ``gptq`` (Frantar et al. 2022): columns rounded in order, each one's error spread over the columns not yet
  rounded through the Cholesky factor of H⁻¹, H = 2XᵀX from the layer's inputs in the partially quantized
  model (``sequential``). Formats with absmax or affine constants; block sizes that divide the input width.
- ``hqq`` (Badri & Shaji 2023): calibration-free. Affine integer formats (``int*_asym``) through the ``hqq``
  package's own optimizer of the zero point; absmax formats by the same half-quadratic splitting applied to
  the block scale (ours: HQQ has no absmax variant).
- ``awq`` (Lin et al. 2023): input channels scaled by s = mean|x|^α before rounding, α searched on the
  layer's output error; s is kept beside the weight (16 bits per input channel, counted), not folded.

Each method module has one entry point, ``quantize_layer(weight, ..., config) -> LayerQuantized``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.quant.quantize import QuantConfig, QuantizedTensor, dequantize


@dataclass(frozen=True)
class Method:
    """A method's declaration. ``layer`` quantizes one layer from its weight alone; a method that fits on
    calibration data has none, and ``harness.measure.layer_quantizer`` gives it what it fits on."""

    name: str
    description: str
    scale_rules: tuple[str, ...]  # the formats' constants it can choose
    calibrated: bool  # fits on calibration tokens
    layer: Callable[..., LayerQuantized] | None = None  # (weight, config, *, name) -> LayerQuantized


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Declare a method: experiments and ``harness show`` accept its name from then on."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is declared twice")
    METHODS[method.name] = method
    return method


def check(method: str, config: QuantConfig) -> None:
    """ValueError, one line, where ``method`` cannot choose ``config``'s codes and constants."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    rule = config.fmt.scale_rule
    if rule not in METHODS[method].scale_rules:
        raise ValueError(f"{method} cannot choose {config.fmt.name}'s {rule} constants")
    if method == "hqq" and rule == "affine" and not config.fmt.name.startswith("int"):
        raise ValueError(f"hqq's package optimizes affine integer grids, not {config.fmt.name}")


@dataclass(frozen=True)
class LayerQuantized:
    """One layer as a method leaves it: what is stored, and the weight the layer computes with."""

    qt: QuantizedTensor
    input_scale: torch.Tensor | None = None  # AWQ: 16-bit s per input channel; the layer computes Ŵ / s

    def weight(self) -> torch.Tensor:
        """The fp32 weight the layer computes with."""
        weight = dequantize(self.qt, torch.float32)
        return weight if self.input_scale is None else weight / self.input_scale.float()

    @property
    def extra_bytes(self) -> int:
        """Bytes stored beside the quantized tensor."""
        return 0 if self.input_scale is None else self.input_scale.numel() * self.input_scale.element_size()


# Each method module declares itself (``register_method``), in the order tables list them.
from harness.methods import rtn, gptq, hqq, awq  # noqa: E402, F401, I001
