"""Everything about an experiment that can be checked before any weight is loaded or any run is written.

``harness show`` and ``harness sweep`` call ``check``: each model must resolve (an asset, a local directory or
.gguf file, or a hub id while the hub answers), its configuration must admit the context length, the layer
filters must match at least one of its Linear layers, and the corpus must hold the calibration and
evaluation tokens under its tokenizer. Every problem found is reported, one line each, before anything
starts; the schema (``experiments``) has already checked keys, types, formats, protocols and tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from harness import assets
from harness.data import CORPORA, DataError, TokenizedCorpus, tokenize_corpus
from harness.devices import DeviceError, DeviceMap, resolve_device
from harness.evaluate.windows import PerplexityProtocol
from harness.experiments import Experiment, ExperimentError
from harness.experiments.schema import RecoverySettings
from harness.floor import PassCost, pass_cost
from harness.models import ModelError, discover_layers
from harness.models.sources import DeclaredDtype, ModelOutline, declared_dtype, outline_model
from harness.recovery import RecoveryError, target_layers

MAX_CONFIGS = 1000  # a grid above this runs only when asked twice (`--yes`)


@dataclass(frozen=True)
class Checked:
    """What the checks learnt: each checked model's pass cost (parameters, FLOPs and GEMM shapes of one
    evaluation pass), declared dtype and tokenized corpus, which its session takes rather than loading the
    tokenizer again (a model's outline is let go once checked: Gemma's tokenizer alone holds about 330 MB)."""

    costs: dict[str, PassCost]
    declared: dict[str, DeclaredDtype]
    corpora: dict[str, TokenizedCorpus]
    unchecked: list[str]  # models and corpora not fetched yet: `sweep` fetches and checks them


class PreflightError(ExperimentError):
    """One or more problems, one per line."""


def check_size(experiment: Experiment, allowed: bool) -> None:
    """Refuse a grid above ``MAX_CONFIGS`` configs unless ``allowed``; counts without expanding it."""
    count, exact = experiment.size
    if count > MAX_CONFIGS and not allowed:
        shown = f"{count:,}" if exact else f"up to {count:,}"
        axes = " × ".join(f"{axis} {len(values)}" for axis, values in experiment.axes.items())
        raise PreflightError(
            f"{experiment.path}: the grid has {shown} configs ({len(experiment.models)} model(s) × {axes}), "
            f"more than {MAX_CONFIGS:,}; narrow the grid, or pass --yes to run it anyway"
        )


def check(experiment: Experiment, fetch: bool) -> Checked:
    """Check every model against the experiment's settings; PreflightError listing every problem found.

    With ``fetch`` false (``show``) an asset that is not in the cache is not downloaded: it is listed in
    ``unchecked`` instead."""
    settings = experiment.template
    problems: list[str] = []
    try:
        device = resolve_device(settings.device)
        if settings.device_map is not None:
            settings.device_map.check(device)
    except DeviceError as exc:
        problems.append(str(exc))
    costs: dict[str, PassCost] = {}
    declared: dict[str, DeclaredDtype] = {}
    corpora: dict[str, TokenizedCorpus] = {}
    unchecked: list[str] = []
    for model in experiment.models:
        try:
            outline = outline_model(model, fetch=fetch)
            found = declared_dtype(model, fetch=fetch)
        except ModelError as exc:
            problems.append(f"model {model!r}: {exc}")
            continue
        if outline is None or found is None:
            unchecked.append(model)
            continue
        declared[model] = found
        protocol = PerplexityProtocol(
            settings.eval.protocol, settings.eval.context_length, settings.eval.stride
        )
        costs[model] = pass_cost(outline.module, protocol, settings.eval.tokens)
        context, limit = settings.eval.context_length, outline.max_positions
        if limit is not None and context > limit:
            problems.append(
                f"eval.context_length: {context} exceeds {model}'s maximum of {limit} positions "
                "(max_position_embeddings in its configuration)"
            )
        try:
            layers = discover_layers(
                outline.module, list(settings.include) or None, list(settings.exclude) or None
            )
        except ModelError as exc:
            problems.append(f"layers: {model}: {exc}")
            layers = []
        if settings.device_map is not None:
            problems += _map_problems(model, outline.module, settings.device_map)
        if settings.recovery is not None:
            problems += _recovery_problems(model, outline, settings.recovery, [info.name for info in layers])
        corpus = CORPORA.get(settings.data.corpus)
        if corpus is not None and not fetch and not assets.is_fetched(corpus.asset):
            unchecked.append(settings.data.corpus)  # `show` downloads nothing
            continue
        try:
            corpora[model] = tokenize_corpus(settings, outline.tokenizer)
        except DataError as exc:
            problems.append(f"data.corpus: {exc}")
    if problems:
        raise PreflightError("\n".join(f"{experiment.path}: {p}" for p in dict.fromkeys(problems)))
    return Checked(costs, declared, corpora, unchecked)


def _map_problems(model: str, module: nn.Module, device_map: DeviceMap) -> list[str]:
    """An explicit map names modules that exist, each parameter under one of them, and '' (the whole model)
    only alone: beside other entries accelerate would place the whole model there."""
    if not isinstance(device_map.modules, Mapping):
        return []
    keys = list(device_map.modules)
    if "" in keys and len(keys) > 1:
        return ["device_map: '' (the whole model) cannot sit beside other entries; name the other modules"]
    names = dict(module.named_modules())
    unknown = [name for name in keys if name not in names]
    if unknown:
        return [f"device_map: {', '.join(map(repr, unknown))} names no module of {model}"]
    if missing := _uncovered(module, keys):
        return [f"device_map places no device for {', '.join(missing)} of {model}; add them to the map"]
    return []


def _uncovered(module: nn.Module, keys: list[str], prefix: str = "") -> list[str]:
    """The largest submodules (or lone parameters) of ``module`` whose parameters no key covers."""

    def covered(name: str) -> bool:
        return any(not key or name == key or name.startswith(f"{key}.") for key in keys)

    found = [f"{prefix}{name}" for name, _ in module.named_parameters()]
    if all(covered(name) for name in found):
        return []
    if not any(covered(name) for name in found) and prefix:
        return [prefix.rstrip(".")]
    own = (f"{prefix}{name}" for name, _ in module.named_parameters(recurse=False))
    missing = [name for name in own if not covered(name)]
    for name, child in module.named_children():
        missing += _uncovered(child, keys, f"{prefix}{name}.")
    return missing


def _recovery_problems(
    model: str, outline: ModelOutline, recipe: RecoverySettings, layers: list[str]
) -> list[str]:
    """Why ``recipe`` cannot train adapters on ``model``: not a causal LM, or targets it does not have."""
    if not outline.is_causal_lm:
        return [
            f"recovery: {model} is not a causal language model; LoRA recovery trains next-token prediction"
        ]
    try:
        target_layers(outline.module, recipe, layers)
    except RecoveryError as exc:
        return [f"recovery: {model}: {exc}"]
    return []
