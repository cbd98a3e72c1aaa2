"""What a LoRA recovery step costs: ours against a plain peft + transformers loop, and against the FLOP floor.

On the ``recovery-smoke`` experiment's model and recipe (smollm2-135m in bf16; rank 16 on every quantized
Linear, 4 rows of 128 tokens per step), or another experiment's (``--experiment``) and another model
(``--model``, in place of the experiment's), with the base quantized to nf4 at block 64 the way a sweep does
it (dequantized weights in place): tokens/s of

- ours: ``harness.recovery.adapted`` (peft adapters, AdamW, rows accumulated over as few forwards as keep the
  logits within its budget);
- plain peft + transformers: ``get_peft_model`` on the same layers, one forward of the step's whole batch with
  ``labels``, ``backward``, ``AdamW.step``: what a researcher writes by hand.

With ``--checkpointing`` both loops recompute each block's activations in the backward pass (the recipe's
``checkpointing``; transformers' ``activation_checkpointing_enable`` in the plain loop).

Each timing is the median step of ``--runs`` trainings of ``--steps`` steps (the first step of each is left
out: it allocates). The floor is the step's FLOPs at this CPU's bf16 torch.mm rate: 6 × parameters × tokens
(the usual rule, which counts weight gradients) and 4 × parameters × tokens (the base is frozen: no weight
gradients, only the activations' and the adapters'). Peak RSS is this process's during each loop's trainings
(its high-water mark restarted as each starts), against 2 × the model's bytes + AdamW's state (two float32
moments per adapter parameter) + 0.5 GB.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/recovery.py [--experiment recovery-smoke] [--model M] \
        [--steps 6] [--runs 3] [--checkpointing]

Compare ratios taken in one run: the machine's speed varies from day to day.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import argparse
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel

from harness.experiments import load_experiment
from harness.experiments.schema import RecoverySettings
from harness.floor import matmul_rate
from harness.memory import release_freed
from harness.models import quantized
from harness.quant.quantize import COMPUTE_DTYPES, QuantConfig
from harness.recovery import adapted, checkpointed, micro_batch
from harness.session import ModelSession


def _plain_peft(
    model: PreTrainedModel, names: list[str], rows: torch.Tensor, recipe: RecoverySettings
) -> list[float]:
    """Seconds per step of a hand-written peft + transformers loop: one forward per step."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules="|".join(re.escape(n) for n in names),
    )
    torch.manual_seed(recipe.seed)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=recipe.lr)
    peft_model.train()
    times = []
    with checkpointed(model, recipe.checkpointing):  # transformers' own switch, on and off again
        for step in range(recipe.steps):
            start = time.perf_counter()
            part = rows[step * recipe.batch : (step + 1) * recipe.batch]
            peft_model(input_ids=part, labels=part).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    peft_model.eval()
    peft_model.unload()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="recovery-smoke")
    parser.add_argument("--model", help="the model, in place of the experiment's (default: its first)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="both loops recompute activations")
    args = parser.parse_args()
    overrides = [f"recovery.steps={args.steps}", f"recovery.checkpointing={str(args.checkpointing).lower()}"]
    experiment = load_experiment(args.experiment, overrides + ([f"model={args.model}"] if args.model else []))
    config = experiment.configs[0].resolved("bfloat16")
    recipe = config.recovery
    assert recipe is not None, f"{args.experiment} has no recovery section"
    session = ModelSession.prepare(config)
    model = session.loaded.model
    hidden = model.config.get_text_config().hidden_size
    rate = matmul_rate(recipe.batch * recipe.sequence_length, hidden, 4 * hidden, torch.bfloat16)
    tokens = recipe.batch * recipe.sequence_length
    shape = f"{tokens}×{hidden} @ {hidden}×{4 * hidden}"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"bf16 torch.mm {rate / 1e9:.0f} GFLOP/s ({shape})"
    )
    names = [info.name for info in session.pristine.layers]
    assert session.training is not None
    rows = session.training.rows
    quant = QuantConfig("nf4", 64)
    dtype = COMPUTE_DTYPES[str(config.compute_dtype)]
    ours: list[float] = []
    theirs: list[float] = []
    peaks = {"ours": 0, "plain": 0}
    with quantized(session.pristine, quant, dtype, session.calibration, quiet=True):
        before = _rss("VmRSS")
        for run in range(args.runs):
            with _peak(peaks, "ours"), adapted(model, names, rows, recipe) as training:
                pass
            ours += training.step_s[1:]
            with _peak(peaks, "plain"):
                theirs += _plain_peft(model, names, rows, recipe)[1:]
            plain = sum(theirs[1 - args.steps :])
            print(f"run {run + 1}: ours {sum(ours[1 - args.steps :]):.1f} s, plain peft {plain:.1f} s")
        adapter_bytes = training.adapter_bytes
    parameters = sum(p.numel() for p in model.parameters())
    ours_step, theirs_step = statistics.median(ours), statistics.median(theirs)
    per_forward = micro_batch(model, recipe)
    print(
        f"\n{config.model} in bf16, nf4 b64 base; rank {recipe.rank} on {len(names)} Linears; "
        f"{recipe.batch} × {recipe.sequence_length} tokens per step; ours runs {per_forward} rows per "
        f"forward; activation checkpointing {'on' if recipe.checkpointing else 'off'} in both loops"
    )
    print("\n| loop | s/step | tokens/s | × 6N floor | × 4N floor |")
    print("|---|--:|--:|--:|--:|")
    for name, step in (("ours", ours_step), ("plain peft + transformers", theirs_step)):
        print(
            f"| {name} | {step:.3f} | {tokens / step:.0f} | {step * rate / (6 * parameters * tokens):.2f} | "
            f"{step * rate / (4 * parameters * tokens):.2f} |"
        )
    print(f"\nours / plain peft tokens/s: {theirs_step / ours_step:.2f} (goal ≥ 0.9)")
    model_bytes = sum(p.nbytes for p in model.parameters())
    budget = 2 * model_bytes + 2 * adapter_bytes + 0.5e9
    print(
        f"RSS {before / 1e9:.2f} GB when training starts (model, pristine copies, base reference, session); "
        f"peak during ours {peaks['ours'] / 1e9:.2f} GB (+{(peaks['ours'] - before) / 1e9:.2f} GB), during "
        f"plain peft {peaks['plain'] / 1e9:.2f} GB (+{(peaks['plain'] - before) / 1e9:.2f} GB); budget 2 × "
        f"model {2 * model_bytes / 1e9:.2f} GB + AdamW state {2 * adapter_bytes / 1e9:.3f} GB + 0.5 GB = "
        f"{budget / 1e9:.2f} GB"
    )


@contextmanager
def _peak(peaks: dict[str, int], loop: str) -> Iterator[None]:
    """Record in ``peaks[loop]`` the largest RSS this process reaches inside (its high-water mark, VmHWM,
    restarted on entry, after the heap pages the loop before freed are handed back: otherwise a loop's peak
    would count what glibc kept of the other's)."""
    release_freed()
    Path("/proc/self/clear_refs").write_text("5")
    yield
    peaks[loop] = max(peaks[loop], _rss("VmHWM"))


def _rss(field: str) -> int:
    """This process's VmRSS or VmHWM (peak) from /proc, in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    main()
