"""Every metric the harness logs, declared once (``registry.register_metric``), grouped by subject."""

from __future__ import annotations

from typing import Any

from harness.metrics.registry import TASK, register_metric
from harness.quant.quantize import COMPUTE_DTYPES
from harness.stats import METHOD

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


def _interval(of: str, label: str, unit: str = "", paired: bool = True, **display: Any) -> tuple[str, str]:
    """Declare the low and high ends of ``of``'s 95 % interval; their names, for ``of``'s declaration."""
    ends = (f"{of}_ci95_low", f"{of}_ci95_high")
    kind = "paired 95% interval" if paired else "95% interval"
    for name, end in zip(ends, ("low", "high"), strict=True):
        definition = f"{end} end of the {kind} of {of} ({METHOD})"
        register_metric(name, f"{label} 95% CI {end}", unit, None, "model", definition, **display)
    return ends


# Language modelling, on the evaluation tokens under the experiment's perplexity protocol. Every interval is
# a block bootstrap over the scored tokens in order (harness.stats.METHOD), paired where two models meet.
register_metric(
    "ppl", "PPL", "", "lower", "model", "exp(mean NLL) of the scored tokens under the named protocol",
    decimals=2, interval=_interval("ppl", "PPL", paired=False, decimals=2), per_token="nll",
)  # fmt: skip
register_metric(
    "delta_ppl", "ΔPPL", "", "lower", "model", "ppl − ppl of the unquantized model on the same tokens",
    decimals=2, signed=True, per_token="nll",
    interval=_interval("delta_ppl", "ΔPPL", decimals=2, signed=True),
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
register_metric(
    "eval_windows_per_forward", "Windows/forward", "", None, "model",
    "evaluation windows per forward pass: eval.batch_size, halved each time a pass ran out of memory",
    decimals=0,
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
# LoRA recovery: adapters trained on the quantized base (experiment section `recovery`), then evaluated again
# on the same tokens. The 16-bit LoRA target is the same recipe trained on the unquantized model.
register_metric(
    "lora_ppl", "PPL after LoRA", "", "lower", "model",
    "ppl of the quantized model with its trained adapters",
    decimals=2, per_token="lora_nll",
    interval=_interval("lora_ppl", "PPL after LoRA", paired=False, decimals=2),
)  # fmt: skip
register_metric(
    "lora16_ppl", "16-bit LoRA PPL", "", "lower", "model",
    "ppl of the unquantized model with adapters trained by the same recipe: what LoRA on the base reaches",
    decimals=2, per_token="lora16_nll",
)  # fmt: skip
register_metric(
    "lora_kld_mean", "KLD after LoRA", "nats", "lower", "model",
    "kld_mean of the quantized model with its adapters, against the unquantized model without any",
    stderr="lora_kld_mean_se", per_token="lora_kld",
)  # fmt: skip
register_metric(
    "lora_kld_mean_se",
    "KLD after LoRA SE",
    "nats",
    None,
    "model",
    f"standard error of lora_kld_mean ({METHOD})",
)
register_metric(
    "lora_top1_agreement", "Top-1 after LoRA", "%", "higher", "model",
    "top1_agreement of the quantized model with its adapters, against the unquantized model without any",
    decimals=1, scale=100, stderr="lora_top1_agreement_se", per_token="lora_top1_match",
)  # fmt: skip
register_metric(
    "lora_top1_agreement_se", "Top-1 after LoRA SE", "%", None, "model",
    f"standard error of lora_top1_agreement ({METHOD})", decimals=1, scale=100,
)  # fmt: skip
for _reference, _what in (("base", "the unquantized model"), ("lora16", "the 16-bit LoRA target")):
    register_metric(
        f"recovery_vs_{_reference}", f"Recovered vs {_reference}", "%", "higher", "model",
        f"(ΔPPL before − ΔPPL after) / ΔPPL before, each ΔPPL against {_what} on the same tokens: the share "
        "of the gap the adapters close",
        decimals=1, scale=100,
        interval=_interval(
            f"recovery_vs_{_reference}", f"Recovered vs {_reference}", "%", decimals=1, scale=100
        ),
    )  # fmt: skip
for _score in ("acc", "acc_norm"):
    register_metric(
        f"lora_{_score}_{TASK}", f"{TASK} {_score} after LoRA", "%", "higher", "model",
        f"{_score}_{TASK} of the quantized model with its adapters", decimals=1, scale=100,
        stderr=f"lora_{_score}_{TASK}_stderr",
    )  # fmt: skip
    register_metric(
        f"lora_{_score}_{TASK}_stderr", f"{TASK} {_score} after LoRA SE", "%", None, "model",
        f"lm-eval's standard error of lora_{_score}_{TASK}", decimals=1, scale=100,
    )  # fmt: skip
register_metric(
    "lora_train_loss", "Train loss", "nats", "lower", "model",
    "mean next-token loss of an optimizer step's rows (a step metric: one value per step; the last is shown)",
    sig=4,
)  # fmt: skip
register_metric(
    "lora_train_tokens", "Train tokens", "", None, "model", "tokens the adapters trained on", decimals=0
)
register_metric(
    "lora_params", "Adapter params", "", None, "model",
    "trainable adapter parameters (A and B of every target)",
    decimals=0,
)  # fmt: skip
register_metric(
    "lora_bits_per_param", "Adapter bits/param", "", "lower", "model",
    "the adapters' bits over the quantized layers' parameters: what they add to bits_per_param",
    decimals=3,
)  # fmt: skip
register_metric("time_lora_s", "LoRA time", "s", "lower", "model", "training the adapters", decimals=1)
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
    "time_quantize_s", "Quantize time", "s", "lower", "model",
    "quantizing every chosen layer, the method's fitting included", decimals=1,
)  # fmt: skip
register_metric(
    "fit_tokens", "Fit tokens", "", None, "model",
    "calibration positions the method fit on (GPTQ's Hessians, AWQ's search), none of the held-out ones "
    "the output error is measured on; 0 for round to nearest and HQQ", decimals=0,
)  # fmt: skip
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
