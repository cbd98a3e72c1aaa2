"""The metric registry; storage accounting and reconstruction error, with the information-theoretic
references beside them.

Bits per parameter are counted from the bytes actually stored (packed codes, constants, second-level
constants, offsets), never from a formula, so partial blocks, padding and per-tensor scalars all count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from harness.quant.quantize import COMPUTE_DTYPES, QuantizedTensor
from harness.stats import METHOD


def stored_bytes(qt: QuantizedTensor) -> int:
    return sum(t.numel() * t.element_size() for t in qt.stored_tensors().values())


def bits_per_param(qt: QuantizedTensor) -> float:
    return 8 * stored_bytes(qt) / qt.numel if qt.numel else 0.0


def error_metrics(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Weight-space error of ``approx`` against ``reference``, in fp32 (BLAS dot products: blocked sums).

    mse; nmse = mse / mean(W²); rel_fro = ‖W − Ŵ‖_F / ‖W‖_F; sqnr_db = 10·log10(mean(W²) / mse);
    max_abs; cosine similarity of the flattened tensors.
    """
    w = reference.detach().reshape(-1).float()
    a = approx.detach().reshape(-1).float()
    e = a - w  # exact enough: the rounding of a difference is relative to the difference itself
    n = max(w.numel(), 1)
    mse = float(torch.dot(e, e)) / n
    power = float(torch.dot(w, w)) / n
    approx_power = float(torch.dot(a, a)) / n
    dot = float(torch.dot(w, a)) / n
    return {
        "mse": mse,
        "nmse": mse / power if power else math.nan,
        "rel_fro": math.sqrt(mse / power) if power else math.nan,
        "sqnr_db": 10 * math.log10(power / mse) if mse and power else math.inf,
        "max_abs": float(e.abs().max()) if e.numel() else 0.0,
        "cosine": dot / math.sqrt(power * approx_power) if power and approx_power else math.nan,
    }


@cache
def lloyd_max_mse(levels: int, iterations: int = 2000, tol: float = 1e-13) -> float:
    """MSE of the optimal (Lloyd-Max) scalar quantizer of N(0, 1) with ``levels`` levels, via scipy."""
    from scipy.stats import norm

    # Start from equal-probability cells; Lloyd's iteration converges monotonically for the Gaussian.
    centroids = norm.ppf((np.arange(levels) + 0.5) / levels)
    mse = math.inf
    for _ in range(iterations):
        edges = np.concatenate([[-np.inf], (centroids[:-1] + centroids[1:]) / 2, [np.inf]])
        lo, hi = edges[:-1], edges[1:]
        mass = norm.cdf(hi) - norm.cdf(lo)
        centroids = (norm.pdf(lo) - norm.pdf(hi)) / mass  # E[X | lo < X < hi]
        # E[(X - c)²] over each cell = E[X²] - 2c·E[X] + c²·P, summed.
        second = mass + _x_pdf(lo) - _x_pdf(hi)
        first = norm.pdf(lo) - norm.pdf(hi)
        new_mse = float(np.sum(second - 2 * centroids * first + centroids**2 * mass))
        if abs(mse - new_mse) < tol:
            return new_mse
        mse = new_mse
    return mse


def _x_pdf(x: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    with np.errstate(invalid="ignore"):  # ±inf · 0 at the outer edges; those terms are 0
        return np.where(np.isfinite(x), x * norm.pdf(x), 0.0)


def gaussian_rate_distortion(bits_per_param: float, variance: float = 1.0) -> float:
    """Shannon's lower bound on the MSE of any code at R bits per sample for N(0, σ²): D = σ²·2^(−2R)."""
    return variance * 2.0 ** (-2.0 * bits_per_param)


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F: the error the layer's output sees on real inputs.

    fp32 matmuls (float64 would dominate a sweep's time); the difference W − Ŵ is formed first, so the
    error term's rounding is relative to the error itself and a near-zero error stays near zero."""
    w, x = weight.detach().float(), x.detach().float()
    reference = float((x @ w.T).norm())
    error = float((x @ (w - approx.detach().float()).T).norm())
    return error / reference if reference else math.nan


def activation_weighted_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """Σ_j E[x_j²]·‖W[:, j] − Ŵ[:, j]‖²: the rounding error of each input column weighted by its mean
    squared activation (llama.cpp's importance matrix), = E‖x (W − Ŵ)ᵀ‖² with the cross terms dropped."""
    importance = x.detach().float().pow(2).mean(dim=0)
    column_error = (weight.detach().float() - approx.detach().float()).pow(2).sum(dim=0)
    return float(torch.dot(importance, column_error))


def weight_statistics(weight: torch.Tensor) -> dict[str, float]:
    """Shape of the weight distribution: Pearson kurtosis (3 for a Gaussian) and max |w| / RMS(w)."""
    w = weight.detach().reshape(-1).double()
    centred = w - w.mean()
    variance = float(centred.pow(2).mean())
    rms = math.sqrt(float(w.pow(2).mean()))
    return {
        "kurtosis": float(centred.pow(4).mean()) / variance**2 if variance else math.nan,
        "max_over_rms": float(w.abs().max()) / rms if rms else math.nan,
    }


# ---- the metric registry ----------------------------------------------------------------------------------
#
# One declaration per metric, as lm-eval's ``register_metric``: name, unit, direction, how per-layer values
# combine into the model's number, display precision and a one-line definition. Logging refuses undeclared
# names; layer aggregation, tables, plots and the README's metric table all read these declarations.

Better = Literal["lower", "higher"]
Aggregation = Literal["numel_weighted", "max", "sum", "model"]
Scope = Literal["config", "sweep"]
AGGREGATIONS: dict[str, str] = {
    "numel_weighted": "mean, weighted by parameters",
    "max": "worst layer",
    "sum": "sum",
    "model": "—",
}
TASK = "<task>"  # a placeholder in a family's name: one declaration covers every lm-eval task


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str  # a table's column header
    unit: str
    better: Better | None
    aggregation: Aggregation  # how per-layer values combine; "model" = measured on the model as a whole
    definition: str
    decimals: int | None = None  # fixed decimals; None = ``sig`` significant digits
    sig: int = 3
    scale: float = 1.0  # shown × scale: 100 for a share shown in %, 1e-6 for bytes shown in MB
    signed: bool = False
    stderr: str | None = None  # the metric holding this one's standard error
    interval: tuple[str, str] | None = None  # the metrics holding its 95 % interval (low, high)
    per_token: str | None = None  # the per-token series whose mean it orders by: two runs compare paired
    scope: Scope = "config"  # a config's run, or the sweep's parent run

    @property
    def layer_column(self) -> str | None:
        """The per-layer column this metric aggregates (``nmse_max`` aggregates ``nmse``)."""
        if self.aggregation == "model":
            return None
        return self.name.removesuffix("_max") if self.aggregation == "max" else self.name

    @property
    def header(self) -> str:
        return " ".join(p for p in (self.label, self.subheader) if p)

    @property
    def subheader(self) -> str:
        """Unit and direction: the second header line in LaTeX, so that columns stay narrow."""
        unit = f"({self.unit})" if self.unit else ""
        arrow = {"lower": "↓", "higher": "↑", None: ""}[self.better]
        return " ".join(p for p in (unit, arrow) if p)

    def text(self, value: float) -> str:
        """``value`` (already scaled) at this metric's precision; an em dash when missing or non-finite."""
        if not math.isfinite(value):
            return "—"
        digits = self.decimals
        if digits is None:
            digits = 0 if value == 0 else max(0, min(8, self.sig - 1 - math.floor(math.log10(abs(value)))))
        return f"{value:+.{digits}f}" if self.signed else f"{value:.{digits}f}"


METRICS: dict[str, MetricSpec] = {}


def register_metric(
    name: str,
    label: str,
    unit: str,
    better: Better | None,
    aggregation: Aggregation,
    definition: str,
    **display: Any,
) -> MetricSpec:
    if name in METRICS:
        raise ValueError(f"metric {name!r} is declared twice")
    METRICS[name] = MetricSpec(name, label, unit, better, aggregation, definition, **display)
    return METRICS[name]


def metric(name: str) -> MetricSpec:
    """The declaration of ``name``; for ``acc_piqa`` and the like, its family's, with the task filled in."""
    if name in METRICS:
        return METRICS[name]
    matches = []
    for spec in METRICS.values():
        head, found, tail = spec.name.partition(TASK)
        if found and len(name) > len(head) + len(tail) and name.startswith(head) and name.endswith(tail):
            matches.append((len(head) + len(tail), spec, name[len(head) : len(name) - len(tail)]))
    if not matches:
        raise KeyError(f"undeclared metric {name!r}; declare it with harness.metrics.register_metric")
    _, spec, task = max(
        matches, key=lambda m: m[0]
    )  # the most specific family: acc_norm_<task> over acc_<task>
    return replace(
        spec,
        name=name,
        label=spec.label.replace(TASK, task),
        stderr=spec.stderr.replace(TASK, task) if spec.stderr else None,
    )


def aggregate(layers: pd.DataFrame) -> dict[str, float]:
    """Each declared per-layer metric over the rows of a ``layer_table``, by its declared aggregation."""
    numel = layers["numel"].to_numpy(dtype=np.float64)
    out = {}
    for spec in METRICS.values():
        column = spec.layer_column
        if column is None or column not in layers:
            continue
        values = layers[column].to_numpy(dtype=np.float64)
        if spec.aggregation == "numel_weighted":
            out[spec.name] = float((values * numel).sum() / numel.sum())
        elif spec.aggregation == "max":
            out[spec.name] = float(values.max())
        else:
            out[spec.name] = float(values.sum())
    return out


def markdown_table() -> str:
    """The registry as the README shows it (a test keeps the two equal)."""
    lines = ["| Metric | Shown in | Better | Over layers | Definition |", "|:--|:--|:--|:--|:--|"]
    for spec in METRICS.values():
        better = {"lower": "lower", "higher": "higher", None: "—"}[spec.better]
        where = " (sweep run)" if spec.scope == "sweep" else ""
        definition = spec.definition.replace("|", r"\|")
        lines.append(
            f"| `{spec.name}`{where} | {spec.unit or '—'} | {better} | {AGGREGATIONS[spec.aggregation]} "
            f"| {definition} |"
        )
    return "\n".join(lines) + "\n"


# Storage
register_metric(
    "bits_per_param",
    "Bits/param",
    "",
    "lower",
    "numel_weighted",
    "bits stored per parameter of the quantized layers: codes, constants, second-level constants and offsets",
    decimals=3,
)
register_metric(
    "stored_bytes",
    "Stored",
    "MB",
    "lower",
    "sum",
    "bytes stored for the quantized layers",
    decimals=2,
    scale=1e-6,
)
register_metric(
    "model_memory_bytes",
    "Memory",
    "MB",
    "lower",
    "model",
    "the quantized layers as stored plus every other parameter at its loaded dtype",
    decimals=1,
    scale=1e-6,
)
for _size in ("7B", "70B"):
    register_metric(
        f"projected_{_size}_GB",
        f"{_size} memory",
        "GB",
        "lower",
        "model",
        f"a {_size}-parameter model stored at this bits/param (GB = 1e9 bytes)",
        decimals=2 if _size == "7B" else 1,
    )
# Weight-space error, per layer against the source weight
register_metric(
    "nmse", "nMSE", "", "lower", "numel_weighted", "‖W − Ŵ‖² / ‖W‖², the weight MSE normalised by mean(W²)"
)
register_metric("nmse_max", "Worst nMSE", "", "lower", "max", "the largest per-layer nMSE")
register_metric("rel_fro", "Rel. Frobenius err.", "", "lower", "numel_weighted", "‖W − Ŵ‖_F / ‖W‖_F")
register_metric(
    "sqnr_db",
    "SQNR",
    "dB",
    "higher",
    "model",
    "10·log10(1 / nMSE) of the parameter-weighted nMSE",
    decimals=2,
)
register_metric(
    "cosine", "Cosine", "", "higher", "numel_weighted", "cosine similarity of W and Ŵ", decimals=5
)
register_metric(
    "tie_fraction", "Ties", "%", None, "numel_weighted",
    "share of weights exactly half-way between two distinct levels after block scaling: the tie rule decides",
    sig=2, scale=100,
)  # fmt: skip
register_metric("max_abs", "Max |ΔW|", "", "lower", "max", "the largest |W − Ŵ| of any weight")
register_metric(
    "output_rel_err",
    "Output err.",
    "%",
    "lower",
    "numel_weighted",
    "‖XWᵀ − XŴᵀ‖_F / ‖XWᵀ‖_F on calibration inputs X of each layer",
    scale=100,
)
# Language modelling, on the evaluation tokens under the experiment's perplexity protocol. Every interval is
# a block bootstrap over the scored tokens in order (harness.stats.METHOD), paired where two models meet.
register_metric(
    "ppl", "PPL", "", "lower", "model", "exp(mean NLL) of the scored tokens under the named protocol",
    decimals=2, interval=("ppl_ci95_low", "ppl_ci95_high"), per_token="nll",
)  # fmt: skip
for _end in ("low", "high"):
    register_metric(
        f"ppl_ci95_{_end}", f"PPL 95% CI {_end}", "", None, "model",
        f"{_end} end of the 95% interval of ppl ({METHOD})", decimals=2,
    )  # fmt: skip
    register_metric(
        f"delta_ppl_ci95_{_end}", f"ΔPPL 95% CI {_end}", "", None, "model",
        f"{_end} end of the paired 95% interval of delta_ppl ({METHOD})", decimals=2, signed=True,
    )  # fmt: skip
register_metric(
    "delta_ppl", "ΔPPL", "", "lower", "model", "ppl − ppl of the unquantized model on the same tokens",
    decimals=2, signed=True, interval=("delta_ppl_ci95_low", "delta_ppl_ci95_high"), per_token="nll",
)  # fmt: skip
register_metric(
    "ln_ppl_ratio", "ln(PPL ratio)", "nats", "lower", "model",
    "mean over the same tokens of NLL(quantized) − NLL(unquantized) = ln(PPL(Q)/PPL(base))",
    sig=3, signed=True, stderr="ln_ppl_ratio_se", per_token="nll",
)  # fmt: skip
register_metric(
    "ln_ppl_ratio_se", "ln(PPL ratio) SE", "nats", None, "model",
    f"paired standard error of ln_ppl_ratio ({METHOD})",
)  # fmt: skip
register_metric("bits_per_byte", "Bits/byte", "", "lower", "model",
                "total NLL in bits / UTF-8 bytes of the evaluated text", decimals=4)  # fmt: skip
register_metric("word_ppl", "Word PPL", "", "lower", "model",
                "exp(total NLL / whitespace-separated words)", decimals=2)  # fmt: skip
register_metric("tokens_scored", "Tokens", "", None, "model", "scored evaluation tokens", decimals=0)
# Agreement with the unquantized model, token by token
register_metric(
    "kld_mean", "KLD", "nats", "lower", "model",
    "mean over scored tokens of KL(unquantized ‖ quantized); with a top-k reference the head is exact "
    "and the tail is estimated without bias from tokens sampled ∝ p", stderr="kld_mean_se",
    per_token="kld",
)  # fmt: skip
register_metric(
    "reference_bytes_per_token", "Reference", "B/token", "lower", "model",
    "bytes per scored token of the cached base reference (eval.kld_reference, eval.kld_topk)", decimals=0,
)  # fmt: skip
register_metric("kld_mean_se", "KLD SE", "nats", None, "model", f"standard error of kld_mean ({METHOD})")
for _name, _label, _what in (
    ("kld_median", "KLD median", "median"),
    ("kld_p90", "KLD p90", "90th percentile"),
    ("kld_p99", "KLD p99", "99th percentile"),
    ("kld_p999", "KLD p99.9", "99.9th percentile"),
    ("kld_max", "KLD max", "maximum"),
):
    register_metric(_name, _label, "nats", "lower", "model", f"{_what} of the per-token KLD")
register_metric(
    "top1_agreement", "Top-1", "%", "higher", "model",
    "share of scored tokens where both models' most likely next token is the same (\"same top p\")",
    decimals=1, scale=100, stderr="top1_agreement_se", per_token="top1_match",
)  # fmt: skip
register_metric(
    "top1_agreement_se", "Top-1 SE", "%", None, "model", f"standard error of top1_agreement ({METHOD})",
    decimals=1, scale=100,
)  # fmt: skip
register_metric(
    "rms_delta_p", "RMS Δp", "%", "lower", "model",
    "root mean square over tokens of p_quantized(target) − p_unquantized(target), as llama.cpp reports it",
    decimals=2, scale=100,
)  # fmt: skip
# Zero-shot tasks through lm-eval: one family per score, each with lm-eval's standard error
for _score, _what in (("acc", "accuracy"), ("acc_norm", "accuracy with length-normalised scores")):
    register_metric(
        f"{_score}_{TASK}", f"{TASK} {_score}", "%", "higher", "model",
        f"lm-eval zero-shot {_what} of the task", decimals=1, scale=100, stderr=f"{_score}_{TASK}_stderr",
    )  # fmt: skip
    register_metric(
        f"{_score}_{TASK}_stderr", f"{TASK} {_score} SE", "%", None, "model",
        f"lm-eval's standard error of {_score}_{TASK}", decimals=1, scale=100,
    )  # fmt: skip
register_metric(
    f"ppl_{TASK}", f"{TASK} ppl", "", "lower", "model", "the task's perplexity as lm-eval scores it",
    decimals=2, stderr=f"ppl_{TASK}_stderr",
)  # fmt: skip
register_metric(
    f"ppl_{TASK}_stderr", f"{TASK} ppl SE", "", None, "model", "lm-eval's bootstrap standard error of that",
    decimals=2,
)  # fmt: skip
register_metric(
    "acc_avg", "Avg acc", "%", "higher", "model", "mean of the suite's primary zero-shot accuracies",
    decimals=1, scale=100, stderr="acc_avg_stderr",
)  # fmt: skip
register_metric(
    "acc_avg_stderr", "Avg acc SE", "%", None, "model", "sqrt(Σ se²) / n, the tasks taken as independent",
    decimals=1, scale=100,
)  # fmt: skip
# Weight shape and activation-weighted error (sensitivity proxies)
register_metric(
    "kurtosis", "Kurtosis", "", None, "numel_weighted",
    "Pearson kurtosis E[(w − μ)⁴] / σ⁴ of the pristine weight (3 for a Gaussian)", sig=3,
)  # fmt: skip
register_metric(
    "max_over_rms", "Max/RMS", "", None, "numel_weighted", "max |w| / RMS(w) of the pristine weight", sig=3
)
register_metric(
    "act_weighted_err", "Act.-weighted err.", "", "lower", "sum",
    "Σ_j E[x_j²]·‖W[:, j] − Ŵ[:, j]‖² on the calibration inputs (llama.cpp's importance-matrix weighting)",
)  # fmt: skip
# Sensitivity: one unit quantized alone, against the base on the evaluation tokens
register_metric(
    "delta_kld", "ΔKLD", "nats", "lower", "model",
    "KLD to the base with only the unit quantized, minus the base's own (≈ 0)", signed=True,
    stderr="delta_kld_se",
)  # fmt: skip
register_metric(
    "delta_kld_se", "ΔKLD SE", "nats", None, "model", f"paired standard error of delta_kld ({METHOD})"
)
register_metric(
    "delta_nll", "ΔNLL", "nats", "lower", "model", "mean NLL with the unit quantized minus the base's",
    signed=True, stderr="delta_nll_se",
)  # fmt: skip
register_metric(
    "delta_nll_se", "ΔNLL SE", "nats", None, "model", f"paired standard error of delta_nll ({METHOD})"
)
for _proxy, _label in (
    ("nmse", "weight nMSE"),
    ("output_rel_err", "output error"),
    ("kurtosis", "kurtosis"),
    ("max_over_rms", "max/RMS"),
    ("act_weighted_err", "activation-weighted error"),
):
    register_metric(
        f"spearman_{_proxy}", f"ρ({_label}, ΔKLD)", "", "higher", "model",
        f"Spearman rank correlation over the probed units of the {_label} with ΔKLD", decimals=3,
        scope="sweep",
    )  # fmt: skip
register_metric(
    "probes_per_min", "Probes/min", "1/min", "higher", "model",
    "sensitivity probes per minute of wall time (quantize one unit, evaluate, restore)", scope="sweep",
)  # fmt: skip
register_metric(
    "prefix_speedup", "Prefix speed-up", "×", "higher", "model",
    "time of a probe by full forward passes / by prefix-cached passes, on the same unit", scope="sweep",
)  # fmt: skip
# Allocation under a bit budget
register_metric(
    "budget_bits", "Budget", "bits/param", None, "model", "the bits/param an allocation may spend", decimals=3
)
register_metric(
    "predicted_delta_kld", "Predicted ΔKLD", "nats", "lower", "model",
    "Σ over layers of each layer's probed ΔKLD at its chosen quantization (additivity assumed)",
)  # fmt: skip
# Cost
register_metric(
    "time_quantize_s", "Quantize time", "s", "lower", "model", "quantizing every chosen layer", decimals=1
)
register_metric(
    "time_eval_s",
    "Eval time",
    "s",
    "lower",
    "model",
    "forward passes with their ppl/KLD reductions and lm-eval",
    decimals=1,
)
register_metric(
    "time_total_s", "Total time", "s", "lower", "model", "the whole config, quantize to restore", decimals=1
)
register_metric(
    "sweep_wall_s", "Sweep time", "s", "lower", "model", "wall time of the sweep", decimals=0, scope="sweep"
)
register_metric(
    "peak_rss_gb", "Peak RSS", "GB", "lower", "model", "the sweep process's peak resident memory (1e9 B)",
    decimals=2, scope="sweep",
)  # fmt: skip
register_metric(
    "eval_share",
    "Eval share",
    "%",
    "higher",
    "model",
    "share of the sweep's wall time spent evaluating",
    decimals=0,
    scale=100,
    scope="sweep",
)
register_metric(
    "floor_s", "FLOP floor", "s", None, "model",
    "the FLOPs of the sweep's finished evaluation passes (harness.floor) at the fastest torch.mm rate of "
    "their GEMM shapes in their model dtype, measured right after the sweep",
    decimals=0, scope="sweep",
)  # fmt: skip
register_metric(
    "floor_multiple", "× FLOP floor", "×", "lower", "model",
    "the sweep's wall time over its FLOP floor (floor_s): comparable across days of different machine speed",
    decimals=2, scope="sweep",
)  # fmt: skip
for _dtype in COMPUTE_DTYPES:
    register_metric(
        f"matmul_gflops_{_dtype}", f"torch.mm rate {_dtype}", "GFLOP/s", "higher", "model",
        f"the fastest torch.mm rate of the evaluation pass's GEMM shapes in {_dtype}, measured after a sweep",
        decimals=0, scope="sweep",
    )  # fmt: skip
