"""Model loading and apply/restore cost on the real GGUF assets, and NF4's per-layer error on Gemma 3.

For each model, two fresh subprocesses (so that every peak RSS is clean) load the GGUF through
``harness.models.load_model`` against an empty cache: the first converts it (cold), the second loads the
safetensors conversion it left (warm). The warm one runs one forward (the safetensors are memory-mapped, so
this pages the weights in), then applies nf4 b64 with a bf16 compute dtype to every block Linear and
restores, with the kernel's RSS high-water mark reset in between, and compares that peak with the fp32 size
of the model. For gemma-3-270m it also prints NF4's nMSE and output error per layer.

Run: ``OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/load.py`` (about 3 minutes on 2 cores; the
assets must be fetched). Peaks come from /proc/self/status VmHWM (Linux), current RSS from psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("gemma-3-270m", "smollm2-135m")
MIB = 2**20
TEXT = (
    "The committee met on Tuesday to review the budget. After a long discussion about roads, schools and the "
    "new library, the members agreed to postpone the vote until the auditors had finished their report. "
)


def _peak_rss() -> int:
    """The process's RSS high-water mark in bytes (VmHWM), which psutil does not expose."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def worker(gguf: str, measure_apply: bool, table: bool) -> dict[str, Any]:
    """One load in this (fresh) process; with ``measure_apply``, also nf4 b64 apply + restore."""
    import psutil

    process = psutil.Process()
    start = time.perf_counter()
    import torch

    from harness.metrics import aggregate
    from harness.models import (
        capture_inputs,
        discover_layers,
        layer_table,
        load_model,
        load_tokenizer,
        quantized,
    )
    from harness.models import snapshot as take_snapshot
    from harness.quant.quantize import QuantConfig

    out: dict[str, Any] = {
        "import_s": time.perf_counter() - start,
        "rss_before_load": process.memory_info().rss,
    }
    start = time.perf_counter()
    loaded = load_model(gguf)
    out["load_s"] = time.perf_counter() - start
    out["peak_load"] = _peak_rss()
    tokenizer = load_tokenizer(gguf)
    # The safetensors are memory-mapped: weights become resident when first read, so run one forward.
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([tokenizer(TEXT)["input_ids"][:16]]))
    out["rss_loaded"] = process.memory_info().rss
    params = {id(p): p for p in loaded.model.parameters()}.values()
    out["fp32_bytes"] = sum(p.numel() * 4 for p in params)
    if not measure_apply:
        return out

    layers = discover_layers(loaded)
    inputs = {}
    if table:
        ids = torch.tensor([tokenizer(TEXT * 4)["input_ids"][:256]])
        inputs = capture_inputs(loaded.model, layers, ids)
        out["tokens"] = ids.shape[1]
    _reset_peak_rss()
    pristine = take_snapshot(loaded.model, layers)
    start = time.perf_counter()
    with quantized(pristine, QuantConfig("nf4", 64), torch.bfloat16, inputs=inputs, quiet=True) as result:
        out["apply_s"] = time.perf_counter() - start
        out["rss_applied"] = process.memory_info().rss
    out["peak_apply"] = _peak_rss()
    out["layers"] = len(layers)
    out["linear_params"] = sum(info.numel for info in layers)
    if table:
        frame = layer_table(result)
        out["aggregate"] = aggregate(frame)
        out["warned"] = int(frame["warning"].sum())
        out["table"] = frame.drop(columns=["mse", "max_abs", "stored_bytes"]).to_dict(orient="list")
    return out


def _run_worker(gguf: Path, cache: Path, *flags: str) -> dict[str, Any]:
    env = {**os.environ, "HARNESS_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(gguf), *flags], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"worker failed for {gguf.name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / MIB:7.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--apply", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.apply, args.table)))
        return

    from harness import assets

    tables = {}
    for name in args.models:
        gguf = assets.ensure(name)
        with tempfile.TemporaryDirectory(prefix="harness-load-bench-") as cache:
            cold = _run_worker(gguf, Path(cache))
            warm = _run_worker(gguf, Path(cache), "--apply", *(["--table"] if name == "gemma-3-270m" else []))
        size = warm["fp32_bytes"]
        print(f"\n== {name}: {gguf.name} ({gguf.stat().st_size / MIB:.0f} MiB), fp32 model {_mib(size)}")
        print(
            f"  import harness.models + transformers   {cold['import_s']:6.1f} s   "
            f"RSS {_mib(cold['rss_before_load'])} before loading"
        )
        for label, r in (("GGUF, cold (converts)", cold), ("safetensors cache", warm)):
            print(
                f"  load {label:<22} {r['load_s']:6.1f} s   peak RSS {_mib(r['peak_load'])} "
                f"({r['peak_load'] / size:.2f}x fp32)   RSS after a forward {_mib(r['rss_loaded'])}"
            )
        print(
            f"  apply nf4 b64 (bf16 compute) to {warm['layers']} layers "
            f"({warm['linear_params'] / 1e6:.1f}M params): {warm['apply_s']:.1f} s\n"
            f"    RSS applied {_mib(warm['rss_applied'])}; peak apply+restore {_mib(warm['peak_apply'])} "
            f"= {warm['peak_apply'] / size:.2f}x fp32 "
            f"({(warm['peak_apply'] - warm['rss_before_load']) / size:.2f}x above the pre-load RSS)"
        )
        if "table" in warm:
            tables[name] = warm
    for name, warm in tables.items():
        import pandas as pd

        frame = pd.DataFrame(warm["table"])
        agg = warm["aggregate"]
        print(f"\n== {name}: nf4 b64 per layer (output error on {warm['tokens']} tokens of prose)")
        print(
            f"  aggregate: nMSE {agg['nmse']:.5f} (numel-weighted), max {agg['nmse_max']:.5f}; "
            f"output rel err {agg['output_rel_err']:.4f}; {agg['bits_per_param']:.3f} bits/param; "
            f"{warm['warned']} layers from sources at or below 4 bits"
        )
        by_source = frame.groupby("source_precision").apply(
            lambda g: pd.Series(
                {
                    "layers": len(g),
                    "nmse": (g.nmse * g.numel).sum() / g.numel.sum(),
                    "output_rel_err": (g.output_rel_err * g.numel).sum() / g.numel.sum(),
                }
            ),
            include_groups=False,
        )
        print("  by source precision (numel-weighted):\n" + _indent(by_source.to_string(float_format="%.5f")))
        by_kind = frame.assign(kind=frame.layer.str.rsplit(".", n=1).str[-1]).groupby("kind")
        print("  by projection (mean nMSE):\n" + _indent(by_kind.nmse.mean().to_string(float_format="%.5f")))
        shown = frame.sort_values("nmse").iloc[[0, 1, len(frame) // 2, -2, -1]]
        columns = ["layer", "shape", "source_precision", "nmse", "sqnr_db", "cosine", "output_rel_err"]
        print(
            "  best, median, worst layers:\n"
            + _indent(shown[columns].to_string(index=False, float_format="%.5f"))
        )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


if __name__ == "__main__":
    main()
