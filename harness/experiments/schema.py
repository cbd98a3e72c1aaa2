"""The experiment file's schema: pydantic models whose every enumeration is checked against its owner.

Unknown keys are errors; formats come from the format registry, protocols from ``evaluate``, tasks from
lm-eval, dtypes from ``quant.quantize``. ``loader`` turns a validation error into one line.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

from harness.data import CORPORA, CORPUS_PREFIXES
from harness.devices import DEVICE_NAMES, MAP_STRATEGIES
from harness.errors import HarnessError
from harness.evaluate.windows import PROTOCOLS
from harness.methods import METHODS
from harness.quant.codebook import ROUNDING_RULES
from harness.quant.double_quant import DOUBLE_QUANT_CODES
from harness.quant.formats import get_format
from harness.quant.quantize import COMPUTE_DTYPES, CONSTANT_DTYPES, BlockSize

# The dtype a model is loaded and run in; ``auto``: the checkpoint's own (``harness.models.declared_dtype``).
MODEL_DTYPES = ("auto", *COMPUTE_DTYPES)
# The dtype of the model that builds the KLD reference; ``model`` is the config's own model dtype.
REFERENCE_DTYPES = ("model", *COMPUTE_DTYPES)


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
MethodName = Annotated[StrictStr, _one_of(METHODS)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
DeviceName = Annotated[
    StrictStr, Field(pattern=f"^({DEVICE_NAMES.pattern})$", description="auto, cpu, cuda or cuda:N")
]
MapTarget = StrictInt | Literal["cpu", "disk"]  # a GPU index, the host or the disk


def _memory_size(value: int | str) -> int | str:
    from accelerate.utils import convert_file_size_to_int

    if isinstance(value, str):
        try:
            convert_file_size_to_int(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a size; write bytes or a size with a unit such as 20GiB"
            ) from None
    return value


MemorySize = Annotated[Annotated[StrictInt, Field(ge=0)] | StrictStr, AfterValidator(_memory_size)]
DeviceMapValue = Annotated[StrictStr, _one_of(MAP_STRATEGIES)] | dict[StrictStr, MapTarget]


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


class GptqSettings(_Strict):
    damp: Annotated[float, Field(gt=0, lt=1, description="a number in (0, 1)")] = 0.01  # × mean(diag H)
    act_order: StrictBool = False  # columns by decreasing diag H; block constants then fixed up front
    lazy_block: PositiveInt = 128  # columns whose error updates are batched


class AwqSettings(_Strict):
    grid: PositiveInt = 20  # α = k / grid for k = 0 … grid − 1
    rows: PositiveInt = 512  # calibration positions per layer the search fits on


class MethodSettings(_Strict):
    """Each method's settings (``hqq`` takes HQQ's own); a config's hash holds those of its method only."""

    gptq: GptqSettings = GptqSettings()
    awq: AwqSettings = AwqSettings()

    def of(self, method: str) -> dict[str, Any]:
        settings = getattr(self, method, None)
        return settings.model_dump() if settings is not None else {}


class RecoverySettings(_Strict):
    """LoRA finetuning on each config's quantized base (QLoRA's recipe, via peft), then the same evaluation
    again. Training rows come from calibration-pool documents that calibration did not use."""

    rank: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0, description="a positive number")] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1, description="a number in [0, 1)")] = 0.05
    # globs over Linear layer names; empty: the layers the config quantizes
    target_modules: list[StrictStr] = Field(default_factory=list, description="a list of glob strings")
    lr: Annotated[float, Field(gt=0, description="a positive number")] = 2e-4
    warmup: Annotated[StrictInt, Field(ge=0)] = 5  # steps of linear warmup, then constant
    steps: PositiveInt = 20
    batch: PositiveInt = 4  # sequences per optimizer step, one forward each (gradients accumulate)
    sequence_length: PositiveInt = 128
    seed: StrictInt = 0
    # each block's activations recomputed in the backward pass instead of kept: less memory, more time
    checkpointing: StrictBool = False

    # settings that change only the training's memory and time, never a number: the config hash and the
    # 16-bit target's cache key leave them out
    UNHASHED: ClassVar[frozenset[str]] = frozenset({"checkpointing"})


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
    method: list[MethodName] | None = Field(None, **_NON_EMPTY)


class FixedAxes(_Strict):
    format: FormatName | None = None
    block_size: BlockSizeValue = None
    double_quant: DoubleQuantValue = None
    constant_dtype: ConstantDtype | None = None
    model_dtype: ModelDtype | None = None
    compute_dtype: ComputeDtype | None = None
    rounding: RoundingRule | None = None
    method: MethodName | None = None


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
    device: DeviceName = "auto"  # where the model runs: CUDA when torch sees a device, else the CPU
    device_map: DeviceMapValue | None = Field(  # accelerate's placement over GPUs, host and disk
        None,
        description=f"{', '.join(MAP_STRATEGIES)} or a mapping {{module name: GPU index, 'cpu' or 'disk'}}",
    )
    max_memory: dict[MapTarget, MemorySize] | None = Field(  # per device, with device_map
        None, description="a mapping {GPU index, 'cpu' or 'disk': bytes or a size such as 20GiB}"
    )
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
    methods: MethodSettings = MethodSettings()
    recovery: RecoverySettings | None = None
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _memory_with_map(self) -> ExperimentFile:
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory caps the devices of a device_map; set device_map (e.g. auto) too")
        if self.recovery is not None and self.device_map is not None:
            raise ValueError("recovery trains on one device; leave device_map out")
        return self
