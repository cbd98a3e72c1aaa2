"""The experiment registry: ``experiments/*.yaml`` → validated, expanded run configs with stable hashes.

An experiment names the model(s), the layers, the corpus, the evaluation, and a grid over quantization
axes. Every expanded config is a ``RunConfig``; its hash is a sha256 of its canonical content (sorted keys,
the experiment's name left out), so key order in the YAML never changes it and the same config in two
experiments is recognisably the same measurement. Errors name the file, the key, the bad value and what is
allowed, on one line.

    name: default
    description: int4/fp4/nf4 × block size × double quantization on gemma-3-270m
    model: gemma-3-270m                 # or a list; an asset name, HF id, local dir or .gguf path
    layers: {include: [], exclude: []}  # fnmatch globs over module names; default: all Linear in blocks
    data: {corpus: wikipedia, calibration_sequences: 4, calibration_length: 256}
    eval: {protocol: llamacpp, context_length: 512, tokens: 4096, kld: true, tasks: [], limit: null}
    grid:                               # the cartesian product of these axes
      format: [int4, fp4, nf4]
      block_size: [32, 64, 128, 256]
      double_quant: [off, on]           # or {block_size: 256, code: dynamic | linear_int8 | fp8_e4m3}
      compute_dtype: [float32]
    fixed: {constant_dtype: float32}    # axes held at one value
    exclude: [{format: int4_asym, double_quant: on}]   # combinations to skip
    seed: 0
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from harness.double_quant import DOUBLE_QUANT_CODES, DoubleQuantConfig
from harness.formats import UnknownFormatError, get_format
from harness.quantize import CONSTANT_DTYPES, QuantConfig

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
PROTOCOLS = ("disjoint", "sliding", "llamacpp")
TASKS = ("mmlu_local", "siqa_local", "logiqa_local")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
AXES = ("format", "block_size", "double_quant", "constant_dtype", "compute_dtype")
TOP_LEVEL = ("name", "description", "model", "layers", "data", "eval", "grid", "fixed", "exclude", "seed")


class ExperimentError(ValueError):
    """A malformed experiment: one line naming the file, the key, the value and what is allowed."""


@dataclass(frozen=True)
class DataSettings:
    corpus: str = "wikipedia"
    calibration_sequences: int = 4
    calibration_length: int = 256


@dataclass(frozen=True)
class EvalSettings:
    protocol: str = "llamacpp"
    context_length: int = 512
    stride: int | None = None  # sliding protocol only; None = context_length // 2
    tokens: int = 4096
    bos: bool = True
    kld: bool = True
    tasks: tuple[str, ...] = ()
    limit: int | None = None  # lm-eval examples per task
    batch_size: int = 4


@dataclass(frozen=True)
class RunConfig:
    """One measurement. ``format=None`` is the unquantized baseline of its model and evaluation."""

    experiment: str
    model: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    format: str | None = None
    block_size: int | str | None = None
    double_quant: DoubleQuantConfig | None = None
    constant_dtype: str = "float32"
    compute_dtype: str = "float32"
    seed: int = 0

    @property
    def is_baseline(self) -> bool:
        return self.format is None

    def quant_config(self) -> QuantConfig | None:
        if self.format is None:
            return None
        return QuantConfig(self.format, self.block_size, self.double_quant, self.constant_dtype)

    def content(self) -> dict[str, Any]:
        """Everything that determines the result, in canonical form; the hash is taken over this."""
        content = asdict(self)
        del content["experiment"]
        return content

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """A short human name: ``nf4-b64-dq``, ``int4-b128``, ``baseline``."""
        if self.format is None:
            return "baseline"
        quant = self.quant_config()
        assert quant is not None
        parts = [self.format, f"b{quant.block_size or quant.fmt.block_size or 64}"]
        if self.double_quant is not None:
            dq = self.double_quant
            default = dq == DoubleQuantConfig()
            parts.append("dq" if default else f"dq-{dq.code}-{dq.block_size}")
        if self.constant_dtype != "float32":
            parts.append(f"c{self.constant_dtype}")
        if self.compute_dtype != "float32":
            parts.append(self.compute_dtype)
        return "-".join(parts)

    def baseline(self) -> RunConfig:
        """The unquantized config this one is compared against (same model, data and evaluation)."""
        return replace(
            self,
            format=None,
            block_size=None,
            double_quant=None,
            constant_dtype="float32",
            compute_dtype="float32",
        )


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    path: Path
    configs: tuple[RunConfig, ...]
    axes: dict[str, list[Any]]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.configs))


def experiment_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.exists():
            raise ExperimentError(f"{candidate}: no such experiment file")
        return candidate
    path = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in sorted(EXPERIMENTS_DIR.glob("*.yaml")))
        raise ExperimentError(f"unknown experiment {name_or_path!r}; known experiments: {known}")
    return path


def load_experiment(name_or_path: str, overrides: list[str] | None = None) -> Experiment:
    path = experiment_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ExperimentError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    for override in overrides or []:
        _apply_override(raw, override, path)
    return _parse(raw, path)


def list_experiments() -> list[tuple[str, Experiment | ExperimentError]]:
    """Every registry entry, loaded, or the one-line error that stops it loading."""
    out: list[tuple[str, Experiment | ExperimentError]] = []
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        try:
            out.append((path.stem, load_experiment(str(path))))
        except ExperimentError as exc:
            out.append((path.stem, exc))
    return out


# ---- parsing and validation --------------------------------------------------------------------------------


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    """``--set eval.tokens=1024`` or ``--set grid.format=[nf4,fp4]``: the value is parsed as YAML."""
    if "=" not in override:
        raise ExperimentError(f"--set {override!r}: expected KEY=VALUE, e.g. eval.tokens=1024")
    key, value = override.split("=", 1)
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"{path}: --set {key}: {part!r} is not a mapping")
    node[leaf] = yaml.safe_load(value)


def _parse(raw: dict[str, Any], path: Path) -> Experiment:
    def fail(key: str, problem: str) -> ExperimentError:
        return ExperimentError(f"{path}: {key}: {problem}")

    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise fail(unknown[0], f"unknown key; allowed keys: {', '.join(TOP_LEVEL)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise fail("name", f"expected a non-empty string, got {name!r}")
    models = raw.get("model")
    models = [models] if isinstance(models, str) else models
    if not models or not all(isinstance(m, str) and m for m in models):
        raise fail("model", f"expected a model name or a list of them, got {raw.get('model')!r}")
    layers = _mapping(raw, "layers", fail)
    include, exclude = (_string_list(layers, k, f"layers.{k}", fail) for k in ("include", "exclude"))
    _no_unknown(layers, ("include", "exclude"), "layers", fail)
    data = _settings(DataSettings, _mapping(raw, "data", fail), "data", fail)
    evaluation = _settings(EvalSettings, _mapping(raw, "eval", fail), "eval", fail)
    _check_eval(data, evaluation, fail)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail("seed", f"expected an integer, got {seed!r}")

    grid = _mapping(raw, "grid", fail)
    fixed = _mapping(raw, "fixed", fail)
    _no_unknown(grid, AXES, "grid", fail)
    _no_unknown(fixed, AXES, "fixed", fail)
    axes: dict[str, list[Any]] = {}
    for axis in AXES:
        if axis in grid:
            values = grid[axis]
            if not isinstance(values, list) or not values:
                raise fail(f"grid.{axis}", f"expected a non-empty list, got {values!r}")
            axes[axis] = [_axis_value(axis, v, f"grid.{axis}", fail) for v in values]
        elif axis in fixed:
            axes[axis] = [_axis_value(axis, fixed[axis], f"fixed.{axis}", fail)]
    if "format" not in axes:
        raise fail("grid.format", "every experiment needs at least one format")
    excludes = raw.get("exclude", []) or []
    if not isinstance(excludes, list) or not all(isinstance(e, dict) for e in excludes):
        raise fail("exclude", f"expected a list of mappings like {{format: int4_asym}}, got {excludes!r}")
    exclusions = []
    for i, rule in enumerate(excludes):
        _no_unknown(rule, AXES, f"exclude[{i}]", fail)
        exclusions.append({k: _axis_value(k, v, f"exclude[{i}].{k}", fail) for k, v in rule.items()})

    configs: list[RunConfig] = []
    names = list(axes)
    for model in models:
        for combo in itertools.product(*(axes[a] for a in names)):
            choice = dict(zip(names, combo, strict=True))
            if any(all(choice.get(k) == v for k, v in rule.items()) for rule in exclusions):
                continue
            config = RunConfig(
                experiment=name,
                model=model,
                include=tuple(sorted(include)),
                exclude=tuple(sorted(exclude)),
                data=data,
                eval=evaluation,
                seed=seed,
                **choice,
            )
            try:
                config.quant_config()
            except ValueError as exc:
                combo_text = ", ".join(f"{k}={v}" for k, v in choice.items())
                raise fail(
                    "grid", f"invalid combination ({combo_text}): {exc}; add it to `exclude`"
                ) from None
            configs.append(config)
    if not configs:
        raise fail("exclude", "excludes every combination of the grid")
    description = str(raw.get("description", ""))
    return Experiment(name, description, path, tuple(configs), axes)


def _mapping(raw: dict[str, Any], key: str, fail: Any) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise fail(key, f"expected a mapping, got {value!r}")
    return value


def _no_unknown(mapping: dict[str, Any], allowed: tuple[str, ...], where: str, fail: Any) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise fail(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}")


def _string_list(mapping: dict[str, Any], key: str, where: str, fail: Any) -> list[str]:
    value = mapping.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(where, f"expected a list of glob strings, got {value!r}")
    return value


def _settings(cls: Any, mapping: dict[str, Any], where: str, fail: Any) -> Any:
    defaults = cls()
    allowed = tuple(defaults.__dataclass_fields__)
    _no_unknown(mapping, allowed, where, fail)
    values = {}
    for key, value in mapping.items():
        default = getattr(defaults, key)
        if key == "tasks":
            if not isinstance(value, list) or not all(t in TASKS for t in value):
                raise fail(
                    f"{where}.tasks", f"expected a list of tasks from {', '.join(TASKS)}, got {value!r}"
                )
            value = tuple(sorted(value))
        elif key in ("stride", "limit"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise fail(f"{where}.{key}", f"expected a positive integer or null, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise fail(f"{where}.{key}", f"expected true or false, got {value!r}")
        elif isinstance(default, int):
            minimum = 0 if key == "calibration_sequences" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise fail(f"{where}.{key}", f"expected an integer >= {minimum}, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise fail(f"{where}.{key}", f"expected a string, got {value!r}")
        values[key] = value
    return cls(**values)


def _check_eval(data: DataSettings, evaluation: EvalSettings, fail: Any) -> None:
    if evaluation.protocol not in PROTOCOLS:
        raise fail(
            "eval.protocol", f"{evaluation.protocol!r} is not a protocol; allowed: {', '.join(PROTOCOLS)}"
        )
    if evaluation.stride is not None and evaluation.protocol != "sliding":
        raise fail("eval.stride", "only the sliding protocol takes a stride")
    if evaluation.stride is not None and evaluation.stride > evaluation.context_length:
        raise fail("eval.stride", f"{evaluation.stride} exceeds context_length {evaluation.context_length}")
    if evaluation.tokens < evaluation.context_length:
        raise fail(
            "eval.tokens", f"{evaluation.tokens} is fewer than one window ({evaluation.context_length})"
        )


def _axis_value(axis: str, value: Any, where: str, fail: Any) -> Any:
    if axis == "format":
        try:
            get_format(value if isinstance(value, str) else repr(value))
        except UnknownFormatError as exc:
            raise fail(where, str(exc)) from None
        return value
    if axis == "block_size":
        ok = (
            value is None
            or value in ("channel", "tensor")
            or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
        )
        if not ok:
            raise fail(
                where, f"{value!r} is not a block size; allowed: a positive integer, channel, tensor, null"
            )
        return value
    if axis == "double_quant":
        return _double_quant(value, where, fail)
    allowed = tuple(CONSTANT_DTYPES) if axis == "constant_dtype" else COMPUTE_DTYPES
    if value not in allowed:
        raise fail(where, f"{value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def _double_quant(value: Any, where: str, fail: Any) -> DoubleQuantConfig | None:
    # YAML 1.1 reads a bare `off`/`on` as booleans; both spellings mean the same here.
    if value in (False, None, "off"):
        return None
    if value in (True, "on"):
        return DoubleQuantConfig()
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"block_size", "code"})
        if unknown:
            raise fail(f"{where}.{unknown[0]}", "unknown key; allowed: block_size, code")
        try:
            return DoubleQuantConfig(**value)
        except ValueError as exc:
            raise fail(where, str(exc)) from None
    codes = "|".join(DOUBLE_QUANT_CODES)
    raise fail(where, f"{value!r} is not allowed; allowed: off, on, or {{block_size: N, code: {codes}}}")
