"""What each quantization method costs on a real model, and GPTQ against its floor.

On the ``methods`` experiment's model and calibration (gemma-3-270m in bf16, 16 × 512 calibration tokens), for
nf4 at block 64 and each method: the time to quantize all the model's block Linears (``apply`` with the
method's layer quantizer, the same path a sweep takes), per model and per layer, and each layer's output error
on the held-out calibration positions (parameter-weighted mean). Beside them:

- GPTQ's floor: one forward of the blocks over the calibration tokens (GPTQ runs each block twice, once to
  collect its inputs and once, quantized, to feed the next) plus, per layer, the O(n³) Cholesky work on its
  Hessian (a factorisation, an inverse from it and a second factorisation), timed alone; the ratio of GPTQ's
  time to that floor (the goal: at most 3).
- The hqq package's own ``HQQLinear`` on one layer against our ``hqq`` on the same layer (int4_asym, b64).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/methods.py [--experiment methods] [--format nf4]

Medians of ``--runs`` for the per-layer timings; the model-level times are one run each (they take tens of
seconds). Compare ratios taken in one run: the machine's speed varies from day to day.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import argparse
import statistics
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import torch

from harness.experiments import load_experiment
from harness.floor import matmul_rate
from harness.measure import layer_quantizer
from harness.methods import gptq
from harness.metrics import aggregate
from harness.models import layer_table, quantized
from harness.quant.quantize import COMPUTE_DTYPES, QuantConfig
from harness.session import ModelSession


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="methods")
    parser.add_argument("--format", default="nf4")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    experiment = load_experiment(args.experiment, ["eval.kld=false"])
    template = next(c for c in experiment.configs if c.method == "rtn")
    config = template.resolved("bfloat16")
    rate = matmul_rate(2048, 640, 2048, torch.bfloat16)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"bf16 torch.mm {rate / 1e9:.0f} GFLOP/s (2048×640 @ 640×2048)"
    )
    session = ModelSession.prepare(config)
    model, ids = session.loaded.model, session.calibration_ids
    layers = session.pristine.layers
    print(f"{config.model}: {len(layers)} Linears, calibration {tuple(ids.shape)} tokens")
    quant = QuantConfig(args.format, args.block_size)
    dtype = COMPUTE_DTYPES[str(config.compute_dtype)]

    factorised: Counter[int] = Counter()  # widths of the Hessians GPTQ factorises (siblings share one)
    factorise = gptq.factorise

    def counted(hessian: torch.Tensor, **settings: Any) -> gptq.Factor:
        factorised[hessian.shape[0]] += 1
        return factorise(hessian, **settings)

    gptq.factorise = counted
    rows = []
    for method in ("rtn", "gptq", "hqq", "awq"):
        chosen = replace(config, method=method, format=args.format, block_size=args.block_size)
        start = time.perf_counter()
        quantizer = layer_quantizer(session, chosen)  # AWQ's inputs are captured here, once
        with quantized(
            session.pristine, quant, dtype, session.calibration, quiet=True, quantizer=quantizer
        ) as r:
            seconds = time.perf_counter() - start
            error = aggregate(layer_table(r))["output_rel_err"]
        rows.append((method, seconds, error))

    body = getattr(model, model.base_model_prefix)  # the blocks without the output head
    start = time.perf_counter()
    for chunk in ids.split(8):  # the chunks GPTQ's sequential pass runs
        body(input_ids=chunk, use_cache=False)
    forward = time.perf_counter() - start
    cholesky = shared = 0.0
    for width in sorted({info.shape[1] for info in layers}):
        h = torch.randn(width, width, dtype=torch.float64)
        h = (h @ h.T / width + torch.eye(width, dtype=torch.float64)).float()
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
            times.append(time.perf_counter() - t)
        cholesky += statistics.median(times) * sum(1 for info in layers if info.shape[1] == width)
        shared += statistics.median(times) * factorised[width]
    floor = forward + cholesky

    print(f"\n| method | quantize all {len(layers)} layers (s) | per layer (ms) | output error (held out) |")
    print("|---|--:|--:|--:|")
    for method, seconds, error in rows:
        print(f"| {method} | {seconds:.1f} | {seconds / len(layers) * 1e3:.0f} | {error:.4f} |")
    took = next(s for m, s, _ in rows if m == "gptq")
    print(
        f"\nGPTQ floor: blocks forward over the calibration tokens {forward:.1f} s + Cholesky work per layer "
        f"{cholesky:.1f} s = {floor:.1f} s; GPTQ took {took:.1f} s = {took / floor:.2f}x the floor. With the "
        f"Cholesky work of the {sum(factorised.values())} Hessians GPTQ factorised (layers fed the same "
        f"input share one) instead, {shared:.1f} s: {took / (forward + shared):.2f}x"
    )
    _hqq_package(session, args.runs)


def _hqq_package(session: ModelSession, runs: int) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from harness.methods import hqq

    info = max(session.pristine.layers, key=lambda i: i.numel)
    weight = session.pristine.weights[info.name].detach()
    ours, theirs = [], []
    for _ in range(runs):
        t = time.perf_counter()
        mine = hqq.quantize_layer(weight, QuantConfig("int4_asym", 64)).weight()
        ours.append(time.perf_counter() - t)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        t = time.perf_counter()
        config = BaseQuantizeConfig(nbits=4, group_size=64, axis=1)
        package = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
        theirs.append(time.perf_counter() - t)
    difference = float((mine - package.dequantize()).norm() / package.dequantize().norm())
    print(
        f"\nHQQ on {info.name} {info.shape} (int4_asym, b64): ours {statistics.median(ours) * 1e3:.0f} ms, "
        f"the hqq package's HQQLinear {statistics.median(theirs) * 1e3:.0f} ms "
        f"({statistics.median(theirs) / statistics.median(ours):.2f}x ours); relative difference of the "
        f"reconstructions {difference:.1e}"
    )


if __name__ == "__main__":
    main()
