"""Model sources, layer discovery, and fake quantization of chosen Linear layers with an exact restore.

This is the only module that knows transformers' model classes. A model comes from an offline asset, a local
directory, a .gguf file or a Hugging Face id; a GGUF is dequantized once into a safetensors cache, because
converting it takes close to a minute and loading the cache seconds. Every parameter keeps the precision its
source stored it in, since re-quantizing a weight that already lies on a 4-bit grid says nothing about the
format under test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers
from torch import nn
from torch.utils.hooks import RemovableHandle

from harness import assets
from harness.metrics import error_metrics, stored_bytes
from harness.quantize import QuantConfig, dequantize, quantize

PRECISION_FILE = "source_precision.json"
CAPTURE_ROWS = 256
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


class ModelError(RuntimeError):
    """A model could not be loaded or a layer selection is empty; one line that says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer and the precision each parameter had in its source file."""

    name: str
    model: nn.Module
    tokenizer: Any
    is_causal_lm: bool
    source: str
    source_precision: dict[str, str]


@dataclass(frozen=True)
class LayerInfo:
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
    stored_bytes: int
    metrics: dict[str, float]  # harness.metrics.error_metrics against the pristine weight
    output_rel_err: float  # ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ on captured inputs; NaN when none were given
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
    ``restore`` puts the very same objects back: bit-identical, same dtypes, ties to other modules intact.
    """

    layers: list[LayerInfo]
    modules: dict[str, nn.Linear]
    weights: dict[str, nn.Parameter]
    biases: dict[str, nn.Parameter | None]
    handles: list[RemovableHandle] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- loading


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load an asset name, a local HF directory, a .gguf file or a Hugging Face id (in that order)."""
    if spec in assets.ASSETS:
        path = assets.ensure(spec)
        loaded = _load_gguf(path, dtype) if path.suffix == ".gguf" else _load_pretrained(path, dtype)
        return _renamed(loaded, name=spec, source=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_pretrained(path, dtype)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{spec} is a file but not a .gguf; pass a .gguf file or a model directory")
        return _load_gguf(path, dtype)
    if path.suffix == ".gguf" or spec.startswith(("/", ".", "~")):
        raise ModelError(f"{spec} does not exist")
    return _load_pretrained(spec, dtype)


def _renamed(loaded: LoadedModel, *, name: str, source: str) -> LoadedModel:
    return LoadedModel(
        name, loaded.model, loaded.tokenizer, loaded.is_causal_lm, source, loaded.source_precision
    )


def _load_pretrained(location: Path | str, dtype: torch.dtype) -> LoadedModel:
    """A transformers checkpoint: a causal LM when its architecture is one, else the bare encoder."""
    local = isinstance(location, Path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(location))
    except (OSError, ValueError) as exc:
        if local:
            raise ModelError(f"{location} is not a transformers model directory: {_first_line(exc)}") from exc
        raise ModelError(
            f"{location!r} is neither a local path nor an asset, and the Hugging Face hub is unreachable "
            f"({_first_line(exc)}); pass a local model directory, a .gguf file or an asset name "
            f"({', '.join(_model_assets())})"
        ) from exc
    is_causal = _is_causal_lm(config)
    auto = transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel
    model = auto.from_pretrained(str(location), dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(location))
    weights_dir = Path(transformers.utils.cached_file(str(location), "config.json")).parent
    stored = _safetensors_dtypes(weights_dir)
    if (cached := weights_dir / PRECISION_FILE).is_file():  # a converted GGUF: the safetensors no longer know
        stored = json.loads(cached.read_text())
    precision = _per_parameter(model, stored, default=str(getattr(config, "dtype", None) or torch.float32))
    name = location.name if local else str(location)
    return LoadedModel(name, model, tokenizer, is_causal, str(location), precision)


def _is_causal_lm(config: transformers.PretrainedConfig) -> bool:
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.architectures:
        return any(arch in causal.values() for arch in config.architectures)
    return config.model_type in causal


def _model_assets() -> list[str]:
    return [name for name, asset in assets.ASSETS.items() if asset.kind in ("gguf", "hf_dir")]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _safetensors_dtypes(directory: Path) -> dict[str, str]:
    """Stored dtype of every tensor ("F32", "BF16", ...), read from the safetensors headers only."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({key: f.get_slice(key).get_dtype() for key in f.keys()})  # noqa: SIM118
    return out


def _per_parameter(model: nn.Module, stored: Mapping[str, str], default: str) -> dict[str, str]:
    """Map checkpoint tensor names to parameter names (with or without the base-model prefix); tied
    parameters share their source's precision; anything unmatched gets the checkpoint's declared dtype."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    precision: dict[str, str] = {}
    for names in groups.values():
        found = [
            stored[key] for n in names for key in (n, n.removeprefix(prefix), prefix + n) if key in stored
        ]
        precision.update(dict.fromkeys(names, found[0] if found else default))
    return precision


# ------------------------------------------------------------------------------------------------ GGUF


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    """Load the safetensors conversion of a GGUF from the cache, converting it first if it is not there."""
    stat = path.stat()
    key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers{transformers.__version__}"
    converted = assets.cache_dir() / "converted" / key
    if not (converted / PRECISION_FILE).is_file():
        _convert_gguf(path, converted)
    return _renamed(_load_pretrained(converted, dtype), name=path.stem, source=str(path))


def _convert_gguf(path: Path, dest: Path) -> None:
    """Dequantize to fp32 with transformers and save model, tokenizer and source precisions atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp = scratch / dest.name  # made with the usual permissions, unlike mkdtemp's private folder
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tmp.mkdir()
        precision = _gguf_precision(path, model)
        # The weights are dense fp32 by now, but the attached GGUF quantizer forbids save_pretrained.
        if (quantizer := getattr(model, "hf_quantizer", None)) is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PRECISION_FILE).write_text(json.dumps(precision, indent=1) + "\n")
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / PRECISION_FILE).is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _gguf_precision(path: Path, model: nn.Module) -> dict[str, str]:
    """GGUF tensor type per transformers parameter, through transformers' own GGUF→HF name map."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    stored = {names[t.name]: t.tensor_type.name for t in reader.tensors if t.name in names}
    return _per_parameter(model, stored, default="F32")


def source_bits(precision: str) -> float:
    """Bits of the grid a source type puts each weight on: Q4_1 → 4 (its scales aside), BF16 → 16,
    torch.float32 → 32."""
    if m := re.match(r"T?I?Q(\d)_", precision):
        return float(m[1])
    if m := re.fullmatch(r"B?F(\d+)(_\w+)?", precision):
        return float(m[1])
    if isinstance(dtype := getattr(torch, precision.removeprefix("torch."), None), torch.dtype):
        return float(dtype.itemsize * 8)
    raise ModelError(f"unknown source precision {precision!r}")


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
    return Pristine(
        layers=list(layers),
        modules=modules,
        weights={name: m.weight for name, m in modules.items()},
        biases={name: m.bias for name, m in modules.items()},
    )


def apply(
    pristine: Pristine,
    config: QuantConfig,
    compute_dtype: torch.dtype = torch.float32,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> ApplyResult:
    """Replace each layer's weight by its fake-quantized pristine weight and make the layer compute in
    ``compute_dtype`` (QLoRA casts the dequantized weight to bf16/fp16 before the matmul).

    Always quantizes the pristine weights: a quantization already applied is restored first. Weight and output
    errors compare the fp32 dequantized weight with the pristine one, so they measure the format alone; the
    compute dtype's rounding shows in end-to-end metrics. ``inputs`` come from ``capture_inputs``.
    """
    restore(pristine)
    target_bits = config.fmt.bits
    results = []
    try:
        for info in pristine.layers:
            module = pristine.modules[info.name]
            weight, bias = pristine.weights[info.name], pristine.biases[info.name]
            qt = quantize(weight.detach(), config, name=info.name)
            reference = weight.detach().float()
            approx = dequantize(qt, torch.float32)
            x = inputs.get(info.name) if inputs else None
            results.append(
                LayerResult(
                    name=info.name,
                    shape=info.shape,
                    numel=info.numel,
                    source_precision=info.source_precision,
                    stored_bytes=stored_bytes(qt),
                    metrics=error_metrics(reference, approx),
                    output_rel_err=output_error(reference, approx, x) if x is not None else math.nan,
                    warning=source_bits(info.source_precision) <= target_bits,
                )
            )
            module.weight = nn.Parameter(approx.to(compute_dtype), requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
            if compute_dtype != weight.dtype:
                pristine.handles += [
                    module.register_forward_pre_hook(partial(_cast_inputs, dtype=compute_dtype)),
                    module.register_forward_hook(partial(_cast_output, dtype=weight.dtype)),
                ]
            del qt, approx
            _release_freed_memory()
    except BaseException:
        restore(pristine)
        raise
    messages = _source_warnings(results, config)
    for message in messages:
        warnings.warn(message, stacklevel=2)
    return ApplyResult(config, compute_dtype, results, messages)


def restore(pristine: Pristine) -> None:
    """Put the original Parameters back and remove the dtype hooks; a no-op when nothing is applied."""
    for handle in pristine.handles:
        handle.remove()
    pristine.handles.clear()
    for name, module in pristine.modules.items():
        module.weight = pristine.weights[name]
        module.bias = pristine.biases[name]


@contextlib.contextmanager
def quantized(
    pristine: Pristine,
    config: QuantConfig,
    compute_dtype: torch.dtype = torch.float32,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[ApplyResult]:
    """``apply`` for the duration of a block, restoring even when the block raises."""
    try:
        yield apply(pristine, config, compute_dtype, inputs)
    finally:
        restore(pristine)


def _release_freed_memory() -> None:
    """Hand the heap pages freed by a layer's temporaries back to the OS. Otherwise glibc keeps them, the
    quantized weights kept between them fragment the heap, and on SmolLM2 the RSS after ``apply`` ended 0.7x
    the fp32 model higher (1.7 GB instead of 1.3 GB)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):  # glibc only
        _LIBC.malloc_trim(0)


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


# ---------------------------------------------------------------------------------- output-space error


@torch.inference_mode()
def capture_inputs(
    model: nn.Module,
    layers: list[LayerInfo],
    input_ids: torch.Tensor,
    max_rows: int = CAPTURE_ROWS,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs of each chosen Linear on the unquantized model: the same ``max_rows`` token positions, sampled
    deterministically from ``input_ids`` (n_seq, seq_len), for every layer. Sequences run one at a time so
    that memory stays at one sequence's activations plus the kept rows."""
    n_seq, seq_len = input_ids.shape
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n_seq * seq_len, generator=generator)[:max_rows].sort().values
    kept: dict[str, list[torch.Tensor]] = {info.name: [] for info in layers}
    current = rows[:0]

    def keep(name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        kept[name].append(x.reshape(-1, x.shape[-1])[current].float())

    runner = _body(model, [info.name for info in layers])
    handles = [
        model.get_submodule(info.name).register_forward_pre_hook(partial(keep, info.name)) for info in layers
    ]
    try:
        for i in range(n_seq):
            current = rows[(rows >= i * seq_len) & (rows < (i + 1) * seq_len)] - i * seq_len
            if current.numel():
                runner(input_ids=input_ids[i : i + 1])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in kept.items()}


def _body(model: nn.Module, names: list[str]) -> nn.Module:
    """The base model when every chosen layer lies inside it: skips lm_head (262k × seq logits for Gemma)."""
    base = getattr(model, "base_model", model)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if base is not model and all(name.startswith(prefix) for name in names):
        return base
    return model


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F: the error the layer's output sees on real inputs.

    fp32 matmuls (float64 would dominate a sweep's time); the difference W − Ŵ is formed first, so the
    error term's rounding is relative to the error itself and a near-zero error stays near zero."""
    w, x = weight.detach().float(), x.detach().float()
    reference = float((x @ w.T).norm())
    error = float((x @ (w - approx.detach().float()).T).norm())
    return error / reference if reference else math.nan


# ------------------------------------------------------------------------------------------------ tables


def layer_table(result: ApplyResult) -> pd.DataFrame:
    """One row per layer: shape, size, source precision, stored bits/param and every error metric."""
    return pd.DataFrame(
        [
            {
                "layer": r.name,
                "shape": f"{r.shape[0]}x{r.shape[1]}",
                "numel": r.numel,
                "source_precision": r.source_precision,
                "stored_bytes": r.stored_bytes,
                "bits_per_param": 8 * r.stored_bytes / r.numel,
                **r.metrics,
                "output_rel_err": r.output_rel_err,
                "warning": r.warning,
            }
            for r in result.layers
        ]
    )


def aggregate(table: pd.DataFrame) -> dict[str, float]:
    """Whole-model numbers, each layer weighted by its parameter count; bits/param from the bytes stored."""
    numel = table["numel"].astype(float)
    total = float(numel.sum())

    def weighted(column: str) -> float:
        return float((table[column] * numel).sum() / total)

    return {
        "layers": float(len(table)),
        "params": total,
        "stored_bytes": float(table["stored_bytes"].sum()),
        "bits_per_param": 8 * float(table["stored_bytes"].sum()) / total,
        "mse_weighted": weighted("mse"),
        "nmse_weighted": weighted("nmse"),
        "rel_fro_weighted": weighted("rel_fro"),
        "cosine_weighted": weighted("cosine"),
        "output_rel_err_weighted": weighted("output_rel_err"),
        "nmse_max": float(table["nmse"].max()),
        "max_abs": float(table["max_abs"].max()),
        "warnings": float(table["warning"].sum()),
    }
