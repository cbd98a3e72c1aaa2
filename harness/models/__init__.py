"""Models: where they come from, the Linear layers a quantization touches, and where a model can be cut.

This package is the only part of the harness that knows transformers' model classes and structure; the rest
receives what it needs from here (``sources`` loads, ``layers`` quantizes and restores, ``capture`` records
layers' inputs, ``anatomy`` splits, ``offload`` reads and overlays what a device map offloaded).
"""

from harness.models.anatomy import Blocks, LogitSplit, blocks, device_of, logit_split
from harness.models.capture import CAPTURE_ROWS, capture_inputs, first_nonfinite_module, held_out
from harness.models.layers import (
    ApplyResult,
    LayerInfo,
    LayerQuantizer,
    LayerResult,
    Pristine,
    apply,
    discover_layers,
    format_layers,
    layer_plan,
    layer_table,
    quantized,
    restore,
    rtn,
    snapshot,
)
from harness.models.offload import placement
from harness.models.sources import (
    DeclaredDtype,
    LoadedModel,
    ModelError,
    declared_dtype,
    load_model,
    load_tokenizer,
    source_bits,
)

__all__ = [
    "CAPTURE_ROWS",
    "ApplyResult",
    "Blocks",
    "DeclaredDtype",
    "LayerInfo",
    "LayerQuantizer",
    "LayerResult",
    "LoadedModel",
    "LogitSplit",
    "ModelError",
    "Pristine",
    "apply",
    "blocks",
    "capture_inputs",
    "declared_dtype",
    "device_of",
    "discover_layers",
    "first_nonfinite_module",
    "format_layers",
    "held_out",
    "layer_plan",
    "layer_table",
    "load_model",
    "load_tokenizer",
    "logit_split",
    "placement",
    "quantized",
    "restore",
    "rtn",
    "snapshot",
    "source_bits",
]
