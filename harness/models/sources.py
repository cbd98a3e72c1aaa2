"""Where a model comes from: an offline asset, a local directory, a .gguf file or a Hugging Face id.

A GGUF is dequantized once into a safetensors cache entry, which then loads memory-mapped. The conversion runs
in a child process: its transient gigabytes leave with it instead of staying in the caller's heap.

Every parameter keeps the precision its source stored it in, since re-quantizing a weight that already lies on
a 4-bit grid says nothing about the format under test.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import shutil
import weakref
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from harness import assets, gemm
from harness.cache import building, cache_dir
from harness.devices import DeviceMap, offload_folder
from harness.errors import HarnessError
from harness.models import gguf_header
from harness.progress import ticking
from harness.quant.quantize import COMPUTE_DTYPES

PRECISION_FILE = "source_precision.json"


class ModelError(HarnessError, RuntimeError):
    """A model could not be loaded or a layer selection is empty; one line that says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode and the precision each parameter had in its source file. Its tokenizer loads on
    its own (``load_tokenizer``): Gemma's holds about 0.3 GB, which a pass has no use for."""

    name: str
    model: nn.Module
    is_causal_lm: bool
    source: str
    source_precision: dict[str, str]


@dataclass(frozen=True)
class DeclaredDtype:
    """The dtype a checkpoint declares (what ``model_dtype: auto`` loads) and the rule that decided it."""

    dtype: str  # a key of harness.quant.quantize.COMPUTE_DTYPES
    rule: str


def declared_dtype(spec: str, fetch: bool = True) -> DeclaredDtype | None:
    """The checkpoint's own dtype: ``torch_dtype`` (``dtype``) in its configuration; for a GGUF the source
    model's, from ``general.file_type`` when the file is unquantized, else bfloat16. None when ``spec`` is an
    asset not fetched yet and ``fetch`` is false."""
    location = _location(spec, fetch)
    if location is None:
        return None
    if isinstance(location, Path) and location.suffix == ".gguf":
        return _gguf_dtype(location)
    declared = getattr(_config(location), "dtype", None)
    if declared is None:
        return DeclaredDtype("float32", "its configuration declares no dtype: float32, transformers' default")
    name = str(declared).removeprefix("torch.")
    if name not in COMPUTE_DTYPES:
        allowed = ", ".join(COMPUTE_DTYPES)
        raise ModelError(f"{spec} declares dtype {name}; set model_dtype to one of {allowed}")
    return DeclaredDtype(name, f"its configuration's torch_dtype: {name}")


# GGUF file types that hold the source model's weights as they were (llama.cpp's LlamaFileType)
_GGUF_UNQUANTIZED = {0: "float32", 1: "float16", 32: "bfloat16"}


def _gguf_dtype(path: Path) -> DeclaredDtype:
    import gguf

    try:
        file_type = gguf_header.file_type(path)
    except gguf_header.GGUFHeaderError as exc:
        raise ModelError(str(exc)) from exc
    if file_type in _GGUF_UNQUANTIZED:
        name = _GGUF_UNQUANTIZED[file_type]
        return DeclaredDtype(name, f"the GGUF's general.file_type {file_type}: unquantized {name}")
    kind = next((t.name for t in gguf.LlamaFileType if t.value == file_type), "unknown")
    return DeclaredDtype(
        "bfloat16",
        f"the GGUF is quantized (general.file_type {file_type}, {kind}) and its metadata names no source "
        "dtype: bfloat16, the dtype today's checkpoints are released in",
    )


def load_model(
    spec: str, dtype: torch.dtype | None = None, device: str = "cpu", device_map: DeviceMap | None = None
) -> LoadedModel:
    """Load an asset name, a local HF directory, a .gguf file or a Hugging Face id (in that order), straight
    into ``dtype`` (default: the checkpoint's own, ``declared_dtype``) on ``device``, or spread by
    ``device_map`` (``device`` its kind). A 16-bit model on a CPU without native 16-bit GEMMs has its products
    widened to fp32 from then on (``harness.gemm``)."""
    dtype = dtype or _declared(spec)
    gemm.use_for(dtype)
    location = _location(spec)
    assert location is not None  # fetched: _location fetches an asset
    is_gguf = isinstance(location, Path) and location.suffix == ".gguf"
    loaded = _load_pretrained(_loadable(location, dtype), dtype, device, device_map)
    if spec in assets.ASSETS:
        return _renamed(loaded, name=spec, source=spec)
    if is_gguf:
        return _renamed(loaded, name=location.stem, source=str(location))
    return loaded


def load_tokenizer(spec: str, dtype: torch.dtype | None = None) -> Any:
    """The tokenizer of what ``load_model(spec, dtype)`` loads; a GGUF is converted first, if it is not yet,
    since reading the tokenizer from the GGUF itself holds about 1.5 GB for Gemma's vocabulary."""
    location = _location(spec)
    assert location is not None
    return transformers.AutoTokenizer.from_pretrained(str(_loadable(location, dtype or _declared(spec))))


def _declared(spec: str) -> torch.dtype:
    declared = declared_dtype(spec)
    assert declared is not None  # fetched: declared_dtype fetches an asset
    return COMPUTE_DTYPES[declared.dtype]


def _location(spec: str, fetch: bool = True) -> Path | str | None:
    """An asset's file or folder (fetched unless ``fetch`` is false: None till then), else ``_local_path``."""
    if spec in assets.ASSETS:
        if not fetch and not assets.is_fetched(spec):
            return None
        return assets.ensure(spec)
    return _local_path(spec)


def _loadable(location: Path | str, dtype: torch.dtype) -> Path | str:
    """What transformers loads: a GGUF's safetensors conversion to ``dtype``, else ``location`` itself."""
    if isinstance(location, Path) and location.suffix == ".gguf":
        return _converted(location, dtype)
    return location


def _local_path(spec: str) -> Path | str:
    """A model directory or .gguf file as a Path; a hub id as a string, only when the hub is reachable."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{spec} is a file but not a .gguf; pass a .gguf file or a model directory")
        return path
    if path.suffix == ".gguf" or spec.startswith(("/", ".", "~")):
        raise ModelError(f"{spec} does not exist")
    if not _hub_reachable():
        raise ModelError(
            f"{spec!r} is not an asset, a local directory or a .gguf file, and the Hugging Face hub is "
            f"unreachable; pass a local model directory, a .gguf file or an asset name "
            f"({', '.join(_model_assets())})"
        )
    return spec


def _hub_reachable() -> bool:
    """One TCP connection to the hub's endpoint (2 s at most); offline mode counts as unreachable."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=2).close()
    except OSError:
        return False
    return True


def _config(folder: Path | str, gguf: str | None = None) -> transformers.PretrainedConfig:
    """The transformers configuration of a model folder, a GGUF in it, or a hub id; ModelError if none."""
    if isinstance(folder, Path) and gguf is None:
        check_safetensors(folder)
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), gguf_file=gguf)
    except (OSError, ValueError) as exc:
        if gguf is None:
            raise ModelError(f"{folder} is not a transformers model: {_first_line(exc)}") from exc
        error: Exception = exc
    except Exception as exc:  # the GGUF parser fails in many ways on a cut-off or foreign file
        if gguf is None:
            raise
        error = exc
    problem = f"{type(error).__name__}: {_first_line(error)}"
    raise ModelError(
        f"{Path(folder) / gguf} cannot be read as a GGUF model ({problem}); it may be truncated or another "
        "kind of file: download or copy it again"
    ) from error


def check_safetensors(folder: Path) -> None:
    """Every .safetensors file in ``folder`` has a whole header and exactly the bytes its header promises;
    a truncated or overwritten file is a ModelError naming it (reading it would fail deep in safetensors)."""
    for file in sorted(folder.glob("*.safetensors")):
        if problem := _safetensors_problem(file):
            raise ModelError(f"{file} is truncated or corrupt: {problem}; download or copy it again")


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            return f"its header is cut off ({size:,} bytes)"
        try:
            header = json.loads(f.read(length))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not valid"
    promised = 8 + length + max(ends, default=0)
    return None if promised == size else f"it holds {size:,} bytes where its header describes {promised:,}"


@dataclass(frozen=True)
class ModelOutline:
    """What can be known of a model without loading its weights: its configuration, its tokenizer and its
    module tree (built on the meta device, so it holds no memory)."""

    name: str
    config: Any
    tokenizer: Any
    module: nn.Module  # on the meta device: names and shapes only
    n_params: int

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config.get_text_config(), "max_position_embeddings", None)

    @property
    def is_causal_lm(self) -> bool:
        return _is_causal_lm(self.config)


def outline_model(spec: str, fetch: bool = True) -> ModelOutline | None:
    """The model's outline, resolving ``spec`` as ``load_model`` does; None when it is an asset that is not
    fetched and ``fetch`` is false. A hub id is tried only when the hub answers (one quick connection). A
    GGUF not converted yet is converted first when ``fetch`` allows (a sweep loads the conversion anyway, and
    Gemma's tokenizer read from the GGUF itself holds about 1.5 GB); ``show`` reads the GGUF as it is."""
    location = _location(spec, fetch)
    if location is None:
        return None
    if isinstance(location, Path) and location.suffix == ".gguf":
        converted = [converted_dir(location, dtype) for dtype in COMPUTE_DTYPES.values()]
        done = [folder for folder in converted if (folder / PRECISION_FILE).is_file()]
        if done:  # converted before: config and tokenizer are there
            folder, gguf = done[0], None
        elif fetch:
            folder, gguf = _converted(location, _declared(spec)), None
        else:
            folder, gguf = location.parent, location.name
    else:
        folder, gguf = location, None
    config = _config(folder, gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    auto = transformers.AutoModelForCausalLM if _is_causal_lm(config) else transformers.AutoModel
    with torch.device("meta"):
        module = auto.from_config(config)
    n_params = sum(p.numel() for p in module.parameters())
    return ModelOutline(spec, config, tokenizer, module, n_params)


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


def _renamed(loaded: LoadedModel, *, name: str, source: str) -> LoadedModel:
    return LoadedModel(name, loaded.model, loaded.is_causal_lm, source, loaded.source_precision)


def _load_pretrained(
    location: Path | str, dtype: torch.dtype, device: str, device_map: DeviceMap | None
) -> LoadedModel:
    """A transformers checkpoint: a causal LM when its architecture is one, else the bare encoder; loaded
    onto a CUDA device directly (transformers' ``device_map``), not through the CPU. Under a device map the
    modules it sends to disk are written to a folder of the cache that lives as long as the model."""
    local = isinstance(location, Path)
    config = _config(location)
    is_causal = _is_causal_lm(config)
    auto = transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel
    if device_map is None:
        model = auto.from_pretrained(
            str(location), dtype=dtype, **({} if device == "cpu" else {"device_map": device})
        )
    else:
        folder = offload_folder()
        try:
            model = auto.from_pretrained(str(location), dtype=dtype, **device_map.placement(device, folder))
        except (ValueError, KeyError, RuntimeError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelError(f"device_map: {_first_line(exc)}") from None
        weakref.finalize(model, shutil.rmtree, folder, True)
    model.eval()
    weights_dir = Path(transformers.utils.cached_file(str(location), "config.json")).parent
    stored = _safetensors_dtypes(weights_dir)
    if (cached := weights_dir / PRECISION_FILE).is_file():  # a converted GGUF: the safetensors no longer know
        stored = json.loads(cached.read_text())
    precision = _per_parameter(model, stored, default=str(getattr(config, "dtype", None) or torch.float32))
    name = location.name if local else str(location)
    return LoadedModel(name, model, is_causal, str(location), precision)


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


def _converted(path: Path, dtype: torch.dtype) -> Path:
    """The safetensors conversion of a GGUF to ``dtype`` in the cache, converted first if it is not there.
    One entry per dtype: the model then loads memory-mapped, with no cast and no second copy."""
    converted = converted_dir(path, dtype)
    with building(converted, PRECISION_FILE, source=path) as build:
        if build is not None:
            with (
                ticking(f"converting {path.name} to {str(dtype).removeprefix('torch.')} safetensors (once)"),
                ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child,
            ):
                try:
                    child.submit(_convert_gguf, path, build, dtype).result()
                except BrokenProcessPool:
                    raise MemoryError(
                        f"converting {path.name} ended without a result: its process was killed "
                        "(most often for lack of memory)"
                    ) from None
    return converted


def converted_dir(path: Path, dtype: torch.dtype) -> Path:
    """The cache entry of a GGUF's conversion to ``dtype``: the file's name, size and mtime, and
    transformers' version."""
    stat = path.stat()
    name = str(dtype).removeprefix("torch.")
    key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers{transformers.__version__}-{name}"
    return cache_dir() / "converted" / key


def _convert_gguf(path: Path, dest: Path, dtype: torch.dtype) -> None:
    """Dequantize with transformers (in fp32, then one rounding to ``dtype``) and save model, tokenizer and,
    last, the source precisions. In a process of its own."""
    _parse_gguf_once()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).to(dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    precision = _gguf_precision(path, model)
    # The weights are dense fp32 by now, but the attached GGUF quantizer forbids save_pretrained.
    if (quantizer := getattr(model, "hf_quantizer", None)) is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / PRECISION_FILE).write_text(json.dumps(precision, indent=1) + "\n")


def _parse_gguf_once() -> None:
    """Memoize gguf's reader and tensor-name map (read-only), which transformers builds again for the
    config, the weights and the tokenizer, and at each module: smollm2-135m converts in 8 s, not 31."""
    import gguf

    read = functools.cache(gguf.GGUFReader)
    gguf.GGUFReader = lambda path, mode="r": read(os.fspath(path), mode)  # type: ignore[misc]
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)


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
