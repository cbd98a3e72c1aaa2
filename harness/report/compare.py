"""The paired difference of two configs from their per-token results, with no model run."""

from __future__ import annotations

from harness.report.export import run_tokens
from harness.report.runs import select_runs
from harness.report.table import ReportError
from harness.stats import METHOD, paired_difference, ppl_difference
from harness.tracking import (
    TOKENS_ARTIFACT,
    Tracker,
)

# ---- pairwise comparison ---------------------------------------------------------------------------------


def compare(experiment: str, first: str, second: str, tracking_uri: str | None = None) -> str:
    """The paired difference ``first − second`` of two configs (by label) from their per-token results:
    mean NLL, PPL, mean KLD and top-1 agreement, each with its SE, 95 % interval and whether it is resolved.
    No model runs: everything comes from the runs' ``tokens.npz`` artifacts."""
    tracker = Tracker.of(tracking_uri)
    rows = {}
    for runs in select_runs(tracker.records(experiment), experiment, tracker.uri):
        for r in runs.all:
            rows.setdefault("baseline" if r.is_baseline else r.label, []).append((runs.model, r))
    found = []
    for label in (first, second):
        if label not in rows:
            raise ReportError(f"no FINISHED config {label!r} in {experiment!r}; configs: {', '.join(rows)}")
        if len(rows[label]) > 1:
            models = ", ".join(model for model, _ in rows[label])
            raise ReportError(
                f"{label!r} was run on several models ({models}); compare within one experiment"
            )
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
        f"{'':<16}{'difference':>12}{'SE':>11}{'95% interval':>26}  resolved",
    ]
    measures = [("mean NLL (nats)", "nll", 1.0), ("PPL", "nll", 1.0)]
    measures += [("mean KLD (nats)", "kld", 1.0), ("top-1 (%)", "top1_match", 100.0)]
    for name, key, scale in measures:
        if key not in a or key not in b:
            continue
        d = ppl_difference(a[key], b[key]) if name == "PPL" else paired_difference(a[key], b[key])
        shown = f"[{d.ci_low * scale:+.4g}, {d.ci_high * scale:+.4g}]"
        verdict = "yes" if d.resolved else "no"
        lines.append(f"{name:<16}{d.mean * scale:>+12.4g}{d.se * scale:>11.3g}{shown:>26}  {verdict}")
    return "\n".join(lines)
