"""The paired difference of two configs from their per-token results, with no model run."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from harness.report.export import run_tokens
from harness.report.runs import select_runs
from harness.report.table import ReportError
from harness.stats import METHOD, Difference, paired_difference, ppl_difference, recovery_difference
from harness.tracking import (
    TOKENS_ARTIFACT,
    Tracker,
)

# ---- pairwise comparison ---------------------------------------------------------------------------------


def compare(
    experiment: str, first: str, second: str, tracking_uri: str | None = None, model: str | None = None
) -> str:
    """The paired difference ``first − second`` of two configs (by label) from their per-token results:
    mean NLL, PPL, mean KLD and top-1 agreement, and after LoRA recovery the PPL after LoRA and the share of
    the gap each recovers (against the unquantized model and the 16-bit LoRA target), each with its SE, 95 %
    interval and whether it is resolved; ``model`` picks one where the experiment ran several.
    No model runs: everything comes from the runs' ``tokens.npz`` artifacts."""
    tracker = Tracker.of(tracking_uri)
    rows = {}
    for runs in select_runs(tracker.records(experiment), experiment, tracker.uri):
        if model is not None and runs.model != model:
            continue
        for r in runs.all:
            rows.setdefault("baseline" if r.is_baseline else r.label, []).append((runs.model, r))
    found = []
    for label in (first, second):
        if label not in rows:
            raise ReportError(f"no FINISHED config {label!r} in {experiment!r}; configs: {', '.join(rows)}")
        if len(rows[label]) > 1:
            models = ", ".join(model for model, _ in rows[label])
            raise ReportError(f"{label!r} was run on several models ({models}); choose one with --model")
        _, row = rows[label][0]
        tokens = run_tokens(tracker, row.run_id)
        if tokens is None:
            raise ReportError(f"the run of {label!r} kept no per-token results ({TOKENS_ARTIFACT}); rerun it")
        found.append((row.model, tokens))  # one model in two dtypes pairs on its tokens
    (model_a, a), (model_b, b) = found
    if model_a != model_b or len(a["nll"]) != len(b["nll"]):
        raise ReportError(f"{first!r} and {second!r} were not evaluated on the same tokens")
    lines = [
        f"{first} − {second} on {model_a}, {len(a['nll']):,} scored tokens, paired ({METHOD}):",
        f"{'':<24}{'difference':>12}{'SE':>11}{'95% interval':>26}  resolved",
    ]
    for name, needed, scale, differ in MEASURES:
        if not all(key in a and key in b for key in needed):
            continue
        d = differ(a, b)
        shown = f"[{d.ci_low * scale:+.4g}, {d.ci_high * scale:+.4g}]"
        verdict = "yes" if d.resolved else "no"
        lines.append(f"{name:<24}{d.mean * scale:>+12.4g}{d.se * scale:>11.3g}{shown:>26}  {verdict}")
    return "\n".join(lines)


Tokens = dict[str, np.ndarray]


def _recovered(reference: str) -> Callable[[Tokens, Tokens], Difference]:
    """The difference of two configs' LoRA recoveries against one reference series (the same in both)."""

    def differ(a: Tokens, b: Tokens) -> Difference:
        before_after = [np.stack([tokens["nll"], tokens["lora_nll"]]) for tokens in (a, b)]
        return recovery_difference(*before_after, reference=a[reference])

    return differ


# (name, the per-token series it needs, display scale, paired difference a − b)
MEASURES: list[tuple[str, tuple[str, ...], float, Callable[[Tokens, Tokens], Difference]]] = [
    ("mean NLL (nats)", ("nll",), 1.0, lambda a, b: paired_difference(a["nll"], b["nll"])),
    ("PPL", ("nll",), 1.0, lambda a, b: ppl_difference(a["nll"], b["nll"])),
    ("mean KLD (nats)", ("kld",), 1.0, lambda a, b: paired_difference(a["kld"], b["kld"])),
    ("top-1 (%)", ("top1_match",), 100.0, lambda a, b: paired_difference(a["top1_match"], b["top1_match"])),
    ("PPL after LoRA", ("lora_nll",), 1.0, lambda a, b: ppl_difference(a["lora_nll"], b["lora_nll"])),
    ("recovered vs base (%)", ("lora_nll", "base_nll"), 100.0, _recovered("base_nll")),
    ("recovered vs lora16 (%)", ("lora_nll", "lora16_nll"), 100.0, _recovered("lora16_nll")),
]
