"""The physical floor of an evaluation pass: its FLOPs, counted from the model's shapes, at the torch.mm rate
this machine reaches on the pass's own GEMM shapes in the pass's dtype. The sweep's estimate and its closing
line, and ``benchmarks/eval.py``, state times as multiples of it."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness import gemm
from harness.evaluate.logits import ROWS_PER_PASS, VOCAB_SLICE
from harness.evaluate.windows import PerplexityProtocol, make_windows

GEMM_BATCH = 4  # windows per forward batch, the evaluation's default batch_size


@dataclass(frozen=True)
class PassCost:
    """What one evaluation pass of a model costs in arithmetic, and the GEMM shapes it is made of."""

    n_params: int
    body_flops: float  # every Linear but the head, and causal attention, over every window position
    head_flops: float  # the output head at the scored positions only
    shapes: dict[str, tuple[int, int, int]]  # label → (m, k, n) of the pass's typical torch.mm calls

    @property
    def flops(self) -> float:
        return self.body_flops + self.head_flops


def pass_cost(model: nn.Module, protocol: PerplexityProtocol, tokens: int) -> PassCost:
    """Multiply-adds × 2 of one pass over ``tokens`` under ``protocol``, from the module's shapes alone (a
    model on the meta device will do), with its GEMM shapes: an MLP projection of a batch of windows, and one
    tile of the head."""
    windows = make_windows(protocol, tokens)
    head = model.get_output_embeddings()
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )  # fmt: skip
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim  # QKᵀ and AV
    body = sum(2 * linear * w.length + attention * w.length * (w.length + 1) / 2 for w in windows)
    d_model = config.hidden_size
    d_ff = getattr(config, "intermediate_size", None) or 4 * d_model
    rows = GEMM_BATCH * protocol.context_length
    shapes = {f"{rows}x{d_model} @ {d_model}x{d_ff}": (rows, d_model, d_ff)}
    head_flops = 0.0
    if head is not None:  # an encoder has no output head
        head_flops = 2 * head.in_features * head.out_features * sum(w.n_scored for w in windows)
        shapes[f"{ROWS_PER_PASS}x{d_model} @ {d_model}x{VOCAB_SLICE}"] = (ROWS_PER_PASS, d_model, VOCAB_SLICE)
    n_params = sum(p.numel() for p in model.parameters())
    return PassCost(n_params, float(body), float(head_flops), shapes)


def matmul_rate(
    m: int = 1024,
    k: int = 1024,
    n: int = 1024,
    dtype: torch.dtype = torch.float32,
    runs: int = 5,
    device: str = "cpu",
) -> float:
    """FLOP/s of an (m × k) input through a Linear of k → n (x @ Wᵀ, the layout of every Linear and of the
    head's tiles) in ``dtype`` on ``device``, the way a model in that dtype runs it there (on a CPU:
    ``harness.gemm``), median of ``runs`` after a warm-up. Measuring leaves the process's products as they
    were."""
    x, weight = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    widened = device == "cpu" and not gemm.native(dtype)
    times = []
    with gemm.WidenedProducts(frozenset({dtype})) if widened else contextlib.nullcontext():
        F.linear(x, weight)
        for _ in range(runs):
            _synchronize(device)
            start = time.perf_counter()
            F.linear(x, weight)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def gemm_rates(cost: PassCost, dtype: torch.dtype, runs: int = 5, device: str = "cpu") -> dict[str, float]:
    """torch.mm FLOP/s in ``dtype`` on ``device`` on each of the pass's GEMM shapes."""
    shapes = cost.shapes.items()
    return {label: matmul_rate(*shape, dtype=dtype, runs=runs, device=device) for label, shape in shapes}


def floor_seconds(cost: PassCost, rates: dict[str, float]) -> float:
    """The pass's FLOPs at the fastest of ``rates``: no pass of these shapes can take less."""
    return cost.flops / max(rates.values())
