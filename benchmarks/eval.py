"""Speed and cost of the evaluation loops on the real models (CPU), in bf16 and in fp32.

For each model asset that is fetched (smollm2-135m, gemma-3-270m), loaded in each dtype:
- tokens/s of harness.evaluate.windows against a plain transformers loop (one ``model(ids, labels=...)``
  per window, as the HF guide writes it) on the same tokens and windows, disjoint and llamacpp protocols;
- the FLOP floor of one pass (blocks + head, ``harness.floor``) at the fastest torch.mm rate this CPU reaches
  on the pass's own GEMM shapes in that dtype, and each pass's time as a multiple of it;
- under each protocol, the top-k KLD base reference: build time, bytes per scored token, size, and what one
  ``evaluate_against`` pass (perplexity + KLD) costs over a perplexity-only pass; the self-check; an int4
  block-256 example (llamacpp);
- bf16 against fp32: tokens/s of the same perplexity pass, each model loaded in its dtype;
- with ``--profile``, where one disjoint perplexity pass spends its time in each dtype: torch's profiler,
  the operators with the most time of their own, and the GEMMs' share against the floor of all the pass's
  FLOPs.
Medians of ``--runs`` runs; ratios are taken within one run of this script.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/eval.py [--models smollm2-135m] [--corpus wikipedia]
        [--tokens 2048] [--runs 3] [--profile]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness import assets
from harness.data import text_counts, token_splits
from harness.evaluate.divergence import evaluate_against
from harness.evaluate.reference import BaseReference
from harness.evaluate.windows import PerplexityProtocol, make_windows, perplexity
from harness.floor import PassCost, floor_seconds, gemm_rates, pass_cost
from harness.models import LoadedModel, discover_layers, load_model, load_tokenizer, quantized, snapshot
from harness.models.anatomy import device_of
from harness.quant.quantize import QuantConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def paired(a: Callable[[], Any], b: Callable[[], Any], runs: int) -> tuple[float, float, float, Any, Any]:
    """Median times of a and b run alternately (the machine's load drifts), and the median of b/a."""
    ta, tb = [], []
    for _ in range(runs):
        t_a, out_a = median_time(a, 1)
        t_b, out_b = median_time(b, 1)
        ta.append(t_a)
        tb.append(t_b)
    ratio = statistics.median(y / x for x, y in zip(ta, tb, strict=True))
    return statistics.median(ta), statistics.median(tb), ratio, out_a, out_b


@torch.inference_mode()
def plain_loop(
    model: nn.Module, tokens: torch.Tensor, protocol: PerplexityProtocol, bos: int | None
) -> float:
    """The obvious loop: one window at a time, full logits, HF's own shifted cross-entropy."""
    total = 0.0
    tokens = tokens.to(device_of(model))
    for w in make_windows(protocol, tokens.shape[1]):
        ids = tokens[:, w.start : w.end + 1].clone()  # +1: the last target, as HF's labels want it
        if bos is not None and protocol.name == "llamacpp":
            ids[0, 0] = bos
        labels = ids.clone()
        labels[0, : ids.shape[1] - w.n_scored] = -100
        total += float(model(input_ids=ids, labels=labels).loss) * w.n_scored
    return total


def floor_line(label: str, cost: PassCost, rates: dict[str, float], times: dict[str, float]) -> str:
    floor = floor_seconds(cost, rates)
    shown = ", ".join(f"{shape} ({rate / 1e9:.0f})" for shape, rate in rates.items())
    passes = ", ".join(f"{name} {t / floor:.2f}x" for name, t in times.items())
    return (
        f"FLOP floor {label}: {cost.body_flops / 1e9:.1f} GFLOP in the blocks + {cost.head_flops / 1e9:.1f} "
        f"GFLOP in the head at {max(rates.values()) / 1e9:.0f} GFLOP/s, the fastest torch.mm rate of "
        f"{shown} = {floor:.2f} s" + (f"; {passes} the floor" if passes else "")
    )


def reference_and_floor(
    model: nn.Module,
    tokens: torch.Tensor,
    proto: PerplexityProtocol,
    cache: Path,
    name: str,
    kw: dict[str, Any],
    rates: dict[str, float],
    runs: int,
) -> BaseReference:
    """The top-k base reference under ``proto``: its size and build time, what KLD adds to a perplexity pass,
    its self-check, and both passes as multiples of the FLOP floor at the fastest of ``rates``."""
    build = partial(BaseReference.build, model, tokens, proto, cache, name, **kw)
    start = time.perf_counter()
    ref = build()
    t_build = time.perf_counter() - start
    start = time.perf_counter()
    build()  # the cache hit
    t_hit = time.perf_counter() - start
    on_disk = sum(p.stat().st_size for p in ref.path.iterdir())
    t_ppl, t_both, overhead, _, (_, self_div) = paired(
        lambda: perplexity(model, tokens, proto, **kw),
        lambda: evaluate_against(model, ref, progress=False),
        runs,
    )
    context = proto.context_length
    print(
        f"\nKLD cache ({proto.name} {context}): {ref.n_tokens} scored tokens, "
        f"{on_disk / 2**20:.1f} MiB on disk "
        f"({on_disk / ref.n_tokens:.0f} B/token, {ref.storage.label}; "
        f"{on_disk / ref.n_tokens * 1e5 / 2**30:.1f} GiB per 100k scored tokens); build {t_build:.1f} s "
        f"(a perplexity pass: {t_ppl:.1f} s), cache hit {t_hit:.2f} s"
    )
    print(
        f"evaluate_against (ppl + KLD, one pass) {t_both:.2f} s vs perplexity only {t_ppl:.2f} s: "
        f"KLD overhead {overhead - 1:+.0%}"
    )
    print(
        f"self-check: KLD mean {self_div.kld_mean:.2e}, max {self_div.kld.max():.2e}, "
        f"top-1 {self_div.top1_agreement:.4f}"
    )
    cost = pass_cost(model, proto, tokens.shape[1])
    print(floor_line(f"({proto.name} {context})", cost, rates, {"perplexity": t_ppl, "ppl + KLD": t_both}))
    return ref


def where_time_goes(
    model: nn.Module, tokens: torch.Tensor, proto: PerplexityProtocol, kw: dict[str, Any], floor: float
) -> None:
    """The operators one perplexity pass spends the most time in (their own time, torch's profiler),
    against ``floor``, the pass's FLOP floor."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        perplexity(model, tokens, proto, batch_size=4, **kw)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    print(f"profiled {proto.name} pass: {total:.2f} s = {total / floor:.2f}x its FLOP floor ({floor:.2f} s)")
    for e in ops[:8]:
        t = e.self_cpu_time_total / 1e6
        print(f"  {e.key}: {t:.3f} s ({t / total:.0%}), {e.count} calls")


def int4_example(loaded: LoadedModel, ref: BaseReference) -> None:
    """What int4 at block 256 on every block Linear does to perplexity, KLD and top-1."""
    layers = discover_layers(loaded)
    dtype = loaded.model.get_output_embeddings().weight.dtype  # dequantized into the model's own dtype
    with quantized(snapshot(loaded.model, layers), QuantConfig("int4", 256), dtype, quiet=True):
        q_ppl, q_div = evaluate_against(loaded.model, ref, progress=False)
    print(
        f"int4 block 256 on {len(layers)} block Linears: "
        f"ppl {ref.perplexity().ppl:.3f} -> {q_ppl.ppl:.3f}, "
        f"KLD mean {q_div.kld_mean:.4f} p50 {np.median(q_div.kld):.4f} "
        f"p99 {np.percentile(q_div.kld, 99):.4f} max {q_div.kld.max():.3f}, "
        f"top-1 {q_div.top1_agreement:.3f}"
    )


def bench_model(name: str, corpus: str, n_tokens: int, context: int, runs: int, profiled: bool) -> None:
    models = {label: load_model(name, dtype) for label, dtype in DTYPES.items()}
    tokenizer = load_tokenizer(name)
    tokens = token_splits(
        corpus, tokenizer, calibration_sequences=0, calibration_length=8, eval_tokens=n_tokens
    ).evaluation
    n_bytes, n_words = text_counts(tokenizer, tokens)
    bos = tokenizer.bos_token_id
    kw = {"text_bytes": n_bytes, "text_words": n_words, "bos_token_id": bos, "progress": False}
    protocols = (PerplexityProtocol("disjoint", context), PerplexityProtocol("llamacpp", context))
    vocab = models["bf16"].model.get_output_embeddings().weight.shape[0]
    print(
        f"\n## {name}: {n_tokens} {corpus} tokens, context {context}, vocab {vocab}, "
        f"{torch.get_num_threads()} threads, median of {runs}"
    )
    ours: dict[tuple[str, str], float] = {}
    for label, loaded in models.items():
        model = loaded.model.eval()
        with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
            model(input_ids=tokens[:, :context])
        rates = gemm_rates(pass_cost(model, protocols[0], tokens.shape[1]), DTYPES[label], runs=max(runs, 5))
        print(
            f"\n### {label}\n| protocol | scored | ppl | ours tok/s | plain tok/s | ours / plain | x floor "
            "| NLL sum, relative difference |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for proto in protocols:
            fed = sum(w.length for w in make_windows(proto, tokens.shape[1]))
            t_ours, t_plain, plain_over_ours, result, plain = paired(
                lambda p=proto, m=model: perplexity(m, tokens, p, batch_size=4, **kw),
                lambda p=proto, m=model: plain_loop(m, tokens, p, bos),
                runs,
            )
            ours[label, proto.name] = fed / t_ours
            floor = floor_seconds(pass_cost(model, proto, tokens.shape[1]), rates)
            print(
                f"| {proto.name} | {result.n_tokens_scored} | {result.ppl:.3f} | {fed / t_ours:.0f} | "
                f"{fed / t_plain:.0f} | {plain_over_ours:.2f}x | {t_ours / floor:.2f}x | "
                f"{abs(result.nll_sum - plain) / plain:.1e} |"
            )
        for proto in protocols:
            print(floor_line(f"{label} ({proto.name})", pass_cost(model, proto, tokens.shape[1]), rates, {}))
        if profiled:
            floor = floor_seconds(pass_cost(model, protocols[0], tokens.shape[1]), rates)
            where_time_goes(model, tokens, protocols[0], kw, floor)
        if label == "bf16":
            for proto in protocols:
                with tempfile.TemporaryDirectory() as cache:
                    ref = reference_and_floor(model, tokens, proto, Path(cache), name, kw, rates, runs)
                    if proto.name == "llamacpp":
                        int4_example(loaded, ref)
    for proto in protocols:
        print(
            f"\nbf16 vs fp32 ({proto.name} {context}, each loaded in its dtype): bf16 "
            f"{ours['bf16', proto.name]:.0f} tok/s, fp32 {ours['fp32', proto.name]:.0f} tok/s: "
            f"{ours['bf16', proto.name] / ours['fp32', proto.name]:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--corpus", default="wikipedia")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="where a pass spends its time, per dtype")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for name in args.models:
        if not assets.is_fetched(name):
            print(f"\n## {name}: not fetched (harness fetch {name}); skipped")
            continue
        bench_model(name, args.corpus, args.tokens, args.context, args.runs, args.profile)


if __name__ == "__main__":
    main()
