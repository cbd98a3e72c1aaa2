"""Sensitivity probes per minute with and without prefix caching, on the offline models.

For each model: the sensitivity experiment's session (its evaluation tokens), a prefix cache, then the same
per-layer probes (one layer from each of a few blocks spread over the depth, at the experiment's first probe
format) timed both ways: prefix-cached (blocks b.. and the head) and full forward passes. Each probe is timed
``--repeats`` times and the median taken. The logits of both ways are compared once per probe.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sensitivity.py [--models gemma-3-270m smollm2-135m]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from harness.experiments import load_experiment
from harness.models import quantized
from harness.sensitivity import Prober, choice_config, probe

EXPERIMENTS = {"gemma-3-270m": "sensitivity-gemma", "smollm2-135m": "sensitivity-smollm2"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--layers", type=int, default=6, help="layers probed, spread over the blocks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for model in args.models:
        experiment = load_experiment(EXPERIMENTS[model])
        prober = Prober(experiment, model, progress=False)
        config = choice_config(experiment.sensitivity.probes[0], prober.config)
        units = prober.units(["layer"])
        picked = [units[round(i * (len(units) - 1) / (args.layers - 1))] for i in range(args.layers)]
        timings: dict[bool, list[float]] = {True: [], False: []}
        worst = 0.0
        for unit in picked:
            for prefix in (True, False):
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    probe(prober.cache, prober.base, unit, config, prefix)
                    seconds.append(time.perf_counter() - start)
                timings[prefix].append(statistics.median(seconds))
            plan = {name: config for name in unit.layers}
            with quantized(prober.session.pristine, config, plan=plan), torch.inference_mode():
                cached = torch.cat([lg for lg, _ in prober.cache.chunks(unit.first_block)])
                full = torch.cat([lg for lg, _ in prober.cache.chunks(None)])
            worst = max(worst, float((cached - full).abs().max()))
        prober.close()
        with_cache, without = sum(timings[True]), sum(timings[False])
        print(
            f"{model}: {len(picked)} layers (blocks {[u.first_block for u in picked]}), "
            f"{prober.cache.reference.n_tokens} scored tokens, median of {args.repeats}: "
            f"{60 * len(picked) / with_cache:.1f} probes/min with prefix caching, "
            f"{60 * len(picked) / without:.1f} without, speed-up {without / with_cache:.2f}x; "
            f"prefix cache {prober.cache.nbytes / 2**20:.0f} MiB; max |Δlogit| cached vs full {worst:.2e}"
        )


if __name__ == "__main__":
    main()
