"""How many evaluation tokens an experiment needs: which paired differences its runs resolve at each budget.

Reads a finished sweep from the store (the default experiment unless told otherwise) and, from each run's
per-token results, recomputes the paired tests on the first N scored tokens for several N: every pair of
data types at each block size and double-quantization setting, and each step to the next smaller block size
of one data type, on mean NLL (perplexity) and on mean KLD. No model runs.

    python benchmarks/budget.py [default] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import itertools

import pandas as pd

from harness.report import select_runs
from harness.stats import paired_difference
from harness.tracking import TOKENS_ARTIFACT, Tracker, read_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="default")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()
    tracker = Tracker(args.tracking_uri)
    (runs,) = select_runs(tracker.runs(args.experiment), args.experiment, tracker.uri)
    frame = runs.quantized
    tokens = {
        str(row["params.label"]): read_tokens(tracker.download_artifact(str(row["run_id"]), TOKENS_ARTIFACT))
        for _, row in frame.iterrows()
    }
    total = min(len(t["nll"]) for t in tokens.values())
    budgets = [n for n in (512, 1024, 2048, 4096, 8192, 16384, 32768) if n < total] + [total]
    pairs = _pairs(frame)
    print(f"{args.experiment} on {runs.model}: {len(pairs)} comparisons; resolved = 95% interval excludes 0")
    print(f"| comparison | {' | '.join(f'{n:,} tok NLL / KLD' for n in budgets)} |")
    print(f"|:--|{'--:|' * len(budgets)}")
    unresolved = dict.fromkeys(budgets, 0)
    for first, second in pairs:
        cells = []
        for n in budgets:
            verdicts = []
            for key in ("nll", "kld"):
                d = paired_difference(tokens[first][key][:n], tokens[second][key][:n])
                verdicts.append(f"{d.mean:+.3f}{'' if d.resolved else '?'}")
                unresolved[n] += key == "kld" and not d.resolved
            cells.append(" / ".join(verdicts))
        print(f"| {first} − {second} | {' | '.join(cells)} |")
    left = ", ".join(f"{n:,} tokens: {k}" for n, k in unresolved.items())
    print(f"\n?: not resolved. Comparisons left unresolved on KLD at {left}")


def _pairs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Data types against each other at one block size and DQ setting; each block step of one variant."""
    out = []
    for _, group in frame.groupby(["params.block_size", "params.double_quant"], sort=False):
        out += list(itertools.combinations(list(group["params.label"]), 2))
    for _, group in frame.groupby("params.variant", sort=False):
        ordered = group.sort_values("params.block_size", key=lambda sizes: sizes.astype(float))
        labels = list(ordered["params.label"])
        out += list(itertools.pairwise(labels))
    return out


if __name__ == "__main__":
    main()
