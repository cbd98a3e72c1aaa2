"""The Linear layers a quantization touches: discovery, fake quantization with an exact restore, and the
inputs and per-layer errors that measure it."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import partial
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from harness import gemm, memory
from harness.methods import LayerQuantized
from harness.methods import rtn as _rtn
from harness.metrics import (
    activation_weighted_error,
    error_metrics,
    output_error,
    stored_bytes,
    weight_statistics,
)
from harness.models import offload
from harness.models.sources import LoadedModel, ModelError, source_bits
from harness.quant.quantize import QuantConfig, tie_fraction

# A method's choice for one layer: (layer name, pristine weight, its quantization) → what it stores.
LayerQuantizer = Callable[[str, torch.Tensor, QuantConfig], LayerQuantized]


def rtn(name: str, weight: torch.Tensor, config: QuantConfig) -> LayerQuantized:
    return _rtn.quantize_layer(weight, config, name=name)


TIE_WARNING_FRACTION = 1e-3  # above this share of exact ties in a layer, the tie rule visibly moves results


@dataclass(frozen=True)
class LayerInfo:
    """One Linear layer chosen for quantization, as ``discover_layers`` found it."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    numel: int
    source_precision: str
    dtype: torch.dtype


@dataclass(frozen=True)
class LayerResult:
    """One layer after ``apply``: what its weight costs to store and how far it moved."""

    name: str
    shape: tuple[int, int]
    numel: int
    source_precision: str
    config: QuantConfig  # what this layer was quantized to (a mixed config gives layers different ones)
    stored_bytes: int
    metrics: dict[str, float]  # harness.metrics.error_metrics against the pristine weight
    output_rel_err: float  # ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ on captured inputs; NaN when none were given
    act_weighted_err: float  # Σ_j E[x_j²]·‖ΔW[:, j]‖² on captured inputs; NaN when none were given
    tie_fraction: float  # share of weights exactly on a midpoint of the format: decided by the tie rule
    warning: bool  # the source precision is at or below the target's bits


@dataclass(frozen=True)
class ApplyResult:
    config: QuantConfig
    compute_dtype: torch.dtype
    layers: list[LayerResult]
    warnings: list[str]


@dataclass
class Pristine:
    """The original weight and bias Parameters of the chosen layers, held by reference (no copy).

    While a quantization is applied these objects are detached from the model, so nothing can touch them, and
    ``restore`` puts the very same objects back: bit-identical, same dtypes, ties to other modules intact. A
    layer offloaded by a device map keeps its tensors in its hook's map (``maps``), which a quantization
    overlays and ``restore`` uncovers; its Parameters are empty.
    """

    layers: list[LayerInfo]
    modules: dict[str, nn.Linear]
    weights: dict[str, nn.Parameter]
    biases: dict[str, nn.Parameter | None]
    maps: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # offloaded layers' stores
    homes: dict[str, torch.device] = field(default_factory=dict)  # GPU weights set aside in host memory
    tied: set[str] = field(default_factory=set)  # layers whose weight is another module's too
    handles: list[RemovableHandle] = field(default_factory=list)
    statistics: dict[str, dict[str, float]] = field(default_factory=dict)  # weight_statistics, once a layer

    def weight(self, name: str) -> torch.Tensor:
        """A layer's pristine weight where the layer computes (an offloaded one read from its store)."""
        return self._stored(name, "weight", self.weights[name])

    def bias(self, name: str) -> torch.Tensor | None:
        bias = self.biases[name]
        return None if bias is None else self._stored(name, "bias", bias)

    def _stored(self, name: str, key: str, parameter: nn.Parameter) -> torch.Tensor:
        if name not in self.maps:
            return parameter.detach()
        return self.maps[name][key].detach().to(offload.execution_device(self.modules[name]))

    def weight_statistics(self, name: str) -> dict[str, float]:
        """The pristine weight's distribution statistics: the same for every config, so computed once."""
        if name not in self.statistics:
            self.statistics[name] = weight_statistics(self.weight(name))
        return self.statistics[name]


# ------------------------------------------------------------------------------------------- discovery


def discover_layers(
    model: LoadedModel | nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[LayerInfo]:
    """The Linear layers to quantize, in module order.

    By default every nn.Linear inside the transformer blocks (any module reached through an nn.ModuleList),
    which leaves embeddings, lm_head and poolers in full precision as QLoRA does. ``include`` globs choose
    among all nn.Linear instead (so lm_head can be opted in); ``exclude`` globs remove. Pass the LoadedModel
    to get source precisions; a bare module reports its current dtype.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    module = loaded.model if loaded else model
    blocks = tuple(f"{name}." for name, m in module.named_modules() if isinstance(m, nn.ModuleList))
    layers = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        chosen = any(fnmatchcase(name, g) for g in include) if include else name.startswith(blocks)
        if not chosen or any(fnmatchcase(name, g) for g in exclude or ()):
            continue
        weight = m.weight
        precision = loaded.source_precision[f"{name}.weight"] if loaded else str(weight.dtype)
        layers.append(LayerInfo(name, tuple(weight.shape), weight.numel(), precision, weight.dtype))
    if not layers:
        raise ModelError(
            f"no Linear layer matches include={include} exclude={exclude}; list them with `harness layers`"
        )
    return layers


def format_layers(
    loaded: LoadedModel, include: list[str] | None = None, exclude: list[str] | None = None
) -> str:
    """The matched layers with shapes and source precision, for `harness layers MODEL`."""
    layers = discover_layers(loaded, include, exclude)
    table = pd.DataFrame(
        {
            "layer": [info.name for info in layers],
            "shape": [f"{info.shape[0]}x{info.shape[1]}" for info in layers],
            "numel": [info.numel for info in layers],
            "source": [info.source_precision for info in layers],
        }
    )
    total = sum(info.numel for info in layers)
    precisions = table["source"].value_counts().to_dict()
    summary = ", ".join(f"{count} {precision}" for precision, count in precisions.items())
    footer = f"{len(layers)} layers, {total:,} parameters ({summary}) in {loaded.name}"
    return f"{table.to_string(index=False)}\n{footer}"


# ------------------------------------------------------------------------------------- apply / restore


def snapshot(model: nn.Module, layers: list[LayerInfo]) -> Pristine:
    """Remember the chosen layers' Parameters; take it once, from the unquantized model."""
    modules = {info.name: model.get_submodule(info.name) for info in layers}
    maps = {name: found for name, m in modules.items() if (found := offload.offload_map(m)) is not None}
    holders = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    return Pristine(
        layers=list(layers),
        modules=modules,
        weights={name: m.weight for name, m in modules.items()},
        biases={name: m.bias for name, m in modules.items()},
        maps=maps,
        tied={name for name, m in modules.items() if holders[id(m.weight)] > 1},
    )


def layer_plan(
    names: list[str], base: QuantConfig, rules: list[tuple[str, QuantConfig]] = ()
) -> dict[str, QuantConfig]:
    """Each layer's quantization: that of the last rule whose glob matches its name, else ``base``."""
    plan = {}
    for name in names:
        plan[name] = base
        for pattern, config in rules:
            if fnmatchcase(name, pattern):
                plan[name] = config
    return plan


def apply(
    pristine: Pristine,
    config: QuantConfig,
    compute_dtype: torch.dtype = torch.float32,
    inputs: Mapping[str, torch.Tensor] | None = None,
    plan: Mapping[str, QuantConfig] | None = None,
    quantizer: LayerQuantizer = rtn,
) -> ApplyResult:
    """Replace each layer's weight by its fake-quantized pristine weight and make the layer compute in
    ``compute_dtype`` (QLoRA casts the dequantized weight to bf16/fp16 before the matmul). ``quantizer``
    chooses each layer's codes and constants (``harness.methods``), layers in module order: a sequential
    method sees the layers before as already quantized.

    ``plan`` (``layer_plan``) gives each layer its own quantization; then only the layers it names are
    quantized (a sensitivity probe quantizes one). Always quantizes the pristine weights: a quantization
    already applied is restored first. Weight and output errors compare the fp32 dequantized weight with the
    pristine one, so they measure the format alone; the compute dtype's rounding shows in end-to-end metrics.
    ``inputs`` come from ``capture_inputs``.
    """
    restore(pristine)
    gemm.use_for(compute_dtype)
    chosen = plan if plan is not None else {info.name: config for info in pristine.layers}
    results = []
    try:
        for info in pristine.layers:
            if info.name not in chosen:
                continue
            layer_config = chosen[info.name]
            module = pristine.modules[info.name]
            weight, bias = pristine.weight(info.name), pristine.bias(info.name)
            layer = quantizer(info.name, weight, layer_config)
            reference = weight.float()
            approx = layer.weight()
            x = inputs.get(info.name) if inputs else None
            results.append(
                LayerResult(
                    name=info.name,
                    shape=info.shape,
                    numel=info.numel,
                    source_precision=info.source_precision,
                    config=layer_config,
                    stored_bytes=stored_bytes(layer.qt) + layer.extra_bytes,
                    metrics=error_metrics(reference, approx) | pristine.weight_statistics(info.name),
                    output_rel_err=output_error(reference, approx, x) if x is not None else math.nan,
                    act_weighted_err=(
                        activation_weighted_error(reference, approx, x) if x is not None else math.nan
                    ),
                    tie_fraction=tie_fraction(weight, layer_config, name=info.name),
                    warning=source_bits(info.source_precision) <= layer_config.fmt.bits,
                )
            )
            _install(
                module,
                {"weight": approx.to(compute_dtype)}
                | ({} if bias is None else {"bias": bias.to(compute_dtype)}),
                offloaded=info.name in pristine.maps,
            )
            if compute_dtype != weight.dtype:
                pristine.handles += [
                    module.register_forward_pre_hook(partial(_cast_inputs, dtype=compute_dtype)),
                    module.register_forward_hook(partial(_cast_output, dtype=weight.dtype)),
                ]
            del layer, approx, weight, reference
            memory.release_freed()  # the temporaries' pages, before the next layer's land between survivors
            _set_aside(pristine, info.name)
    except BaseException:
        restore(pristine)
        raise
    messages = _source_warnings(results, config) + _tie_warnings(results, config)
    for message in messages:
        warnings.warn(message, stacklevel=2)
    return ApplyResult(config, compute_dtype, results, messages)


def restore(pristine: Pristine) -> None:
    """Put the original Parameters back and remove the dtype hooks; a no-op when nothing is applied."""
    for handle in pristine.handles:
        handle.remove()
    pristine.handles.clear()
    for name, module in pristine.modules.items():
        offload.restore_map(module)
        module.weight = pristine.weights[name]  # the quantized copy goes before the pristine weight returns
        module.bias = pristine.biases[name]
        if (home := pristine.homes.pop(name, None)) is not None:
            module.weight.data = module.weight.data.to(home)


def _set_aside(pristine: Pristine, name: str) -> None:
    """A pristine weight out of the way while its quantized copy serves: its pages reclaimed on the host (a
    memory-mapped file's are read back when next used), or moved from a GPU to host memory, so that the
    device holds the model once and the quantized copies, not the model twice."""
    weight = pristine.weights[name]
    if weight.device.type in ("cpu", "meta"):
        memory.page_out(weight)
    elif name not in pristine.tied:  # a tied weight serves another module too (an embedding): it stays
        pristine.homes[name] = weight.device
        weight.data = weight.data.to("cpu")


def _install(module: nn.Linear, tensors: dict[str, torch.Tensor], offloaded: bool) -> None:
    """What a quantized layer computes with: its Parameters, or what its offload hook loads (kept in host
    memory, as the offloaded weights are)."""
    if offloaded:
        offload.substitute(module, {name: tensor.to("cpu") for name, tensor in tensors.items()})
        return
    for name, tensor in tensors.items():
        setattr(module, name, nn.Parameter(tensor, requires_grad=False))


@contextlib.contextmanager
def quantized(
    pristine: Pristine,
    config: QuantConfig,
    compute_dtype: torch.dtype = torch.float32,
    inputs: Mapping[str, torch.Tensor] | None = None,
    plan: Mapping[str, QuantConfig] | None = None,
    quiet: bool = False,
    quantizer: LayerQuantizer = rtn,
) -> Iterator[ApplyResult]:
    """The one way to quantize for a while: ``apply`` for the duration of a block, and ``restore`` even when
    the block raises. ``quiet`` keeps the source-precision warnings in ``ApplyResult.warnings`` only, for a
    caller that says each once."""
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        result = apply(pristine, config, compute_dtype, inputs, plan, quantizer)
    try:
        yield result
    finally:
        restore(pristine)


def _cast_inputs(module: nn.Module, args: tuple[Any, ...], *, dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _cast_output(
    module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, *, dtype: torch.dtype
) -> torch.Tensor:
    return output.to(dtype)


def _source_warnings(results: list[LayerResult], config: QuantConfig) -> list[str]:
    # The text names the bits, not the format, so a sweep warns once per model rather than once per config.
    flagged = [r for r in results if r.warning]
    if not flagged:
        return []
    precisions = sorted({r.source_precision for r in flagged})
    return [
        f"{len(flagged)} of {len(results)} layers (e.g. {flagged[0].name}) come from a source at or below "
        f"{config.fmt.bits} bits ({', '.join(precisions)}); a {config.fmt.bits}-bit format re-quantizes that "
        "grid, so their error is only meaningful next to the source precision"
    ]


def _tie_warnings(results: list[LayerResult], config: QuantConfig) -> list[str]:
    # Fixed text but for the rule, so that a sweep shows it once per model and rule.
    if not any(r.tie_fraction > TIE_WARNING_FRACTION for r in results):
        return []
    return [
        "some weights lie exactly on a rounding boundary of this format (share per layer: tie_fraction); "
        f"the tie rule (rounding: {config.rounding}) decides them"
    ]


# ------------------------------------------------------------------------------------------------ tables


def layer_table(result: ApplyResult) -> pd.DataFrame:
    """One row per layer: shape, size, source precision, stored bits/param, every error metric and the
    share of exact ties."""
    return pd.DataFrame(
        [
            {
                "layer": r.name,
                "shape": f"{r.shape[0]}x{r.shape[1]}",
                "numel": r.numel,
                "source_precision": r.source_precision,
                "stored_bytes": r.stored_bytes,
                "bits_per_param": 8 * r.stored_bytes / r.numel,
                "format": r.config.format,
                "block_size": r.config.block_size,
                "double_quant": r.config.double_quant is not None,
                **r.metrics,
                "output_rel_err": r.output_rel_err,
                "act_weighted_err": r.act_weighted_err,
                "tie_fraction": r.tie_fraction,
                "warning": r.warning,
            }
            for r in result.layers
        ]
    )
