"""What the harness measures: the metric registry (``registry``), every metric's declaration (``declared``),
and the storage and reconstruction-error arithmetic behind the per-layer ones (``error``)."""

from __future__ import annotations

from harness.metrics import declared as _declared  # noqa: F401  (registers every metric)
from harness.metrics.error import (
    activation_weighted_error,
    bits_per_param,
    error_metrics,
    gaussian_rate_distortion,
    lloyd_max_mse,
    output_error,
    stored_bytes,
    weight_statistics,
)
from harness.metrics.registry import (
    AGGREGATIONS,
    METRICS,
    TASK,
    MetricSpec,
    aggregate,
    markdown_table,
    metric,
    register_metric,
)

__all__ = [
    "AGGREGATIONS",
    "METRICS",
    "TASK",
    "MetricSpec",
    "activation_weighted_error",
    "aggregate",
    "bits_per_param",
    "error_metrics",
    "gaussian_rate_distortion",
    "lloyd_max_mse",
    "markdown_table",
    "metric",
    "output_error",
    "register_metric",
    "stored_bytes",
    "weight_statistics",
]
