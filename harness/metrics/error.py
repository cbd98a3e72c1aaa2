"""Storage accounting and reconstruction error, with the information-theoretic references beside them.

Bits per parameter are counted from the bytes actually stored (packed codes, constants, second-level
constants, offsets), never from a formula, so partial blocks, padding and per-tensor scalars all count.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

from harness.quant.quantize import QuantizedTensor


def stored_bytes(qt: QuantizedTensor) -> int:
    return sum(t.numel() * t.element_size() for t in qt.stored_tensors().values())


def bits_per_param(qt: QuantizedTensor) -> float:
    return 8 * stored_bytes(qt) / qt.numel if qt.numel else 0.0


def error_metrics(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Weight-space error of ``approx`` against ``reference``, in fp32 (BLAS dot products: blocked sums).

    mse; nmse = mse / mean(W²); rel_fro = ‖W − Ŵ‖_F / ‖W‖_F; sqnr_db = 10·log10(mean(W²) / mse);
    max_abs; cosine similarity of the flattened tensors.
    """
    w = reference.detach().reshape(-1).float()
    a = approx.detach().reshape(-1).float()
    e = a - w  # exact enough: the rounding of a difference is relative to the difference itself
    n = max(w.numel(), 1)
    mse = float(torch.dot(e, e)) / n
    power = float(torch.dot(w, w)) / n
    approx_power = float(torch.dot(a, a)) / n
    dot = float(torch.dot(w, a)) / n
    return {
        "mse": mse,
        "nmse": mse / power if power else math.nan,
        "rel_fro": math.sqrt(mse / power) if power else math.nan,
        "sqnr_db": 10 * math.log10(power / mse) if mse and power else math.inf,
        "max_abs": float(e.abs().max()) if e.numel() else 0.0,
        "cosine": dot / math.sqrt(power * approx_power) if power and approx_power else math.nan,
    }


@cache
def lloyd_max_mse(levels: int, iterations: int = 2000, tol: float = 1e-13) -> float:
    """MSE of the optimal (Lloyd-Max) scalar quantizer of N(0, 1) with ``levels`` levels, via scipy."""
    from scipy.stats import norm

    # Start from equal-probability cells; Lloyd's iteration converges monotonically for the Gaussian.
    centroids = norm.ppf((np.arange(levels) + 0.5) / levels)
    mse = math.inf
    for _ in range(iterations):
        edges = np.concatenate([[-np.inf], (centroids[:-1] + centroids[1:]) / 2, [np.inf]])
        lo, hi = edges[:-1], edges[1:]
        mass = norm.cdf(hi) - norm.cdf(lo)
        centroids = (norm.pdf(lo) - norm.pdf(hi)) / mass  # E[X | lo < X < hi]
        # E[(X - c)²] over each cell = E[X²] - 2c·E[X] + c²·P, summed.
        second = mass + _x_pdf(lo) - _x_pdf(hi)
        first = norm.pdf(lo) - norm.pdf(hi)
        new_mse = float(np.sum(second - 2 * centroids * first + centroids**2 * mass))
        if abs(mse - new_mse) < tol:
            return new_mse
        mse = new_mse
    return mse


def _x_pdf(x: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    with np.errstate(invalid="ignore"):  # ±inf · 0 at the outer edges; those terms are 0
        return np.where(np.isfinite(x), x * norm.pdf(x), 0.0)


def gaussian_rate_distortion(bits_per_param: float, variance: float = 1.0) -> float:
    """Shannon's lower bound on the MSE of any code at R bits per sample for N(0, σ²): D = σ²·2^(−2R)."""
    return variance * 2.0 ** (-2.0 * bits_per_param)


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F: the error the layer's output sees on real inputs.

    fp32 matmuls (float64 would dominate a sweep's time); the difference W − Ŵ is formed first, so the
    error term's rounding is relative to the error itself and a near-zero error stays near zero."""
    w, x = weight.detach().float(), x.detach().float()
    reference = float((x @ w.T).norm())
    error = float((x @ (w - approx.detach().float()).T).norm())
    return error / reference if reference else math.nan


def activation_weighted_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """Σ_j E[x_j²]·‖W[:, j] − Ŵ[:, j]‖²: the rounding error of each input column weighted by its mean
    squared activation (llama.cpp's importance matrix), = E‖x (W − Ŵ)ᵀ‖² with the cross terms dropped."""
    importance = x.detach().float().pow(2).mean(dim=0)
    column_error = (weight.detach().float() - approx.detach().float()).pow(2).sum(dim=0)
    return float(torch.dot(importance, column_error))


def weight_statistics(weight: torch.Tensor) -> dict[str, float]:
    """Shape of the weight distribution: Pearson kurtosis (3 for a Gaussian) and max |w| / RMS(w)."""
    w = weight.detach().reshape(-1).double()
    centred = w - w.mean()
    variance = float(centred.pow(2).mean())
    rms = math.sqrt(float(w.pow(2).mean()))
    return {
        "kurtosis": float(centred.pow(4).mean()) / variance**2 if variance else math.nan,
        "max_over_rms": float(w.abs().max()) / rms if rms else math.nan,
    }
