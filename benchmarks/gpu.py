"""One config on a CUDA device, against the peers: quantize time against bitsandbytes' ``quantize_4bit`` on
the same weights, evaluation tokens/s against a plain transformers loop (``benchmarks/eval.py``'s) and against
the FLOP floor at the device's measured bf16 torch.mm rate, and peak device memory. Prints one table.

Per model (the largest offline one by default; ``--models`` takes asset names, directories or hub ids):
``ModelSession.prepare`` in bf16 on the device (load, tokens, calibration inputs, the top-k base reference),
then ``measure`` of nf4 block 64 against that reference (``time_quantize_s``, ``time_eval_s``), then, on the
restored model, every quantized layer's weight through our ``quantize`` and bnb's, and the plain loop over
the same tokens and windows. Medians of ``--runs``; ratios within one run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/gpu.py [--device cuda] [--models ...] [--tokens 4096]

Written to finish within 8 minutes on one GPU for the 1.5B model; ``--device cpu`` runs the same steps on the
CPU (bnb's CPU kernels), which is how it is checked without a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from eval import plain_loop  # benchmarks/eval.py: the obvious transformers loop

from harness.experiments import load_experiment
from harness.floor import floor_seconds, gemm_rates, pass_cost
from harness.measure import measure
from harness.quant.quantize import QuantConfig, quantize
from harness.session import ModelSession

OVERRIDES = ["grid.format=[nf4]", "grid.block_size=[64]", "grid.double_quant=[off]"]


def timed(fn: Callable[[], object], device: str, runs: int) -> float:
    """Median seconds of ``fn`` over ``runs``, the device synchronised around each."""
    times = []
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    with open("/proc/self/status") as status:  # the host's high-water mark
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM")) / 1e9


def bench(model: str, device: str, tokens: int, runs: int) -> dict[str, float]:
    import bitsandbytes.functional as bnb

    experiment = load_experiment("default", [f"model={model}", f"eval.tokens={tokens}", f"device={device}"])
    config = experiment.resolved_configs({model: "bfloat16"})[0]
    start = time.perf_counter()
    session = ModelSession.prepare(config)
    prepare_s = time.perf_counter() - start
    metrics = measure(session, config).metrics
    weights = [session.loaded.model.get_submodule(info.name).weight for info in session.pristine.layers]
    nf4 = QuantConfig("nf4", 64)
    ours = timed(lambda: [quantize(w, nf4) for w in weights], device, runs)
    peer = timed(
        lambda: [bnb.quantize_4bit(w, blocksize=64, quant_type="nf4") for w in weights], device, runs
    )
    stream, protocol = session.evaluation.to(device), session.protocol
    plain = timed(lambda: plain_loop(session.loaded.model, stream, protocol, session.bos_token_id), device, 1)
    cost = pass_cost(session.loaded.model, protocol, tokens)
    floor = floor_seconds(cost, gemm_rates(cost, torch.bfloat16, device=device))
    scored = metrics["tokens_scored"]
    return {
        "prepare_s": prepare_s,
        "quantize_s": ours,
        "bnb_s": peer,
        "eval_tok_s": scored / metrics["time_eval_s"],
        "plain_tok_s": scored / plain,
        "eval_floor": metrics["time_eval_s"] / floor,
        "rate": cost.flops / floor / 1e12,
        "peak_gb": peak_gb(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{name}, bf16, {args.tokens:,} tokens, nf4 block 64, medians of {args.runs}")
    print(
        f"{'model':<22}{'prepare s':>10}{'quant s':>9}{'bnb s':>8}{'ours/bnb':>9}{'eval tok/s':>11}"
        f"{'plain tok/s':>12}{'ours/plain':>11}{'eval/floor':>11}{'TFLOP/s':>8}{'peak GB':>8}"
    )
    for model in args.models:
        r = bench(model, args.device, args.tokens, args.runs)
        print(
            f"{model:<22}{r['prepare_s']:>10.1f}{r['quantize_s']:>9.3f}{r['bnb_s']:>8.3f}"
            f"{r['quantize_s'] / r['bnb_s']:>9.2f}{r['eval_tok_s']:>11.0f}{r['plain_tok_s']:>12.0f}"
            f"{r['eval_tok_s'] / r['plain_tok_s']:>11.2f}{r['eval_floor']:>11.2f}{r['rate']:>8.1f}"
            f"{r['peak_gb']:>8.2f}"
        )


if __name__ == "__main__":
    main()
