"""KL divergence against a cached base: exactness against a float64 computation written here, the top-k
reference as a lower bound within its measured error, the self-check (KLD ~ 0, top-1 agreement exactly 1),
cache hits that skip the model, and atomic cache writes."""

from __future__ import annotations

import copy
import threading
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from torch import nn

from harness import gemm
from harness.evaluate.divergence import evaluate_against
from harness.evaluate.reference import BaseReference, ReferenceStorage
from harness.evaluate.windows import NonFiniteError, PerplexityProtocol, perplexity
from harness.gemm import WidenedProducts

VOCAB, BOS = 256, 1
EXACT16, EXACT32 = ReferenceStorage("exact", dtype="float16"), ReferenceStorage("exact", dtype="float32")


def perturbed(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return other


def stream(n: int, seed: int = 3) -> torch.Tensor:
    tokens = torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    tokens[0, 0] = BOS
    return tokens


def build(
    model: nn.Module, tokens: torch.Tensor, protocol: PerplexityProtocol, cache_dir=None, key="tiny", **kw
) -> BaseReference:
    return BaseReference.build(
        model,
        tokens,
        protocol,
        cache_dir,
        key,
        text_bytes=4 * tokens.shape[1],
        text_words=tokens.shape[1] // 2,
        bos_token_id=BOS,
        progress=False,
        **kw,
    )


def entries(root: Path) -> list[Path]:
    """What a cache folder holds besides the lock files that sit beside its entries."""
    return sorted(p for p in root.iterdir() if p.suffix != ".lock")


def exact_kld(base: nn.Module, other: nn.Module, tokens: torch.Tensor, L: int) -> np.ndarray:
    """KL(base ‖ other) in float64 at llama.cpp's scored positions, from two plain forward passes."""
    out = []
    first = L // 2
    for i in range(tokens.shape[1] // L):
        ids = tokens[:, i * L : (i + 1) * L].clone()
        ids[0, 0] = BOS
        with torch.no_grad():
            p = torch.log_softmax(base(input_ids=ids).logits[0, first : L - 1].double(), -1)
            q = torch.log_softmax(other(input_ids=ids).logits[0, first : L - 1].double(), -1)
        out.append((p.exp() * (p - q)).sum(-1))
    return torch.cat(out).numpy()


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


PROTOCOL = PerplexityProtocol("llamacpp", 64)


@pytest.mark.parametrize("storage", [ReferenceStorage(), EXACT16], ids=["top64", "exact16"])
def test_self_divergence_is_zero_and_top1_is_exact(base: nn.Module, storage: ReferenceStorage) -> None:
    tokens = stream(400)
    reference = build(base, tokens, PROTOCOL, storage=storage)
    ppl, div = evaluate_against(base, reference, progress=False)
    assert div.n_tokens == 6 * 31 == reference.n_tokens
    assert abs(div.kld_mean) < 1e-6 and abs(div.kld.max()) < 1e-4
    assert div.top1_agreement == 1.0
    assert div.storage == storage.label and div.protocol == "llamacpp"
    direct = perplexity(
        base, tokens, PROTOCOL, text_bytes=4 * 400, text_words=200, bos_token_id=BOS, progress=False
    )
    assert ppl.nll_sum == pytest.approx(direct.nll_sum, rel=1e-6)
    assert reference.perplexity().nll_sum == pytest.approx(direct.nll_sum, rel=1e-6)
    assert ppl.bits_per_byte == pytest.approx(direct.bits_per_byte, rel=1e-6)


@pytest.mark.parametrize(("storage", "tolerance"), [(EXACT32, 1e-4), (EXACT16, 2e-3)], ids=["fp32", "fp16"])
def test_kld_is_exact_over_the_vocabulary(
    base: nn.Module, storage: ReferenceStorage, tolerance: float
) -> None:
    tokens = stream(300, seed=4)
    other = perturbed(base)
    reference = build(base, tokens, PROTOCOL, storage=storage)
    ppl, div = evaluate_against(other, reference, progress=False)
    exact = exact_kld(base, other, tokens, 64)
    assert exact.mean() > 1e-3  # the perturbation is visible
    np.testing.assert_allclose(div.kld, exact, rtol=tolerance, atol=5e-6)
    assert div.kld_mean == pytest.approx(exact.mean(), rel=tolerance)
    assert 0.0 < div.top1_agreement < 1.0
    np.testing.assert_array_equal(div.base_nll, reference.nll)
    direct = perplexity(
        other, tokens, PROTOCOL, text_bytes=1200, text_words=150, bos_token_id=BOS, progress=False
    )
    assert ppl.nll_sum == pytest.approx(direct.nll_sum, rel=1e-6)
    np.testing.assert_allclose(ppl.nll, direct.nll, rtol=1e-5, atol=1e-6)  # the same tokens, in order


@pytest.mark.parametrize(("k", "tolerance"), [(16, 0.03), (64, 0.01), (VOCAB, 2e-4)])
def test_topk_kld_estimates_the_exact_kld(base: nn.Module, k: int, tolerance: float) -> None:
    """Head terms exact, the tail's cross-entropy from samples of the base's tail: the mean KLD within a
    few percent even on a flat random model whose tail holds most of the mass; exact when k covers the
    vocabulary (no tail)."""
    tokens = stream(300, seed=4)
    other = perturbed(base, scale=0.2)
    exact = exact_kld(base, other, tokens, 64)
    reference = build(base, tokens, PROTOCOL, storage=ReferenceStorage("topk", k=k))
    _, div = evaluate_against(other, reference, progress=False)
    assert div.kld_mean == pytest.approx(exact.mean(), rel=tolerance)
    assert reference.bytes_per_token == 8 * (k + 48) + 24
    if k == VOCAB:
        np.testing.assert_allclose(div.kld, exact, rtol=2e-4, atol=1e-5)
    again = build(base, tokens, PROTOCOL, storage=ReferenceStorage("topk", k=k))  # the same samples
    np.testing.assert_array_equal(again.arrays["tail_index"], reference.arrays["tail_index"])


def test_any_protocol_gives_the_windows(base: nn.Module) -> None:
    tokens = stream(200, seed=5)
    for protocol in (PerplexityProtocol("disjoint", 64), PerplexityProtocol("sliding", 64, 16)):
        reference = build(base, tokens, protocol)
        assert reference.n_tokens == 199
        div = evaluate_against(perturbed(base), reference, progress=False)[1]
        assert div.kld_mean > 0 and div.protocol == protocol.name


class Forbidden(RuntimeError):
    pass


def forbid_forward(model: nn.Module, after: int = 0) -> None:
    """Make every module forward raise after ``after`` calls of the top-level forward."""
    calls = {"n": 0}

    def hook(module: nn.Module, args: tuple) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise Forbidden("forward called")

    model.get_decoder().register_forward_pre_hook(hook)


def test_cache_hit_does_not_run_the_model(base: nn.Module, tmp_path: Path) -> None:
    tokens = stream(300, seed=6)
    first = build(base, tokens, PROTOCOL, tmp_path, storage=EXACT16)
    assert first.path is not None and isinstance(first.arrays["logprobs"], np.memmap)
    assert entries(tmp_path) == [first.path]
    blocked = copy.deepcopy(base)
    forbid_forward(blocked)
    again = build(blocked, tokens, PROTOCOL, tmp_path, storage=EXACT16)  # same weights, key, tokens: a hit
    assert again.path == first.path
    np.testing.assert_array_equal(again.arrays["logprobs"], first.arrays["logprobs"])
    np.testing.assert_array_equal(again.top1, first.top1)
    assert again.meta["n_tokens_scored"] == again.n_tokens == 4 * 31
    assert again.meta["bytes"] == again.n_tokens * VOCAB * 2
    # anything else that changes the numbers is a miss
    with pytest.raises(Forbidden):
        build(blocked, tokens, PROTOCOL, tmp_path)  # another storage
    with pytest.raises(Forbidden):
        build(blocked, tokens, PROTOCOL, tmp_path, key="other", storage=EXACT16)
    with pytest.raises(Forbidden):
        build(blocked, tokens, PerplexityProtocol("llamacpp", 32), tmp_path)
    with pytest.raises(Forbidden):
        build(blocked, stream(300, seed=7), PROTOCOL, tmp_path)
    with pytest.raises(Forbidden):
        build(perturbed(blocked), tokens, PROTOCOL, tmp_path)
    # so is other arithmetic: a bf16 pass's bits can depend on its GEMM shapes and thread split
    with pytest.raises(Forbidden):
        build(blocked, tokens, PROTOCOL, tmp_path, storage=EXACT16, batch_size=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(Forbidden):
            build(blocked, tokens, PROTOCOL, tmp_path, storage=EXACT16)
    finally:
        torch.set_num_threads(threads)

    # and another summation order: bf16 products widened where this thread runs them unwidened, or the
    # reverse in a fresh thread, which has no mode entered
    def other_products() -> None:
        with pytest.raises(Forbidden):
            build(blocked, tokens, PROTOCOL, tmp_path, storage=EXACT16)
        checked.append(True)

    checked: list[bool] = []
    if gemm.method(torch.bfloat16).startswith("fp32 products"):
        thread = threading.Thread(target=other_products)
        thread.start()
        thread.join()
    else:
        with WidenedProducts(frozenset({torch.bfloat16})):
            other_products()
    assert checked == [True]
    assert entries(tmp_path) == [first.path]  # failed builds leave nothing behind


def test_cache_write_is_atomic(base: nn.Module, tmp_path: Path) -> None:
    tokens = stream(400, seed=8)
    crashing = copy.deepcopy(base)
    forbid_forward(crashing, after=2)  # the probe and the first batch run, then the build dies
    with pytest.raises(Forbidden):
        build(crashing, tokens, PROTOCOL, tmp_path, batch_size=2)
    assert entries(tmp_path) == []
    done = build(base, tokens, PROTOCOL, tmp_path, batch_size=2)
    stored = [
        ".checksums.json",
        "meta.json",
        "stats.npz",
        "tail_index.npy",
        "tail_logprob.npy",
        "topk_index.npy",
        "topk_logprob.npy",
    ]
    assert sorted(p.name for p in done.path.iterdir()) == stored
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert abs(evaluate_against(base, done, progress=False)[1].kld_mean) < 1e-6


@pytest.mark.parametrize("damage", ["truncate", "flip a bit", "delete"])
def test_a_damaged_reference_is_rebuilt_once_with_the_same_numbers(
    base: nn.Module, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens, other = stream(300, seed=9), perturbed(base)
    clean = build(base, tokens, PROTOCOL, tmp_path)
    expected = evaluate_against(other, clean, progress=False)[1].kld
    target = clean.path / "topk_logprob.npy"
    if damage == "delete":  # while the reference is open: what was read stays readable, the entry is not
        target.unlink()
        assert np.isfinite(clean.arrays["topk_logprob"]).all()
    else:  # a new file in place of the old, so that the open reference's memory map stays valid
        data = bytearray(target.read_bytes())
        damaged = data[:-100] if damage == "truncate" else data[:-8] + bytes([data[-8] ^ 1]) + data[-7:]
        target.with_suffix(".new").write_bytes(damaged)
        target.with_suffix(".new").replace(target)
    capsys.readouterr()
    rebuilt = build(base, tokens, PROTOCOL, tmp_path)
    warning = capsys.readouterr().err.strip().splitlines()
    assert (
        len(warning) == 1 and f"cache entry {clean.path}" in warning[0] and "building it again" in warning[0]
    )
    np.testing.assert_array_equal(evaluate_against(other, rebuilt, progress=False)[1].kld, expected)
    again = build(base, tokens, PROTOCOL, tmp_path)  # whole now: used as it is, without a word
    assert again.path == rebuilt.path and capsys.readouterr().err == ""


def test_a_non_finite_base_is_never_cached(base: nn.Module, tmp_path: Path) -> None:
    broken = copy.deepcopy(base)
    with torch.no_grad():
        broken.model.norm.weight[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the base model: 100\.00% of 124 scored positions"):
        build(broken, stream(300, seed=10), PROTOCOL, tmp_path)
    assert entries(tmp_path) == []


def test_vocab_mismatch_is_an_error(base: nn.Module) -> None:
    tokens = stream(200)
    reference = build(base, tokens, PROTOCOL)
    reference.vocab_size = 128
    with pytest.raises(ValueError, match="logits"):
        evaluate_against(base, reference, progress=False)


# ------------------------------------------------------------------------------------------- real model


@cache
def smollm2() -> tuple[nn.Module, object]:
    from harness.models import load_model, load_tokenizer

    loaded = load_model("smollm2-135m")
    return loaded.model.eval(), load_tokenizer("smollm2-135m")


@pytest.mark.integration
def test_smollm2_int4_divergence(tmp_path: Path) -> None:
    from harness.data import text_counts, token_splits
    from harness.quant.quantize import QuantConfig, fake_quant

    model, tokenizer = smollm2()
    tokens = token_splits(
        "wikipedia", tokenizer, calibration_sequences=0, calibration_length=8, eval_tokens=1024
    ).evaluation
    n_bytes, n_words = text_counts(tokenizer, tokens)
    protocol = PerplexityProtocol("llamacpp", 256)
    reference = BaseReference.build(
        model,
        tokens,
        protocol,
        tmp_path,
        "smollm2-135m|bfloat16",
        text_bytes=n_bytes,
        text_words=n_words,
        bos_token_id=tokenizer.bos_token_id,
        storage=EXACT16,
        progress=False,
    )
    assert reference.bytes_per_token == pytest.approx(2 * 49152 + 32)
    base_ppl, base_div = evaluate_against(model, reference, progress=False)
    assert abs(base_div.kld_mean) < 1e-4 and base_div.top1_agreement == 1.0
    assert base_ppl.nll_sum == pytest.approx(reference.perplexity().nll_sum, rel=1e-5)

    originals = {}
    config = QuantConfig("int4", 256)
    try:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and ".layers." in name:
                    originals[name] = module.weight.data
                    module.weight.data = fake_quant(module.weight.data, config)
        assert len(originals) == 30 * 7
        ppl, div = evaluate_against(model, reference, progress=False)
        exact32 = BaseReference.build(
            _restored(model, originals),
            tokens,
            protocol,
            None,
            text_bytes=n_bytes,
            text_words=n_words,
            bos_token_id=tokenizer.bos_token_id,
            storage=EXACT32,
            progress=False,
        )
    finally:
        _restored(model, originals)
    assert 1e-3 < div.kld_mean < 2.0 and np.percentile(div.kld, 99) > div.kld_mean
    assert 0.3 < div.top1_agreement < 0.8  # int4 at block 256 in bf16: measured 0.48-0.49 on two CPUs
    assert ppl.ppl > base_ppl.ppl
    # storing the base in float16 instead of float32 moves the mean KLD by a negligible amount
    assert div.kld_mean == pytest.approx(_kld_with(model, originals, config, exact32), rel=1e-3)


def _restored(model: nn.Module, originals: dict[str, torch.Tensor]) -> nn.Module:
    for name, module in model.named_modules():
        if name in originals:
            module.weight.data = originals[name]
    return model


def _kld_with(model: nn.Module, originals: dict, config, reference: BaseReference) -> float:
    from harness.quant.quantize import fake_quant

    try:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name in originals:
                    module.weight.data = fake_quant(originals[name], config)
        return evaluate_against(model, reference, progress=False)[1].kld_mean
    finally:
        _restored(model, originals)
