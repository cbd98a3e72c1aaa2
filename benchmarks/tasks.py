"""Speed of the zero-shot tasks on a real model (CPU).

Side by side in one process, on the same model, task and documents: requests/s of ``harness.evaluate.tasks.
run_tasks`` against plain lm-eval (``lm_eval.simple_evaluate`` with ``HFLM(pretrained=model, tokenizer=tok,
batch_size=B)``, the stock task with the same local documents, since the hub is not reachable), run
alternately, medians of ``--runs`` runs and the median of the per-run ratios; the two must give the same
scores. ``--suite LIMIT`` then runs each task of a suite (``--tasks``, default zeroshot) at that per-task
limit: its primary score ± stderr, its time, and its full size's time (no limit) projected from its measured
requests/s (the first LIMIT documents standing in for all); ``--formats none nf4 int4`` runs the suite
unquantized and then with every transformer-block Linear fake-quantized to each format at ``--block-size``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/tasks.py [--model gemma-3-270m] [--task hellaswag] [--limit 40]
        [--batch-size 8] [--runs 3] [--skip-side-by-side] [--suite 100] [--tasks zeroshot sciq]
        [--formats none nf4 int4] [--block-size 64]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_MULTIPROC", "1")  # plain lm-eval bootstraps in process, as run_tasks does

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from harness.evaluate.tasks import (
    BOOTSTRAP_ITERS,
    PRIMARY,
    expand_tasks,
    primary_average,
    run_tasks,
    task_manager,
)
from harness.models import load_model, load_tokenizer


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def n_requests(names: tuple[str, ...], limit: int | None) -> int:
    """Loglikelihood requests the tasks send for ``limit`` documents each (one per choice per document)."""
    total = 0
    for task in task_manager().load(list(names))["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=limit)
        total += len(task.instances)
    return total


def side_by_side(model: Any, tokenizer: Any, task: str, limit: int, batch_size: int, runs: int) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    def ours() -> dict[str, float]:
        return run_tasks(model, tokenizer, [task], limit=limit, batch_size=batch_size)[task]

    def plain() -> dict[str, float]:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=task_manager(),
            limit=limit,
            num_fewshot=0,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
        return {"acc": out["results"][task]["acc,none"]}

    requests = n_requests((task,), limit)
    ours()  # warm-up: datasets, tokenizer and thread pool
    times_ours, times_plain = [], []
    for _ in range(runs):
        t_ours, got = timed(ours)
        t_plain, want = timed(plain)
        times_ours.append(t_ours)
        times_plain.append(t_plain)
        if abs(got["acc"] - want["acc"]) > 1e-9:
            raise SystemExit(f"scores differ: run_tasks acc {got['acc']}, plain lm-eval acc {want['acc']}")
    ratio = statistics.median(p / o for o, p in zip(times_ours, times_plain, strict=True))
    ours_s, plain_s = statistics.median(times_ours), statistics.median(times_plain)
    print(f"{task}, limit {limit}: {requests} requests, batch size {batch_size}, {runs} runs")
    print(f"  both score acc {got['acc']:.4f}")
    print(f"  run_tasks        {ours_s:7.2f} s  {requests / ours_s:7.1f} requests/s")
    print(f"  plain lm-eval    {plain_s:7.2f} s  {requests / plain_s:7.1f} requests/s")
    print(f"  speed-up (median of per-run plain/ours): {ratio:.2f}x")


def suite(model: Any, tokenizer: Any, names: tuple[str, ...], limit: int, batch_size: int) -> None:
    """Each task's scores ± stderr (* marks the primary one), time, requests/s and time without a limit."""
    print(f"  {'task':<15}{'docs':>5}{'acc':>14}{'acc_norm':>14}{'ppl':>13}{'s':>6}{'req/s':>7}{'full s':>8}")
    measured = projected = 0.0
    results = {}
    for task in names:
        seconds, out = timed(
            lambda t=task: run_tasks(model, tokenizer, [t], limit=limit, batch_size=batch_size)
        )
        scores = results[task] = out[task]
        rate = n_requests((task,), limit) / seconds
        full = n_requests((task,), None) / rate
        measured, projected = measured + seconds, projected + full
        acc, norm = (_score(scores, name, PRIMARY[task]) for name in ("acc", "acc_norm"))
        ppl = f"{scores['ppl']:.1f} ± {scores['ppl_stderr']:.1f}" if "ppl" in scores else ""
        timing = f"{seconds:>6.0f}{rate:>7.1f}{full:>8.0f}"
        print(f"  {task:<15}{scores['n']:>5.0f}{acc:>14}{norm:>14}{ppl:>13}{timing}")
    average = primary_average(results)
    print(f"  {'average':<15}{len(names):>5}{_score(average, 'acc', 'acc'):>14}")
    print(f"  total: {measured:.0f} s measured; without a limit {projected:.0f} s = {projected / 3600:.1f} h")


def _score(scores: dict[str, float], name: str, primary: str) -> str:
    if name not in scores:
        return ""
    mark = "*" if name == primary else " "
    return f"{100 * scores[name]:.1f} ± {100 * scores[f'{name}_stderr']:.1f}{mark}"


def quantized_suites(loaded: Any, tokenizer: Any, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """The suite with every transformer-block Linear fake-quantized to each format ("none": unquantized)."""
    from harness.models import discover_layers, quantized, snapshot
    from harness.quant.quantize import QuantConfig

    print(f"suite {', '.join(names)}: limit {args.suite} per task, batch size {args.batch_size}")
    pristine = snapshot(loaded.model, discover_layers(loaded))
    for fmt in args.formats:
        print(f"{args.model}, {'unquantized' if fmt == 'none' else f'{fmt} block {args.block_size}'}:")
        if fmt == "none":
            suite(loaded.model, tokenizer, names, args.suite, args.batch_size)
            continue
        with quantized(pristine, QuantConfig(fmt, args.block_size)):
            suite(loaded.model, tokenizer, names, args.suite, args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-side-by-side", action="store_true")
    parser.add_argument("--suite", type=int, metavar="LIMIT", help="then score and time a suite at LIMIT")
    parser.add_argument("--tasks", nargs="+", default=["zeroshot"], help="the suite's tasks or suites")
    parser.add_argument("--formats", nargs="+", default=["none"], help='formats to run the suite in ("none")')
    parser.add_argument("--block-size", type=int, default=64)
    args = parser.parse_args()
    loaded, tokenizer = load_model(args.model), load_tokenizer(args.model)
    loaded.model.eval()
    if not args.skip_side_by_side:
        side_by_side(loaded.model, tokenizer, args.task, args.limit, args.batch_size, args.runs)
    if args.suite:
        quantized_suites(loaded, tokenizer, args, expand_tasks(args.tasks))


if __name__ == "__main__":
    main()
