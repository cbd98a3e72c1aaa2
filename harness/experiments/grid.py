"""An ``Experiment``: the validated file's grid over quantization axes, expanded lazily into configs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from harness.devices import DeviceMap
from harness.experiments.config import DEFAULT_BLOCK_SIZE, LayerOverride, RunConfig, axis_value
from harness.experiments.schema import (
    AXES,
    EvalSettings,
    ExperimentError,
    ExperimentFile,
    SensitivitySettings,
)
from harness.methods import METHODS
from harness.quant.double_quant import DoubleQuantConfig

COUNTED = 200_000  # grid points counted one by one (about 0.2 s); a bigger grid reports its product


@dataclass(frozen=True)
class Experiment:
    """A validated experiment. Its configs are expanded on first use, so that the size of a huge grid is
    known (``size``) without building a million configs."""

    name: str
    description: str
    path: Path
    axes: dict[str, list[Any]]
    models: list[str]
    template: RunConfig  # what every config shares; the model and the axes are filled in
    exclusions: list[dict[str, Any]]
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)

    def choices(self) -> Iterator[dict[str, Any]]:
        """The axis values of every grid point that no ``exclude`` rule removes, in grid order; the same for
        every model (a rule names axes only)."""
        names = list(self.axes)
        for combo in itertools.product(*(self.axes[a] for a in names)):
            choice = dict(zip(names, combo, strict=True))
            if not any(all(choice.get(k) == v for k, v in rule.items()) for rule in self.exclusions):
                yield choice

    @property
    def size(self) -> tuple[int, bool]:
        """The number of configs and whether it is exact; above ``COUNTED`` grid points, the grid's product
        (exclusions not applied) is returned as a bound instead of counting."""
        points = math.prod(len(v) for v in self.axes.values())
        if len(self.models) * points > COUNTED:
            return len(self.models) * points, False
        return len(self.models) * sum(1 for _ in self.choices()), not self._collapsing

    @property
    def _collapsing(self) -> bool:
        """Whether two grid points can resolve to one config (an omitted block size and the default)."""
        blocks = self.axes.get("block_size", [])
        return None in blocks and len(blocks) > 1

    def iter_configs(self) -> Iterator[RunConfig]:
        """The configs in grid order, defaults resolved, each hash once."""
        seen: set[str] = set()
        for model in self.models:  # loops, not itertools.product, which would list every point first
            for choice in self.choices():
                config = self._config(model, choice)
                if config.hash not in seen:
                    seen.add(config.hash)
                    yield config

    def _config(self, model: str, choice: dict[str, Any]) -> RunConfig:
        config = replace(self.template, model=model, **choice)
        try:
            quant = config.quant_config()
            config.layer_rules()
        except ValueError as exc:
            combo_text = ", ".join(f"{k}={_shown(v)}" for k, v in choice.items())
            raise ExperimentError(
                f"{self.path}: grid: invalid combination ({combo_text}): {exc}; add it to `exclude`"
            ) from None
        assert quant is not None
        # Defaults resolved: the format's own block size, else QLoRA's 64.
        return replace(config, block_size=quant.block_size or quant.fmt.block_size or DEFAULT_BLOCK_SIZE)

    def check_combinations(self) -> None:
        """Raise the one-line error of the first grid point no format accepts (the model plays no part)."""
        for choice in self.choices():
            self._config(self.models[0], choice)

    @cached_property
    def configs(self) -> tuple[RunConfig, ...]:
        return tuple(self.iter_configs())

    def resolved_configs(self, declared: Mapping[str, str], limit: int | None = None) -> list[RunConfig]:
        """The first ``limit`` configs with their dtypes concrete (``declared``: each model's checkpoint
        dtype, from ``harness.models.declared_dtype``), each hash once: what a sweep runs, ``show`` lists."""
        unique = {}
        for config in self.configs[:limit]:
            resolved = config.resolved(declared[config.model])
            unique.setdefault(resolved.hash, resolved)
        return list(unique.values())


# ---- expansion ---------------------------------------------------------------------------------------------


def expand(spec: ExperimentFile, path: Path) -> Experiment:
    def fail(key: str, problem: str) -> ExperimentError:
        return ExperimentError(f"{path}: {key}: {problem}")

    name = spec.name or path.stem
    evaluation = _resolved_eval(spec.eval, fail)
    axes: dict[str, list[Any]] = {}
    for axis in AXES:
        values = getattr(spec.grid, axis)
        if values is None and axis in spec.fixed.model_fields_set:
            values = [getattr(spec.fixed, axis)]
        if values is not None:
            axes[axis] = list(dict.fromkeys(axis_value(axis, v) for v in values))  # duplicates collapse
    if "format" not in axes:
        raise fail("grid.format", "every experiment needs at least one format")
    exclusions = [
        {k: axis_value(k, getattr(rule, k)) for k in rule.model_fields_set} for rule in spec.exclude
    ]
    models = [spec.model] if isinstance(spec.model, str) else spec.model
    if not models or not all(models):
        raise fail("model", f"expected a model name or a list of them, got {spec.model!r}")
    overrides, mix_name = (), None
    if spec.mixed is not None:
        overrides = tuple(LayerOverride.of(rule.layers, rule) for rule in spec.mixed.rules)
        mix_name = spec.mixed.name
    template = RunConfig(
        experiment=name,
        model=models[0],
        include=tuple(sorted(set(spec.layers.include))),
        exclude=tuple(sorted(set(spec.layers.exclude))),
        data=spec.data,
        eval=evaluation,
        model_dtype=spec.model_dtype,
        device=spec.device,
        device_map=None if spec.device_map is None else DeviceMap(spec.device_map, spec.max_memory),
        seed=spec.seed,
        method_settings=spec.methods,
        overrides=overrides,
        mix_name=mix_name,
        recovery=spec.recovery,
    )
    if spec.recovery is not None and not evaluation.kld:
        raise fail("recovery", "needs eval.kld: true (recovery is measured against the unquantized model)")
    experiment = Experiment(
        name,
        spec.description,
        path,
        axes,
        list(dict.fromkeys(models)),
        template,
        exclusions,
        spec.sensitivity,
    )
    calibrated = [m for m in axes.get("method", []) if METHODS[m].calibrated]
    if calibrated and spec.data.calibration_sequences == 0:
        raise fail(
            "data.calibration_sequences",
            f"0, but {' and '.join(calibrated)} {'fits' if len(calibrated) == 1 else 'fit'} on calibration "
            "tokens; set it to 1 or more",
        )
    count, _ = experiment.size
    if count == 0:
        raise fail("exclude", "excludes every combination of the grid")
    if count <= COUNTED:
        experiment.check_combinations()
    return experiment


def _resolved_eval(evaluation: EvalSettings, fail: Any) -> EvalSettings:
    if evaluation.stride is not None and evaluation.protocol != "sliding":
        raise fail("eval.stride", "only the sliding protocol takes a stride")
    if evaluation.stride is not None and evaluation.stride > evaluation.context_length:
        raise fail("eval.stride", f"{evaluation.stride} exceeds context_length {evaluation.context_length}")
    if evaluation.tokens < evaluation.context_length:
        raise fail(
            "eval.tokens", f"{evaluation.tokens} is fewer than one window ({evaluation.context_length})"
        )
    if evaluation.protocol == "sliding" and evaluation.stride is None:
        return evaluation.model_copy(update={"stride": evaluation.context_length // 2})
    return evaluation


def _shown(value: Any) -> str:
    if isinstance(value, DoubleQuantConfig):
        return value.text
    return "off" if value is None else str(value)
