"""16-bit products widened to fp32 on CPUs without native 16-bit GEMMs: the same arithmetic as a native kernel
(exact products, fp32 sums, one rounding), so the same numbers up to summation order."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch.overrides import _get_current_function_mode_stack

from harness import gemm
from harness.gemm import WidenedProducts


def _pair(m: int, k: int, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_widened_linear_is_the_fp32_product_rounded_once(dtype: torch.dtype) -> None:
    x, w = _pair(64, 320, 96, dtype)
    bias = torch.randn(96).to(dtype)
    with WidenedProducts():
        got = F.linear(x, w, bias)
    assert got.dtype == dtype
    assert torch.equal(got, F.linear(x.float(), w.float(), bias.float()).to(dtype))


def test_widened_and_native_kernels_agree_but_for_summation_order() -> None:
    x, w = _pair(256, 640, 512)
    with torch._C.DisableTorchFunction():  # this CPU's own bf16 kernel, even where the mode is entered
        native = torch.mm(x, w.T)
    with WidenedProducts():
        wide = torch.mm(x, w.T)
    same = (wide == native).float().mean().item()
    assert same > 0.99  # 0.99988 of a 2048×640 @ 640×2048 product on an AVX2-only EPYC
    ulp = torch.finfo(torch.bfloat16).eps * native.float().abs().clamp_min(1.0)
    assert ((wide.float() - native.float()).abs() <= ulp).all()


def test_every_product_form_is_widened_and_out_is_honoured() -> None:
    x, w = _pair(8, 32, 16)
    want = (x.float() @ w.float().T).to(torch.bfloat16)
    out = torch.empty(8, 16, dtype=torch.bfloat16)
    with WidenedProducts():
        assert torch.equal(torch.mm(x, w.T, out=out), want) and torch.equal(out, want)
        assert torch.equal(x @ w.T, want) and torch.equal(torch.matmul(x, w.T), want)
        assert torch.equal(x.mm(w.T), want) and torch.equal(x.matmul(w.T), want)
        assert torch.equal(torch.bmm(x[None], w.T[None])[0], want)
        assert torch.equal(torch.addmm(torch.zeros(16, dtype=torch.bfloat16), x, w.T), want)
        mixed = torch.mm(x.float(), w.float().T)  # fp32 products pass through untouched
    assert mixed.dtype == torch.float32


def test_a_wide_head_is_widened_a_chunk_of_rows_at_a_time_with_the_same_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, w = _pair(5, 64, 1000)
    with WidenedProducts():
        whole = F.linear(x, w)
        monkeypatch.setattr(gemm, "LINEAR_CHUNK", 96)
        chunked = F.linear(x, w)
    assert torch.equal(chunked, whole)


def test_gradients_flow_through_a_widened_product() -> None:
    x, w = _pair(4, 8, 3)
    w.requires_grad_(True)
    with WidenedProducts():
        F.linear(x, w).float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16
    assert torch.equal(w.grad, x.float().sum(0).expand(3, 8).to(torch.bfloat16))


def test_a_bf16_model_is_the_same_model_widened() -> None:
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with torch._C.DisableTorchFunction():
            native = model(ids).logits.float().log_softmax(-1)
        with WidenedProducts():
            wide = model(ids).logits.float().log_softmax(-1)
    kld = (native.exp() * (native - wide)).sum(-1).mean().item()
    assert abs(kld) < 1e-4


def test_use_for_enters_the_mode_once_and_only_where_it_is_needed() -> None:
    """Each dtype gets its own mode, entered once per thread where its GEMM is not native (a fresh thread, so
    that modes other tests' model loads left entered in this one do not count)."""

    def modes() -> list[frozenset[torch.dtype]]:
        return [m.dtypes for m in _get_current_function_mode_stack() if isinstance(m, WidenedProducts)]

    def body() -> None:
        gemm.use_for(torch.float32)
        assert modes() == []
        for _ in range(2):
            gemm.use_for(torch.bfloat16)
            gemm.use_for(torch.float16)
        widened = [dtype for dtype in (torch.bfloat16, torch.float16) if not gemm.native(dtype)]
        assert modes() == [frozenset({dtype}) for dtype in widened]
        seen.append(True)

    seen: list[bool] = []
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [True]
    assert gemm.method(torch.float32) == "native"
    assert (gemm.method(torch.bfloat16) == "native") == gemm.native(torch.bfloat16)


def test_a_float16_mode_leaves_bfloat16_products_to_their_own_kernel() -> None:
    x, w = _pair(64, 320, 96)
    with torch._C.DisableTorchFunction():
        own = F.linear(x, w)
    with WidenedProducts(frozenset({torch.float16})):
        passed = F.linear(x, w)
        half = F.linear(x.half(), w.half())
    assert torch.equal(passed, own)
    assert torch.equal(half, F.linear(x.half().float(), w.half().float()).half())
