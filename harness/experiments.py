"""The experiment registry: YAML files → validated, expanded run configs with canonical hashes.

An experiment names the model(s), the layers, the corpus, the evaluation, and a grid over quantization
axes. The file is validated by the pydantic models below (unknown keys are errors; every enumeration comes
from its owner: formats from the format registry, protocols from ``evaluate``, tasks from lm-eval, dtypes from
``quantize``). Every expanded config is a ``RunConfig`` with its defaults resolved, so two spellings of one
measurement (``block_size`` omitted or 64 for nf4; ``double_quant: false`` or ``off``) are one config with
one hash. The hash covers the config and ``NUMERICS_VERSION``, never the experiment's name. Errors name the
file, the key, the bad value and what is allowed, on one line.

Experiments are read from ``./experiments/*.yaml`` in the working directory, then from the registry shipped
in the package (``harness/registry``); a working-directory file shadows a shipped one of the same name.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from harness import NUMERICS_VERSION
from harness.data import CORPORA, CORPUS_PREFIXES, TokenSplits, token_splits
from harness.errors import HarnessError
from harness.evaluate.perplexity import PROTOCOLS
from harness.quant.codebook import ROUNDING_RULES
from harness.quant.double_quant import DOUBLE_QUANT_CODES, DoubleQuantConfig
from harness.quant.formats import get_format
from harness.quant.quantize import COMPUTE_DTYPES, CONSTANT_DTYPES, BlockSize, QuantConfig

# The dtype a model is loaded and run in; ``auto``: the checkpoint's own (``harness.models.declared_dtype``).
MODEL_DTYPES = ("auto", *COMPUTE_DTYPES)
# The dtype of the model that builds the KLD reference; ``model`` is the config's own model dtype.
REFERENCE_DTYPES = ("model", *COMPUTE_DTYPES)

SHIPPED_DIR = Path(__file__).with_name("registry")
LOCAL_DIR = Path("experiments")  # relative to the working directory
DEFAULT_BLOCK_SIZE = 64  # QLoRA's, for formats that do not fix their own
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
COUNTED = 200_000  # grid points counted one by one (about 0.2 s); a bigger grid reports its product


class ExperimentError(HarnessError, ValueError):
    """A malformed experiment: one line naming the file, the key, the value and what is allowed."""


# ---- enumerations, each checked against its owner ---------------------------------------------------------


def _known_format(name: str) -> str:
    get_format(name)  # UnknownFormatError (a ValueError) lists the known formats
    return name


def _known_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise ValueError(f"{name!r} is not a protocol; allowed: {', '.join(PROTOCOLS)}")
    return name


def _known_corpus(name: str) -> str:
    if name not in CORPORA and not name.startswith(CORPUS_PREFIXES):
        allowed = ", ".join([*CORPORA, *(f"{p}..." for p in CORPUS_PREFIXES)])
        raise ValueError(f"{name!r} is not a corpus; allowed: {allowed}")
    return name


def _known_tasks(tasks: tuple[str, ...]) -> tuple[str, ...]:
    if tasks:
        from harness.evaluate.tasks import available_tasks, expand_tasks

        known = available_tasks()
        if not set(tasks) <= set(known):
            raise ValueError(f"expected a list of tasks from {', '.join(known)}, got {list(tasks)!r}")
        tasks = expand_tasks(tasks)  # a suite and its tasks spelled out are one config
    return tuple(sorted(set(tasks)))


def _one_of(allowed: tuple[str, ...] | dict[str, Any]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


def _block_size(value: Any) -> Any:
    ok = value is None or value in ("channel", "tensor")
    ok = ok or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if not ok:
        raise ValueError(f"{value!r} is not a block size; allowed: a positive integer, channel, tensor, null")
    return value


def _double_quant(value: Any) -> Any:
    # YAML 1.1 reads a bare `off`/`on` as booleans; both spellings mean the same here.
    if value is None or value is False or value == "off":
        return None
    if value is True or value == "on":
        return {}
    if isinstance(value, dict):
        return value
    codes = "|".join(DOUBLE_QUANT_CODES)
    raise ValueError(f"{value!r} is not allowed; allowed: off, on, or {{block_size: N, code: {codes}}}")


def _double_quant_code(code: str) -> str:
    if code not in DOUBLE_QUANT_CODES:
        raise ValueError(f"unknown double_quant.code {code!r}; known codes: {', '.join(DOUBLE_QUANT_CODES)}")
    return code


FormatName = Annotated[StrictStr, AfterValidator(_known_format)]
BlockSizeValue = Annotated[BlockSize | None, BeforeValidator(_block_size)]
ConstantDtype = Annotated[StrictStr, _one_of(CONSTANT_DTYPES)]
ComputeDtype = Annotated[StrictStr, _one_of(COMPUTE_DTYPES)]
ModelDtype = Annotated[StrictStr, _one_of(MODEL_DTYPES)]
RoundingRule = Annotated[StrictStr, _one_of(ROUNDING_RULES)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


# ---- the file's schema -------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DoubleQuantSpec(_Strict):
    block_size: PositiveInt = 256
    code: Annotated[StrictStr, AfterValidator(_double_quant_code)] = "dynamic"


DoubleQuantValue = Annotated[DoubleQuantSpec | None, BeforeValidator(_double_quant)]


class DataSettings(_Strict):
    corpus: Annotated[StrictStr, AfterValidator(_known_corpus)] = "wiki-summaries"
    calibration_sequences: Annotated[StrictInt, Field(ge=0)] = 4
    calibration_length: PositiveInt = 256


class EvalSettings(_Strict):
    protocol: Annotated[StrictStr, AfterValidator(_known_protocol)] = "llamacpp"
    context_length: PositiveInt = 512
    stride: PositiveInt | None = None  # sliding only; resolved to context_length // 2 when omitted
    tokens: PositiveInt = 4096
    bos: StrictBool = True
    kld: StrictBool = True
    kld_reference: Annotated[StrictStr, _one_of(("topk", "exact"))] = "topk"  # how the base is kept
    kld_topk: PositiveInt = 64  # tokens per position the top-k reference keeps
    reference_dtype: Annotated[StrictStr, _one_of(REFERENCE_DTYPES)] = "model"  # the base reference's dtype
    tasks: Annotated[tuple[StrictStr, ...], AfterValidator(_known_tasks)] = ()
    limit: PositiveInt | None = Field(None, description="a positive integer or null")  # examples per task
    batch_size: PositiveInt = 4


class LayerSelection(_Strict):
    include: list[StrictStr] = Field(default_factory=list, description="a list of glob strings")
    exclude: list[StrictStr] = Field(default_factory=list, description="a list of glob strings")


_NON_EMPTY = {"min_length": 1, "description": "a non-empty list"}


class GridAxes(_Strict):
    format: list[FormatName] | None = Field(None, **_NON_EMPTY)
    block_size: list[BlockSizeValue] | None = Field(None, **_NON_EMPTY)
    double_quant: list[DoubleQuantValue] | None = Field(None, **_NON_EMPTY)
    constant_dtype: list[ConstantDtype] | None = Field(None, **_NON_EMPTY)
    model_dtype: list[ModelDtype] | None = Field(None, **_NON_EMPTY)
    compute_dtype: list[ComputeDtype] | None = Field(None, **_NON_EMPTY)
    rounding: list[RoundingRule] | None = Field(None, **_NON_EMPTY)


class FixedAxes(_Strict):
    format: FormatName | None = None
    block_size: BlockSizeValue = None
    double_quant: DoubleQuantValue = None
    constant_dtype: ConstantDtype | None = None
    model_dtype: ModelDtype | None = None
    compute_dtype: ComputeDtype | None = None
    rounding: RoundingRule | None = None


AXES = tuple(GridAxes.model_fields)


class LayerRule(_Strict):
    """One per-layer override: layers whose name matches the glob take this format, block size and double
    quantization instead of the config's own."""

    layers: StrictStr = Field(min_length=1, description="a glob over layer names, e.g. '*.v_proj'")
    format: FormatName
    block_size: BlockSizeValue = None
    double_quant: DoubleQuantValue = None


class MixedSettings(_Strict):
    """Per-layer overrides applied to every config of the grid, in order: the last matching rule wins."""

    name: StrictStr | None = Field(None, min_length=1, description="a short name for the mixed config")
    rules: list[LayerRule] = Field(min_length=1, description="a non-empty list of {layers, format, ...}")


class Choice(_Strict):
    """One quantization a layer may take in a sensitivity probe or an allocation menu."""

    format: FormatName
    block_size: BlockSizeValue = None
    double_quant: DoubleQuantValue = None


UNIT_KINDS = ("layer", "block", "projection")
DEFAULT_PROBES = (Choice(format="nf4", block_size=64),)
DEFAULT_MENU = (
    Choice(format="nf3", block_size=64),
    Choice(format="nf4", block_size=128),
    Choice(format="nf4", block_size=64),
    Choice(format="nf4", block_size=32, double_quant={}),
    Choice(format="nf5", block_size=64),
    Choice(format="int8", block_size=128),
)


class SensitivitySettings(_Strict):
    """What ``harness sensitivity`` probes and what ``harness allocate`` may choose from."""

    units: list[Annotated[StrictStr, _one_of(UNIT_KINDS)]] = Field(
        default_factory=lambda: ["layer"], min_length=1, description=f"a list of {', '.join(UNIT_KINDS)}"
    )
    probes: list[Choice] = Field(default_factory=lambda: list(DEFAULT_PROBES), min_length=1)
    menu: list[Choice] = Field(default_factory=lambda: list(DEFAULT_MENU), min_length=2)
    cache_memory_mb: PositiveInt = 1024  # prefix cache above this goes to a file on disk
    seed: StrictInt = 0  # of the random allocation it is compared with


class ExperimentFile(_Strict):
    name: StrictStr | None = Field(None, min_length=1, description="a non-empty string")
    description: StrictStr = ""
    model: StrictStr | list[StrictStr] = Field(description="a model name or a list of them")
    model_dtype: ModelDtype = "auto"  # `grid` or `fixed` may set it too, and win
    layers: LayerSelection = LayerSelection()
    data: DataSettings = DataSettings()
    eval: EvalSettings = EvalSettings()
    grid: GridAxes = GridAxes()
    fixed: FixedAxes = FixedAxes()
    exclude: list[FixedAxes] = Field(
        default_factory=list, description="a list of mappings like {format: int4_asym}"
    )
    mixed: MixedSettings | None = None
    sensitivity: SensitivitySettings = SensitivitySettings()
    seed: StrictInt = 0


# ---- expanded configs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One measurement, defaults resolved. ``format=None`` is the unquantized baseline of its model."""

    experiment: str
    model: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    format: str | None = None
    block_size: BlockSize | None = None
    double_quant: DoubleQuantConfig | None = None
    constant_dtype: str = "float32"
    model_dtype: str = "auto"  # the dtype the model is loaded and run in; ``resolved`` turns auto into one
    compute_dtype: str | None = None  # of the dequantized matmuls; None: the model dtype
    rounding: str = "ties_down"  # the tie rule between two levels; bitsandbytes' by default
    seed: int = 0
    overrides: tuple[LayerOverride, ...] = ()  # per-layer rules, in order: the last match wins
    mix_name: str | None = None  # the short name of a mixed config (else mixed-<hash6>)

    @property
    def is_baseline(self) -> bool:
        return self.format is None

    @property
    def is_resolved(self) -> bool:
        return self.model_dtype != "auto" and self.compute_dtype is not None

    def resolved(self, declared: str) -> RunConfig:
        """This config with its dtypes concrete: ``auto`` becomes ``declared`` (the checkpoint's dtype), the
        compute dtype defaults to the model dtype and the reference dtype ``model`` to it too. Two spellings
        of one measurement (``auto`` and the declared dtype spelled out) become one config with one hash."""
        model_dtype = declared if self.model_dtype == "auto" else self.model_dtype
        reference = self.eval.reference_dtype
        return replace(
            self,
            model_dtype=model_dtype,
            compute_dtype=self.compute_dtype or model_dtype,
            eval=self.eval.model_copy(
                update={"reference_dtype": model_dtype if reference == "model" else reference}
            ),
        )

    def quant_config(self) -> QuantConfig | None:
        if self.format is None:
            return None
        return QuantConfig(
            self.format, self.block_size, self.double_quant, self.constant_dtype, self.rounding
        )  # type: ignore[arg-type]

    def layer_rules(self) -> list[tuple[str, QuantConfig]]:
        """The overrides as (glob, quantization), with this config's constant dtype and tie rule."""
        return [
            (
                o.layers,
                QuantConfig(o.format, o.block_size, o.double_quant, self.constant_dtype, self.rounding),
            )  # type: ignore[arg-type]
            for o in self.overrides
        ]

    def content(self) -> dict[str, Any]:
        """Everything that determines the result, in canonical form (the experiment's name left out; the
        overrides only when there are some, so a uniform config keeps its hash)."""
        dq = self.double_quant
        mixed = {"overrides": [o.content() for o in self.overrides]} if self.overrides else {}
        return mixed | {
            "model": self.model,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "data": self.data.model_dump(),
            "eval": self.eval.model_dump(mode="json"),
            "format": self.format,
            "block_size": self.block_size,
            "double_quant": None if dq is None else dq.spec(),
            "constant_dtype": self.constant_dtype,
            "model_dtype": self.model_dtype,
            "compute_dtype": self.compute_dtype,
            "rounding": self.rounding,
            "seed": self.seed,
        }

    @property
    def config_id(self) -> str:
        """The config alone: the same across numerics versions, so a rerun by newer code supersedes."""
        return _digest(self.content())

    @property
    def hash(self) -> str:
        """The config and the numerics version: a FINISHED run is reused only under both."""
        return _digest({"numerics_version": NUMERICS_VERSION, **self.content()})

    def _label_parts(self) -> list[tuple[str, str]]:
        dtypes = []  # bf16, today's checkpoints' dtype, is left unsaid; so is a compute dtype equal to it
        if self.model_dtype not in ("bfloat16", "auto"):
            dtypes.append(("model_dtype", DTYPE_LABELS[self.model_dtype]))
        if self.compute_dtype not in (None, self.model_dtype):
            dtypes.append(("compute_dtype", f"compute-{DTYPE_LABELS[self.compute_dtype]}"))
        if self.format is None:
            return [("format", "baseline"), *dtypes]
        if self.overrides:
            return [("mixed", self.mix_name or f"mixed-{self.hash[:6]}"), *dtypes]
        parts = [("format", self.format), ("block_size", f"b{self.block_size}")]
        if (dq := self.double_quant) is not None:
            parts.append(("double_quant", dq.label))
        if self.constant_dtype != "float32":
            parts.append(("constant_dtype", f"c{self.constant_dtype}"))
        parts += dtypes
        if self.rounding != "ties_down":
            parts.append(("rounding", self.rounding))
        return parts

    @property
    def label(self) -> str:
        """A short human name: ``nf4-b64-dq``, ``int4-b128``, ``baseline``."""
        return "-".join(text for _, text in self._label_parts())

    @property
    def variant(self) -> str:
        """The label without its block size (``nf4-b64-dq`` → ``nf4-dq``): a block-size table column."""
        return "-".join(text for axis, text in self._label_parts() if axis != "block_size")

    def token_splits(self, tokenizer: Any) -> TokenSplits:
        """The calibration and evaluation tokens of this config's corpus under ``tokenizer``."""
        return token_splits(
            self.data.corpus,
            tokenizer,
            calibration_sequences=self.data.calibration_sequences,
            calibration_length=self.data.calibration_length,
            eval_tokens=self.eval.tokens,
            add_bos=self.eval.bos,
        )

    def baseline(self) -> RunConfig:
        """The unquantized config this one is compared against (same model, data and evaluation)."""
        return replace(
            self,
            format=None,
            block_size=None,
            double_quant=None,
            constant_dtype="float32",
            compute_dtype=None if self.model_dtype == "auto" else self.model_dtype,
            rounding="ties_down",
            overrides=(),
            mix_name=None,
        )


@dataclass(frozen=True)
class LayerOverride:
    """A resolved per-layer rule: layers matching ``layers`` take this format, block size and DQ."""

    layers: str
    format: str
    block_size: BlockSize
    double_quant: DoubleQuantConfig | None = None

    @classmethod
    def of(cls, layers: str, choice: Choice | LayerRule) -> LayerOverride:
        dq = _axis_value("double_quant", choice.double_quant)
        fmt = get_format(choice.format)
        return cls(layers, choice.format, choice.block_size or fmt.block_size or DEFAULT_BLOCK_SIZE, dq)

    def content(self) -> dict[str, Any]:
        dq = self.double_quant
        return {
            "layers": self.layers,
            "format": self.format,
            "block_size": self.block_size,
            "double_quant": None if dq is None else dq.spec(),
        }


def _digest(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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


# ---- finding and loading -----------------------------------------------------------------------------------


def experiment_paths() -> dict[str, Path]:
    """Every experiment by name: the working directory's ``experiments/`` shadows the shipped registry."""
    found = {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}
    found |= {p.stem: p.resolve() for p in sorted(LOCAL_DIR.glob("*.yaml"))}
    return dict(sorted(found.items()))


def experiment_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ExperimentError(f"{candidate}: no such experiment file")
        return candidate
    known = experiment_paths()
    if name_or_path not in known:
        raise ExperimentError(
            f"unknown experiment {name_or_path!r}; known experiments: {', '.join(known)} "
            f"(or pass a path to a .yaml file)"
        )
    return known[name_or_path]


def load_experiment(name_or_path: str, overrides: list[str] | None = None) -> Experiment:
    path = experiment_path(name_or_path)
    try:
        raw = _parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ExperimentError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ExperimentError(
            f"{path}: not valid YAML{_where(exc)}: {getattr(exc, 'problem', exc)}"
        ) from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    for override in overrides or []:
        _apply_override(raw, override, path)
    try:
        spec = ExperimentFile.model_validate(raw)
    except ValidationError as exc:
        raise ExperimentError(f"{path}: {_one_line(exc)}") from None
    return _expand(spec, path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not "last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                problem = f"duplicate key {key!r} (first given on line {seen[key]})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only


def list_experiments() -> list[tuple[str, Experiment | ExperimentError]]:
    """Every registry entry, loaded, or the one-line error that stops it loading."""
    out: list[tuple[str, Experiment | ExperimentError]] = []
    for name, path in experiment_paths().items():
        try:
            out.append((name, load_experiment(str(path))))
        except ExperimentError as exc:
            out.append((name, exc))
    return out


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    """``--set eval.tokens=1024`` or ``--set grid.format=[nf4,fp4]``: the value is parsed as YAML."""
    if "=" not in override:
        raise ExperimentError(f"--set {override!r}: expected KEY=VALUE, e.g. eval.tokens=1024")
    key, value = (part.strip() for part in override.split("=", 1))
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"{path}: --set {key}: {part!r} is not a mapping")
    try:
        node[leaf] = _parse(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ExperimentError(f"--set {key}: {value!r} is not a valid YAML value: {problem}") from None


# ---- validation errors as one line ------------------------------------------------------------------------


def _one_line(exc: ValidationError) -> str:
    """The first error as ``key: problem``, in the words of this file's schema."""
    error = exc.errors()[0]
    kind, value = error["type"], error.get("input")
    key, owner, described = _locate(error["loc"], unknown_key=kind == "extra_forbidden")
    if kind == "extra_forbidden":
        return f"{key}: unknown key; allowed: {', '.join(owner.model_fields) if owner else '(none)'}"
    if kind == "value_error":
        return f"{key}: {str(error['msg']).removeprefix('Value error, ')}"
    if kind == "missing":
        return f"{key}: expected {described or 'a value'}; it is missing"
    if described:
        return f"{key}: expected {described}, got {value!r}"
    if kind == "greater_than_equal":
        return f"{key}: expected an integer >= {error['ctx']['ge']}, got {value!r}"
    expected = {
        "int_type": "an integer",
        "bool_type": "true or false",
        "string_type": "a string",
        "model_type": "a mapping",
        "dict_type": "a mapping",
        "list_type": "a list",
        "tuple_type": "a list",
    }.get(kind)
    return f"{key}: expected {expected}, got {value!r}" if expected else f"{key}: {error['msg']}"


def _locate(loc: tuple[Any, ...], unknown_key: bool) -> tuple[str, type[BaseModel] | None, str | None]:
    """The dotted key of an error, the schema model holding it, and the field's description.

    List positions and pydantic's union-member tags are left out of the key: ``grid.format``, not
    ``grid.format.0``."""
    model: type[BaseModel] | None = ExperimentFile
    owner, description, keys = model, None, []
    parts = [p for p in loc if isinstance(p, str)]
    for i, part in enumerate(parts):
        if model is not None and part in model.model_fields:
            owner, info = model, model.model_fields[part]
            keys.append(part)
            description, model = info.description, _model_in(info.annotation)
        elif unknown_key and i == len(parts) - 1:
            owner, description = model, None
            keys.append(part)
    return ".".join(keys) or "(top level)", owner, description


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]`` or ``Annotated[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation) if get_origin(annotation) is not None else ():
        if (found := _model_in(arg)) is not None:
            return found
    return None


# ---- expansion ---------------------------------------------------------------------------------------------


def _expand(spec: ExperimentFile, path: Path) -> Experiment:
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
            axes[axis] = list(dict.fromkeys(_axis_value(axis, v) for v in values))  # duplicates collapse
    if "format" not in axes:
        raise fail("grid.format", "every experiment needs at least one format")
    exclusions = [
        {k: _axis_value(k, getattr(rule, k)) for k in rule.model_fields_set} for rule in spec.exclude
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
        seed=spec.seed,
        overrides=overrides,
        mix_name=mix_name,
    )
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


def _axis_value(axis: str, value: Any) -> Any:
    if value is None and axis == "rounding":
        return "ties_down"
    if value is None and axis == "model_dtype":
        return "auto"
    if axis == "double_quant" and value is not None:
        return DoubleQuantConfig(value.block_size, value.code)
    return value


def _shown(value: Any) -> str:
    if isinstance(value, DoubleQuantConfig):
        return value.text
    return "off" if value is None else str(value)
