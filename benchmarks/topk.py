"""How far the compact top-k base reference is from the exact KLD, and what each costs.

For each offline model and each of nf4/int4/fp4 at block 64 (every Linear in the blocks quantized), the mean
KLD against an exact float32 full-vocabulary reference and against top-k references for several k, on the
same tokens and windows (the top-k references draw their default number of tail samples). It prints the
error of the mean relative to exact, the bytes per token of each reference and the time of one evaluation
pass.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/topk.py [--tokens 2048] [--models gemma-3-270m smollm2-135m]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time
from functools import partial

import torch

from harness.data import text_counts, token_splits
from harness.evaluate.divergence import evaluate_against
from harness.evaluate.reference import BaseReference, ReferenceStorage
from harness.evaluate.windows import PerplexityProtocol
from harness.models import LoadedModel, discover_layers, load_model, load_tokenizer, quantized, snapshot
from harness.quant.quantize import QuantConfig

KS = (16, 64, 256)
FORMATS = ("nf4", "int4", "fp4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    protocol = PerplexityProtocol("disjoint", 512)
    print(f"| model | format | exact KLD | {' | '.join(f'top-{k} error' for k in KS)} |")
    print(f"|:--|:--|--:|{'--:|' * len(KS)}")
    costs = []
    for name in args.models:
        loaded, tokenizer = load_model(name), load_tokenizer(name)
        tokens = token_splits(
            "wikipedia",
            tokenizer,
            calibration_sequences=0,
            calibration_length=8,
            eval_tokens=args.tokens,
        ).evaluation

        counts = text_counts(tokenizer, tokens)
        reference = partial(_reference, loaded, tokens, protocol, counts, tokenizer.bos_token_id)
        references = {"exact": reference(ReferenceStorage("exact", dtype="float32"))}
        references |= {f"top-{k}": reference(ReferenceStorage("topk", k=k)) for k in KS}
        pristine = snapshot(loaded.model, discover_layers(loaded))
        for fmt in FORMATS:
            found, seconds = {}, {}
            with quantized(pristine, QuantConfig(fmt, 64)):
                for label, ref in references.items():
                    start = time.perf_counter()
                    found[label] = evaluate_against(loaded.model, ref, progress=False)[1].kld_mean
                    seconds[label] = time.perf_counter() - start
            exact = found["exact"]
            errors = [f"{(found[f'top-{k}'] - exact) / exact:+.3%}" for k in KS]
            print(f"| {name} | {fmt}-b64 | {exact:.4f} | {' | '.join(errors)} |", flush=True)
            costs.append((name, fmt, {k: (references[k].bytes_per_token, seconds[k]) for k in references}))
    print("\nbytes per token and seconds of one evaluation pass:")
    for name, fmt, cost in costs:
        shown = ", ".join(f"{k} {b:,.0f} B {s:.1f} s" for k, (b, s) in cost.items())
        print(f"  {name} {fmt}-b64: {shown}")


def _reference(
    loaded: LoadedModel,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    counts: tuple[int, int],
    bos_token_id: int | None,
    storage: ReferenceStorage,
) -> BaseReference:
    return BaseReference.build(
        loaded.model,
        tokens,
        protocol,
        None,
        text_bytes=counts[0],
        text_words=counts[1],
        bos_token_id=bos_token_id,
        storage=storage,
        progress=False,
    )


if __name__ == "__main__":
    main()
