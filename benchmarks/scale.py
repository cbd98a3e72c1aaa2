"""How the cost of a config grows with the model: load time, seconds per config, evaluation against its FLOP
floor, peak resident memory against the model's bytes, and the base reference's bytes per token.

Each model runs in a fresh subprocess (so that each peak RSS is its own) with the default experiment's corpus,
protocol and context, ``--tokens`` evaluation tokens and the model in its checkpoint's dtype (bf16):

1. ``load_model`` against a warm conversion cache (the GGUF converted once beforehand), timed;
2. ``ModelSession.prepare`` (load again, tokens, calibration inputs, the base reference: built or cached);
3. ``measure`` of nf4 block 64: quantize, evaluate against the reference, restore (``time_total_s``).

The floor of the evaluation is the pass's FLOPs (``harness.floor.pass_cost``) at the fastest torch.mm rate of
its GEMM shapes in bf16, measured in the same subprocess after the config. The last rows fit each column as
``a · params^b`` (least squares on the logs) and print the exponent b.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/scale.py`` (the assets fetched and converted: the
first load of a GGUF converts it, which the script does before timing). About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

MODELS = ("smollm2-135m", "gemma-3-270m", "qwen2.5-coder-1.5b")
COLUMNS = ("load_s", "config_s", "eval_floor_multiple", "peak_rss_over_model", "reference_bytes_per_token")

CHILD = r"""
import json, os, sys, time
import torch
from harness.experiments import load_experiment
from harness.floor import floor_seconds, gemm_rates, pass_cost
from harness.measure import measure
from harness.models import load_model
from harness.session import ModelSession

model, tokens = sys.argv[1], int(sys.argv[2])
overrides = [f"model={model}", f"eval.tokens={tokens}", "grid.format=[nf4]", "grid.block_size=[64]",
             "grid.double_quant=[off]"]
experiment = load_experiment("default", overrides)
config = experiment.resolved_configs({model: "bfloat16"})[0]
load_model(model, torch.bfloat16)  # converts a GGUF on first use: not timed
start = time.perf_counter()
loaded = load_model(model, torch.bfloat16)
load_s = time.perf_counter() - start
params = sum(p.numel() for p in loaded.model.parameters())
model_bytes = sum(p.nbytes for p in loaded.model.parameters())
del loaded
session = ModelSession.prepare(config)
measured = measure(session, config).metrics
cost = pass_cost(session.loaded.model, session.protocol, tokens)
rates = gemm_rates(cost, torch.bfloat16)
floor = floor_seconds(cost, rates)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
print(json.dumps({
    "model": model, "params": params, "model_bytes": model_bytes, "load_s": load_s,
    "config_s": measured["time_total_s"], "eval_s": measured["time_eval_s"], "floor_s": floor,
    "eval_floor_multiple": measured["time_eval_s"] / floor, "peak_rss_gb": peak / 1e9,
    "peak_rss_over_model": peak / model_bytes,
    "reference_bytes_per_token": measured["reference_bytes_per_token"],
    "bf16_gflops": max(rates.values()) / 1e9,
}))
"""


def run(model: str, tokens: int) -> dict[str, float | str]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(tokens)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"{model}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = [run(model, args.tokens) for model in args.models]
    header = f"{'model':<22}{'params':>8}{'load s':>8}{'s/config':>10}{'eval/floor':>11}"
    header += f"{'peak GB':>9}{'peak/model':>11}{'ref B/tok':>10}{'bf16 GFLOP/s':>13}"
    print(f"bf16, {args.tokens:,} evaluation tokens, nf4 block 64; one subprocess per model")
    print(header)
    for r in rows:
        print(
            f"{r['model']:<22}{float(r['params']) / 1e9:>7.2f}B{r['load_s']:>8.1f}{r['config_s']:>10.1f}"
            f"{r['eval_floor_multiple']:>11.2f}{r['peak_rss_gb']:>9.2f}{r['peak_rss_over_model']:>11.2f}"
            f"{r['reference_bytes_per_token']:>10.0f}{r['bf16_gflops']:>13.0f}"
        )
    if len(rows) > 2:
        logp = np.log([float(r["params"]) for r in rows])
        fits = {c: np.polyfit(logp, np.log([float(r[c]) for r in rows]), 1)[0] for c in COLUMNS}
        print(
            "growth with parameters, b in a·params^b: " + ", ".join(f"{c} {b:+.2f}" for c, b in fits.items())
        )


if __name__ == "__main__":
    main()
