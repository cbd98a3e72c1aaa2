"""Speed and cost of the evaluation loops on the real models (CPU).

For each model asset that is fetched (smollm2-135m, gemma-3-270m):
- tokens/s of harness.evaluate.perplexity against a plain transformers loop (one ``model(ids, labels=...)``
  per window, as the HF guide writes it) on the same tokens and windows, disjoint and llamacpp protocols;
- under each protocol, the top-k KLD base reference: build time, bytes per scored token, size, and what one
  ``evaluate_against`` pass (perplexity + KLD) costs over a perplexity-only pass; the self-check; an int4
  block-256 example (llamacpp);
- the FLOP floor of one pass (blocks + head, from the model's shapes) at the fastest torch.mm rate this CPU
  reaches on the pass's own GEMM shapes, and each pass's time as a multiple of it;
- bf16 against fp32: the same perplexity loop with the whole model cast to bfloat16.
Medians of ``--runs`` runs; ratios are taken within one run of this script.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/eval.py [--models smollm2-135m] [--corpus wikipedia]
        [--tokens 2048] [--runs 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import argparse
import copy
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
from harness.data import token_splits
from harness.evaluate.divergence import BaseReference, evaluate_against
from harness.evaluate.perplexity import (
    ROWS_PER_PASS,
    VOCAB_SLICE,
    PerplexityProtocol,
    Window,
    make_windows,
    perplexity,
    text_counts,
)
from harness.models import load_model
from harness.quantize import QuantConfig, fake_quant
from harness.sweep import matmul_rate


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
    for w in make_windows(protocol, tokens.shape[1]):
        ids = tokens[:, w.start : w.end + 1].clone()  # +1: the last target, as HF's labels want it
        if bos is not None and protocol.name == "llamacpp":
            ids[0, 0] = bos
        labels = ids.clone()
        labels[0, : ids.shape[1] - w.n_scored] = -100
        total += float(model(input_ids=ids, labels=labels).loss) * w.n_scored
    return total


def forward_flops(model: nn.Module, windows: list[Window]) -> tuple[float, float]:
    """Multiply-adds x 2 of one pass over ``windows``: the transformer blocks (every Linear but the head,
    plus causal attention scores and mixing) and the output head at the scored positions only."""
    head = model.get_output_embeddings()
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim  # QK^T and AV
    body = sum(2 * linear * w.length + attention * w.length * (w.length + 1) / 2 for w in windows)
    return body, 2 * head.in_features * head.out_features * sum(w.n_scored for w in windows)


def gemm_rates(model: nn.Module, context: int, runs: int) -> dict[str, float]:
    """torch.mm FLOP/s on the pass's own GEMM shapes: an MLP projection of a 4 x ``context`` batch, and one
    head tile."""
    d_model, d_ff = model.config.hidden_size, model.config.intermediate_size
    shapes = {
        f"{4 * context}x{d_model} @ {d_model}x{d_ff}": (4 * context, d_model, d_ff),
        f"{ROWS_PER_PASS}x{d_model} @ {d_model}x{VOCAB_SLICE}": (ROWS_PER_PASS, d_model, VOCAB_SLICE),
    }
    return {label: matmul_rate(*shape, runs=max(runs, 5)) for label, shape in shapes.items()}


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
    body, head = forward_flops(model, make_windows(proto, tokens.shape[1]))
    best = max(rates, key=rates.__getitem__)
    floor = (body + head) / rates[best]
    print(
        f"FLOP floor ({proto.name} {context}): {body / 1e9:.1f} GFLOP in the blocks + {head / 1e9:.1f} "
        f"GFLOP in the head at {rates[best] / 1e9:.0f} GFLOP/s, the faster torch.mm rate of "
        + ", ".join(f"{label} ({rate / 1e9:.0f})" for label, rate in rates.items())
        + f" = {floor:.2f} s; perplexity pass {t_ppl / floor:.2f}x the floor, ppl + KLD pass "
        f"{t_both / floor:.2f}x"
    )
    return ref


def int4_example(model: nn.Module, ref: BaseReference) -> None:
    """What int4 at block 256 on every block Linear does to perplexity, KLD and top-1."""
    originals = {}
    config = QuantConfig("int4", 256)
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in mod_name:
                originals[mod_name] = module.weight.data
                module.weight.data = fake_quant(module.weight.data, config)
    q_ppl, q_div = evaluate_against(model, ref, progress=False)
    for mod_name, module in model.named_modules():
        if mod_name in originals:
            module.weight.data = originals[mod_name]
    print(
        f"int4 block 256 on {len(originals)} block Linears: "
        f"ppl {ref.perplexity().ppl:.3f} -> {q_ppl.ppl:.3f}, "
        f"KLD mean {q_div.kld_mean:.4f} p50 {np.median(q_div.kld):.4f} "
        f"p99 {np.percentile(q_div.kld, 99):.4f} max {q_div.kld.max():.3f}, "
        f"top-1 {q_div.top1_agreement:.3f}"
    )


def bench_model(name: str, corpus: str, n_tokens: int, context: int, runs: int) -> None:
    loaded = load_model(name)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    tokens = token_splits(
        corpus, tokenizer, calibration_sequences=0, calibration_length=8, eval_tokens=n_tokens
    ).evaluation
    n_bytes, n_words = text_counts(tokenizer, tokens)
    bos = tokenizer.bos_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    print(
        f"\n## {name}: {n_tokens} {corpus} tokens, context {context}, vocab {vocab}, "
        f"{torch.get_num_threads()} threads, median of {runs}"
    )
    kw = {"text_bytes": n_bytes, "text_words": n_words, "bos_token_id": bos, "progress": False}
    with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
        model(input_ids=tokens[:, :context])

    print("| protocol | scored | ppl | ours tok/s | plain tok/s | speed-up | nll rel diff |")
    print("|---|---|---|---|---|---|---|")
    for proto in (PerplexityProtocol("disjoint", context), PerplexityProtocol("llamacpp", context)):
        fed = sum(w.length for w in make_windows(proto, tokens.shape[1]))
        t_ours, t_plain, speedup, ours, plain = paired(
            lambda p=proto: perplexity(model, tokens, p, batch_size=4, **kw),
            lambda p=proto: plain_loop(model, tokens, p, bos),
            runs,
        )
        print(
            f"| {proto.name} | {ours.n_tokens_scored} | {ours.ppl:.3f} | {fed / t_ours:.0f} | "
            f"{fed / t_plain:.0f} | {speedup:.2f}x | {abs(ours.nll_sum - plain) / plain:.1e} |"
        )

    rates = gemm_rates(model, context, runs)
    for proto in (PerplexityProtocol("disjoint", context), PerplexityProtocol("llamacpp", context)):
        with tempfile.TemporaryDirectory() as cache:
            ref = reference_and_floor(model, tokens, proto, Path(cache), name, kw, rates, runs)
            if proto.name == "llamacpp":
                int4_example(model, ref)

    proto = PerplexityProtocol("llamacpp", context)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.inference_mode():
        bf16(input_ids=tokens[:, :context])
    t32, t16, slowdown, r32, r16 = paired(
        lambda: perplexity(model, tokens, proto, **kw), lambda: perplexity(bf16, tokens, proto, **kw), runs
    )
    fed = sum(w.length for w in make_windows(proto, tokens.shape[1]))
    print(
        f"\nbf16 vs fp32 ({proto.name} {context}, whole model cast): fp32 {fed / t32:.0f} tok/s, "
        f"bf16 {fed / t16:.0f} tok/s (bf16 time / fp32 time {slowdown:.2f}); "
        f"ppl {r32.ppl:.4f} -> {r16.ppl:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--corpus", default="wikipedia")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for name in args.models:
        if not assets.is_fetched(name):
            print(f"\n## {name}: not fetched (harness fetch {name}); skipped")
            continue
        bench_model(name, args.corpus, args.tokens, args.context, args.runs)


if __name__ == "__main__":
    main()
