"""``RunConfig``: one measurement with its defaults resolved, and its canonical hash.

Two spellings of one measurement (``block_size`` omitted or 64 for nf4; ``double_quant: false`` or ``off``;
``model_dtype: auto`` or the checkpoint's dtype spelled out) are one config with one hash. The hash covers
the config and ``NUMERICS_VERSION``, never the experiment's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from harness import NUMERICS_VERSION, methods
from harness.devices import DeviceMap, device_type, resolve_device
from harness.experiments.schema import (
    Choice,
    DataSettings,
    EvalSettings,
    LayerRule,
    MethodSettings,
    RecoverySettings,
)
from harness.quant.double_quant import DoubleQuantConfig
from harness.quant.formats import get_format
from harness.quant.quantize import BlockSize, QuantConfig

DEFAULT_BLOCK_SIZE = 64  # QLoRA's, for formats that do not fix their own
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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
    device: str = "auto"  # where the model runs (harness.devices); ``resolved`` decides auto
    device_map: DeviceMap | None = None  # the model's modules over several devices (a tag, not in the hash)
    compute_dtype: str | None = None  # of the dequantized matmuls; None: the model dtype
    rounding: str = "ties_down"  # the tie rule between two levels; bitsandbytes' by default
    method: str = "rtn"  # which codes and constants the layers take (harness.methods)
    method_settings: MethodSettings = field(default_factory=MethodSettings)
    seed: int = 0
    overrides: tuple[LayerOverride, ...] = ()  # per-layer rules, in order: the last match wins
    mix_name: str | None = None  # the short name of a mixed config (else mixed-<hash6>)
    recovery: RecoverySettings | None = None  # LoRA adapters trained on the quantized base, then evaluated

    @property
    def is_baseline(self) -> bool:
        return self.format is None

    @property
    def is_resolved(self) -> bool:
        return self.model_dtype != "auto" and self.compute_dtype is not None and self.device != "auto"

    def resolved(self, declared: str) -> RunConfig:
        """This config with its dtypes concrete: ``auto`` becomes ``declared`` (the checkpoint's dtype), the
        compute dtype defaults to the model dtype and the reference dtype ``model`` to it too. Two spellings
        of one measurement (``auto`` and the declared dtype spelled out) become one config with one hash.
        The device is decided and checked here, with the device map: DeviceError for one this machine
        lacks."""
        model_dtype = declared if self.model_dtype == "auto" else self.model_dtype
        reference = self.eval.reference_dtype
        device = resolve_device(self.device)
        if self.device_map is not None:
            self.device_map.check(device)
        return replace(
            self,
            model_dtype=model_dtype,
            device=device,
            compute_dtype=self.compute_dtype or model_dtype,
            eval=self.eval.model_copy(
                update={"reference_dtype": model_dtype if reference == "model" else reference}
            ),
        )

    def quant_config(self) -> QuantConfig | None:
        """The quantization of every layer no override names; ValueError where the method cannot choose it."""
        if self.format is None:
            return None
        quant = QuantConfig(
            self.format, self.block_size, self.double_quant, self.constant_dtype, self.rounding
        )  # type: ignore[arg-type]
        methods.check(self.method, quant)
        return quant

    def layer_rules(self) -> list[tuple[str, QuantConfig]]:
        """The overrides as (glob, quantization), with this config's constant dtype and tie rule."""
        rules = []
        for o in self.overrides:
            quant = QuantConfig(o.format, o.block_size, o.double_quant, self.constant_dtype, self.rounding)  # type: ignore[arg-type]
            methods.check(self.method, quant)
            rules.append((o.layers, quant))
        return rules

    def content(self) -> dict[str, Any]:
        """Everything that determines the result, in canonical form (the experiment's name left out)."""
        dq = self.double_quant
        return {
            **_beyond_the_first(self),
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
        lora = [] if self.recovery is None else [("recovery", "lora")]  # adapters trained, then evaluated
        if self.format is None:
            return [("format", "baseline"), *dtypes, *lora]
        if self.overrides:
            return [("mixed", self.mix_name or f"mixed-{self.hash[:6]}"), *dtypes, *lora]
        parts = [("format", self.format), ("block_size", f"b{self.block_size}")]
        if (dq := self.double_quant) is not None:
            parts.append(("double_quant", dq.label))
        if self.constant_dtype != "float32":
            parts.append(("constant_dtype", f"c{self.constant_dtype}"))
        if self.method != "rtn":
            parts.append(("method", self.method))
        parts += dtypes
        if self.rounding != "ties_down":
            parts.append(("rounding", self.rounding))
        return parts + lora

    @property
    def label(self) -> str:
        """A short human name: ``nf4-b64-dq``, ``int4-b128``, ``baseline``."""
        return "-".join(text for _, text in self._label_parts())

    @property
    def variant(self) -> str:
        """The label without its block size (``nf4-b64-dq`` → ``nf4-dq``): a block-size table column."""
        return "-".join(text for axis, text in self._label_parts() if axis != "block_size")

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
            method="rtn",
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
        dq = axis_value("double_quant", choice.double_quant)
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


def _beyond_the_first(config: RunConfig) -> dict[str, Any]:
    """The settings added since the first hashes, each in a config's content only when it differs from what
    configs were before it existed (overrides, a method other than RTN, recovery, a device other than the
    CPU), so that those configs keep their hash."""
    mixed = {"overrides": [o.content() for o in config.overrides]} if config.overrides else {}
    settings = config.method_settings.of(config.method)
    method = {} if config.method == "rtn" else {"method": config.method}
    method |= {"method_settings": settings} if method and settings else {}
    recipe = config.recovery
    recovery = {} if recipe is None else {"recovery": recipe.model_dump(exclude=recipe.UNHASHED)}
    kind = device_type(config.device)
    device = {} if kind == "cpu" else {"device": kind}
    return {**device, **mixed, **method, **recovery}


def _digest(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def axis_value(axis: str, value: Any) -> Any:
    if value is None and axis == "rounding":
        return "ties_down"
    if value is None and axis == "method":
        return "rtn"
    if value is None and axis == "model_dtype":
        return "auto"
    if axis == "double_quant" and value is not None:
        return DoubleQuantConfig(value.block_size, value.code)
    return value
