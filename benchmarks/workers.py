"""Ray workers on this machine: 1 worker × all cores' threads against N workers × 1 thread (and the local
executor), on one experiment; each layout sweeps into a fresh sqlite store, so every config runs.

Wall time is the whole command (Ray's start and stop included) and the sweep's own ``sweep_wall_s``; the
median of ``--repeats`` runs. Also says whether the layouts' metrics agree bit for bit.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/workers.py smoke [--limit N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from harness.tracking import Tracker


def sweep(experiment: str, layout: list[str], limit: int | None, folder: Path) -> tuple[float, pd.DataFrame]:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    command = [sys.executable, "-m", "harness.cli", "sweep", experiment, "--tracking-uri", uri, *layout]
    command += ["--limit", str(limit)] if limit else []
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, Tracker(uri).runs(experiment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--limit", type=int, help="the first N configs (plus the baseline)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    layouts = {
        f"local, {cores} threads": [],
        f"ray 1 worker × {cores} threads": ["--executor", "ray", "--workers", "1"],
        f"ray {cores} workers × 1 thread": ["--executor", "ray", "--workers", str(cores)],
    }
    results: dict[str, tuple[list[float], list[float]]] = {}
    metrics: dict[str, pd.DataFrame] = {}
    per_config: dict[str, pd.DataFrame] = {}  # time per config and the driver's peak RSS
    for _ in range(args.repeats):
        for name, layout in layouts.items():
            with tempfile.TemporaryDirectory() as folder:
                wall, frame = sweep(args.experiment, layout, args.limit, Path(folder))
            parent = frame[frame["tags.harness.kind"] == "sweep"]
            results.setdefault(name, ([], []))[0].append(wall)
            results[name][1].append(float(parent["metrics.sweep_wall_s"].item()))
            child = frame[frame["tags.harness.kind"] == "config"].set_index("tags.harness.config_hash")
            metrics[name] = child[sorted(c for c in child if c.startswith("metrics.") and "time_" not in c)]
            quantized = child[child["tags.harness.baseline"] == "false"]
            per_config[name] = quantized[[f"metrics.time_{t}_s" for t in ("quantize", "eval", "total")]]
            per_config[name] = per_config[name].assign(peak_rss_gb=parent["metrics.peak_rss_gb"].item())
    n_configs = len(next(iter(metrics.values())))
    print(f"{args.experiment}: {n_configs} configs, median of {args.repeats} ({cores} cores)")
    print("| layout | command wall s | sweep wall s | runs (command s) |\n|:--|--:|--:|:--|")
    for name, (walls, sweeps) in results.items():
        runs = ", ".join(f"{w:.1f}" for w in walls)
        print(f"| {name} | {statistics.median(walls):.1f} | {statistics.median(sweeps):.1f} | {runs} |")
    one, many = (statistics.median(results[n][0]) for n in list(layouts)[1:])
    print(
        f"ratio (1 worker × {cores} threads) / ({cores} workers × 1 thread), command wall: {one / many:.2f}"
    )
    print("median per config (s), quantized configs only; the driver's peak RSS (GB):")
    for name, frame in per_config.items():
        medians = frame.median()
        print(f"  {name}: " + ", ".join(f"{k.removeprefix('metrics.')} {v:.2f}" for k, v in medians.items()))
    first, *others = metrics
    for name in others:
        differing = [
            c
            for c in metrics[first]
            if not metrics[first][c].sort_index().equals(metrics[name][c].sort_index())
        ]
        verdict = "identical" if not differing else "differ in " + ", ".join(differing)
        print(f"metrics of {name} against {first}: {verdict}")


if __name__ == "__main__":
    main()
