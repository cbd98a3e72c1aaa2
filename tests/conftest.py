"""Shared fixtures: weight-like tensors (Gaussian, heavy-tailed, odd shapes) in the dtypes QLoRA meets."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore", message=".*kernels.*")

WEIGHT_SHAPES = [(256, 512), (333, 77), (1000,), (4, 11, 64)]


def weight(
    kind: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """Gaussian, Student-t (3 dof) or 'real-looking' (Gaussian rows with a few large outlier columns)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        w = torch.randn(shape, generator=g)
    elif kind == "student_t":
        torch.manual_seed(seed)
        w = torch.distributions.StudentT(3.0).sample(shape)
    else:
        w = torch.randn(shape, generator=g) * 0.02
        flat = w.reshape(-1)
        flat[:: max(1, flat.numel() // 7)] *= 40  # sparse outliers, as in real LLM weights
    return w.to(dtype)


@pytest.fixture(params=["gaussian", "student_t", "real"])
def weight_kind(request: pytest.FixtureRequest) -> str:
    return request.param
