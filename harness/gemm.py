"""How 16-bit matrix products run on this CPU.

PyTorch computes a bf16 or fp16 GEMM on CPU with oneDNN where the CPU has the instructions for it (AVX-512
with BF16/FP16, AMX). Elsewhere (an AVX2-only x86, for one) it falls back to a generic loop that runs 8-10×
slower than fp32, and over 100× slower for a non-transposed right operand. There every 16-bit product of a
model runs instead as the fp32 product of its widened operands, rounded back to the 16-bit dtype: the
arithmetic a native kernel does (each bf16 × bf16 product is exact in fp32, sums accumulate in fp32, the
output is rounded once) at fp32 speed. Results then differ from a native kernel's by the summation order
alone, as native kernels differ from one another.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

LINEAR_CHUNK = 8192  # output features widened at once: a 262k-word head is never copied to fp32 whole

_PRODUCTS: set[Callable[..., Any]] = {
    F.linear,
    torch.mm,
    torch.matmul,
    torch.addmm,
    torch.bmm,
    torch.Tensor.mm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
}


_SIXTEEN_BIT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@cache
def native(dtype: torch.dtype) -> bool:
    """Whether PyTorch runs ``dtype`` GEMMs on this CPU with oneDNN's native kernels."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def method(dtype: torch.dtype) -> str:
    """How ``dtype`` matrix products run in this thread now, in words."""
    if _widened(dtype):
        return "fp32 products of the widened operands, rounded back (this CPU has no native 16-bit GEMM)"
    if native(dtype):
        return "native"
    return "PyTorch's generic loop (this CPU has no native 16-bit GEMM)"


def _widened(dtype: torch.dtype) -> bool:
    stack = _get_current_function_mode_stack()
    return any(isinstance(m, WidenedProducts) and dtype in m.dtypes for m in stack)


def methods() -> dict[str, str]:
    """``method`` of each 16-bit dtype: logged with every run, and part of a base reference's cache key, since
    a widened product's bits differ from a native kernel's in summation order."""
    return {f"gemm_{name}": method(dtype) for name, dtype in _SIXTEEN_BIT.items()}


class WidenedProducts(TorchFunctionMode):
    """Within it, matrix products whose tensors are all of one of ``dtypes`` on CPU run in fp32 and round
    back. Products of any other dtype (native bf16 beside widened fp16, say) pass untouched."""

    def __init__(self, dtypes: frozenset[torch.dtype] = frozenset({torch.bfloat16, torch.float16})) -> None:
        super().__init__()
        self.dtypes = dtypes

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _PRODUCTS or not self._widens(args):
            return func(*args, **kwargs)
        dtype = args[0].dtype
        if func is F.linear:
            weight = args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _linear(args[0], weight, bias)
        out = kwargs.pop("out", None)
        wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        result = func(*wide, **kwargs).to(dtype)
        return result if out is None else out.copy_(result)

    def _widens(self, args: tuple) -> bool:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return bool(tensors) and all(t.device.type == "cpu" and t.dtype in self.dtypes for t in tensors)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    wide = x.float()
    if weight.shape[0] <= LINEAR_CHUNK:
        return F.linear(wide, weight.float(), None if bias is None else bias.float()).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for lo in range(0, weight.shape[0], LINEAR_CHUNK):
        part = slice(lo, lo + LINEAR_CHUNK)
        out[..., part] = F.linear(wide, weight[part].float(), None if bias is None else bias[part].float())
    return out


def use_for(dtype: torch.dtype) -> None:
    """From now on in this thread, widen ``dtype`` products if this CPU has no native kernel for them
    (``load_model`` calls this for a 16-bit model; again is a no-op)."""
    if native(dtype) or _widened(dtype):
        return
    WidenedProducts(frozenset({dtype})).__enter__()  # left entered: it holds for the thread's remaining work
