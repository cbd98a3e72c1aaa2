"""Perplexity protocols: window arithmetic against lm-eval's own generator, and agreement with a plain
per-window ``model(input_ids, labels=...)`` loop written here independently of harness.evaluate."""

from __future__ import annotations

import gc
import math
import warnings
import weakref
from functools import cache

import pytest
import torch
from conftest import scaled_llama, tiny_gemma3, tiny_llama
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import LlamaForCausalLM

import harness.evaluate.logits as perplexity_module
from harness.data import text_counts
from harness.evaluate.divergence import evaluate_against
from harness.evaluate.logits import LogitHead, reduce_logits
from harness.evaluate.reference import BaseReference, ReferenceStorage
from harness.evaluate.windows import PerplexityProtocol, make_windows, perplexity

BOS = 1


def stream(n: int, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (1, n), generator=g)
    tokens[0, 0] = BOS
    return tokens


@cache
def smollm2() -> tuple[torch.nn.Module, object]:
    """The real SmolLM2-135M in fp32 and its tokenizer, through harness.models (once per test session): fp32,
    so that an independent loop's sum agrees to 1e-4, finer than one token's NLL (~2e-3 of 508 tokens')."""
    from harness.models import load_model, load_tokenizer

    loaded = load_model("smollm2-135m", torch.float32)
    return loaded.model.eval(), load_tokenizer("smollm2-135m", torch.float32)


# ----------------------------------------------------------------------------- independent reference loops


def window_nll(model: torch.nn.Module, ids: list[int], n_scored: int) -> tuple[float, int]:
    """Summed NLL of the last ``n_scored`` tokens of ``ids`` given the ones before, via HF's own loss."""
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[0, : len(ids) - n_scored] = -100
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=labels).loss
    return float(loss) * n_scored, n_scored


def reference_disjoint(model: torch.nn.Module, tokens: torch.Tensor, L: int) -> tuple[float, int]:
    """lm-eval's loglikelihood_rolling: its own window generator, then (context+continuation)[-(L+1):]."""
    t = tokens[0].tolist()
    total, count = 0.0, 0
    for context, continuation in map(
        make_disjoint_window, get_rolling_token_windows(t[1:], t[0], max_seq_len=L, context_len=1)
    ):
        whole = (context + continuation)[-(L + 1) :]
        nll, n = window_nll(model, whole, len(continuation))
        total, count = total + nll, count + n
    return total, count


def reference_sliding(model: torch.nn.Module, tokens: torch.Tensor, L: int, stride: int) -> tuple[float, int]:
    """The Hugging Face guide's loop; the count is of the labels that survive the shift (the guide's
    ``num_valid_tokens - batch_size`` is exact only when the first label is valid)."""
    n = tokens.shape[1]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + L, n)
        input_ids = tokens[:, begin:end]
        labels = input_ids.clone()
        labels[:, : -(end - prev_end)] = -100
        valid = int((labels[:, 1:] != -100).sum())
        if valid:
            with torch.no_grad():
                total += float(model(input_ids=input_ids, labels=labels).loss) * valid
            count += valid
        prev_end = end
        if end == n:
            break
    return total, count


def reference_llamacpp(model: torch.nn.Module, tokens: torch.Tensor, L: int, bos: int | None):
    """llama-perplexity: chunk i is tokens[iL:(i+1)L] with its first token set to BOS; logits first..L-2."""
    total, count = 0.0, 0
    first = L // 2
    for i in range(tokens.shape[1] // L):
        ids = tokens[0, i * L : (i + 1) * L].tolist()
        if bos is not None:
            ids[0] = bos
        nll, n = window_nll(model, ids, L - 1 - first)
        total, count = total + nll, count + n
    return total, count


# --------------------------------------------------------------------------------------- window arithmetic


@pytest.mark.parametrize("n", [2, 5, 64, 65, 66, 100, 129, 200])
@pytest.mark.parametrize("L", [2, 7, 32, 64])
def test_disjoint_windows_are_lm_evals(n: int, L: int) -> None:
    positions = list(range(n))  # token values equal their positions, so windows read as index ranges
    expected = []
    for context, continuation in map(
        make_disjoint_window,
        get_rolling_token_windows(positions[1:], positions[0], max_seq_len=L, context_len=1),
    ):
        whole = (context + continuation)[-(L + 1) :]
        expected.append((whole[:-1], continuation))
    got = [
        (positions[w.start : w.end], positions[w.end - w.n_scored + 1 : w.end + 1])
        for w in make_windows(PerplexityProtocol("disjoint", L), n)
    ]
    assert got == expected


@pytest.mark.parametrize("n", [2, 3, 50, 64, 65, 129, 300])
@pytest.mark.parametrize(("L", "stride"), [(16, 8), (16, 16), (16, 1), (32, 5), (8, None)])
def test_sliding_scores_each_token_once(n: int, L: int, stride: int | None) -> None:
    protocol = PerplexityProtocol("sliding", L, stride)
    assert protocol.stride == (stride or L // 2)
    windows = make_windows(protocol, n)
    targets = [t for w in windows for t in range(w.end - w.n_scored + 1, w.end + 1)]
    assert all(w.length <= L - 1 and w.n_scored <= w.length for w in windows)
    if protocol.stride < L:
        assert targets == list(range(1, n))
    else:  # stride == L: the guide drops each window's first label in the shift
        assert targets == [t for t in range(1, n) if t % L != 0]


@pytest.mark.parametrize(("n", "L"), [(64, 64), (100, 16), (129, 32), (40, 5)])
def test_llamacpp_windows(n: int, L: int) -> None:
    windows = make_windows(PerplexityProtocol("llamacpp", L), n)
    first = L // 2
    assert len(windows) == n // L
    for i, w in enumerate(windows):
        assert (w.start, w.end, w.n_scored) == (i * L, i * L + L - 1, L - 1 - first)
        assert w.end - w.n_scored + 1 == i * L + first + 1  # targets: tokens first+1 .. L-1 of the chunk


def test_protocol_validation() -> None:
    with pytest.raises(ValueError):
        PerplexityProtocol("rolling", 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PerplexityProtocol("disjoint", 64, stride=32)
    with pytest.raises(ValueError):
        PerplexityProtocol("sliding", 64, stride=65)
    with pytest.raises(ValueError):
        make_windows(PerplexityProtocol("llamacpp", 64), 63)


# --------------------------------------------------------------------------- agreement with the plain loops


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.mark.parametrize("n", [300, 257, 100])
def test_disjoint_matches_lm_eval_loop(model: LlamaForCausalLM, n: int) -> None:
    tokens = stream(n)
    result = perplexity(
        model,
        tokens,
        PerplexityProtocol("disjoint", 64),
        text_bytes=1,
        text_words=1,
        bos_token_id=BOS,
        batch_size=3,
        progress=False,
    )
    nll, count = reference_disjoint(model, tokens, 64)
    assert result.n_tokens_scored == count == n - 1
    assert result.nll_sum == pytest.approx(nll, rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result.bos and result.text_fraction == 1.0


@pytest.mark.parametrize(("n", "stride"), [(300, 32), (300, 17), (90, 64)])
def test_sliding_matches_hf_guide_loop(model: LlamaForCausalLM, n: int, stride: int) -> None:
    tokens = stream(n, seed=2)
    result = perplexity(
        model,
        tokens,
        PerplexityProtocol("sliding", 64, stride),
        text_bytes=1,
        text_words=1,
        batch_size=4,
        progress=False,
    )
    nll, count = reference_sliding(model, tokens, 64, stride)
    assert result.n_tokens_scored == count
    assert result.nll_sum == pytest.approx(nll, rel=1e-4)


@pytest.mark.parametrize("bos", [BOS, None])
def test_llamacpp_matches_chunk_loop(model: LlamaForCausalLM, bos: int | None) -> None:
    tokens = stream(300, seed=3)
    result = perplexity(
        model,
        tokens,
        PerplexityProtocol("llamacpp", 64),
        text_bytes=3000,
        text_words=500,
        bos_token_id=bos,
        batch_size=2,
        progress=False,
    )
    nll, count = reference_llamacpp(model, tokens, 64, bos)
    assert result.n_tokens_scored == count == 4 * 31
    assert result.nll_sum == pytest.approx(nll, rel=1e-4)
    assert result.text_fraction == pytest.approx(count / 299)
    assert result.n_bytes == pytest.approx(3000 * count / 299)
    assert result.bits_per_byte == pytest.approx(nll / (result.n_bytes * math.log(2)), rel=1e-4)
    assert result.word_perplexity == pytest.approx(math.exp(nll / (500 * count / 299)), rel=1e-4)
    assert result.byte_perplexity == pytest.approx(2**result.bits_per_byte, rel=1e-6)


def test_bos_replacement_changes_llamacpp_only_when_it_should(model: LlamaForCausalLM) -> None:
    tokens = stream(256, seed=4)
    protocol = PerplexityProtocol("llamacpp", 64)
    kw = {"text_bytes": 1, "text_words": 1, "progress": False}
    with_bos = perplexity(model, tokens, protocol, bos_token_id=BOS, **kw)
    without = perplexity(model, tokens, protocol, **kw)
    assert with_bos.bos and not without.bos
    assert with_bos.nll_sum != without.nll_sum
    tokens[0, 0] = 7  # the stream does not start with BOS: nothing is replaced
    assert not perplexity(model, tokens, protocol, bos_token_id=BOS, **kw).bos


def test_softcapped_head_split_matches_forward() -> None:
    """Gemma-style final logit softcapping is applied on the split path exactly as the forward does."""
    gemma = tiny_gemma3(final_logit_softcapping=3.0, sliding_window=32)
    tokens = stream(200, seed=5)
    result = perplexity(
        gemma, tokens, PerplexityProtocol("disjoint", 48), text_bytes=1, text_words=1, progress=False
    )
    nll, _ = reference_disjoint(gemma, tokens, 48)
    assert result.nll_sum == pytest.approx(nll, rel=1e-4)


def test_fallback_when_split_does_not_reproduce_forward() -> None:
    torch.manual_seed(0)
    scaled = scaled_llama()
    tokens = stream(200, seed=6)
    with pytest.warns(UserWarning, match="full logits"):
        result = perplexity(
            scaled, tokens, PerplexityProtocol("llamacpp", 64), text_bytes=1, text_words=1, progress=False
        )
    scale_ref = 0.0
    first = 32
    for i in range(200 // 64):
        with torch.no_grad():
            logits = scaled(input_ids=tokens[:, i * 64 : (i + 1) * 64]).logits[0].float()
        lp = torch.log_softmax(logits, -1)[first:63]
        scale_ref -= float(lp.gather(1, tokens[0, i * 64 + first + 1 : (i + 1) * 64, None]).sum())
    assert result.nll_sum == pytest.approx(scale_ref, rel=1e-4)


def test_reduce_logits_matches_whole_row_reductions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 512 columns over 2,500 (a ragged last tile), with the largest logit tied across two tiles,
    tied within one, and first met in the last: log-sum-exp, first argmax, picked logits and the dot product
    equal whole-row computations."""
    monkeypatch.setattr(perplexity_module, "VOCAB_SLICE", 512)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 2500, generator=g) * 6
    logits[3, [100, 1900]] = logits[3].max() + 1.0  # a tie: the first one is the argmax
    logits[4, [600, 700]] = logits[4].max() + 1.0  # a tie within one tile
    logits[5, 2400] = logits[5].max() + 1.0  # a maximum the last tile raises
    targets = torch.randint(0, 2500, (37,), generator=g)
    index = torch.randint(0, 2500, (37, 9), generator=g)
    weights = torch.rand(37, 2500, generator=g)
    scores = reduce_logits(perplexity_module.column_tiles(logits.clone()), targets, index, weights)
    whole = logits.double()
    assert torch.allclose(scores.lse, torch.logsumexp(whole, dim=1), rtol=0, atol=1e-6)
    assert torch.equal(scores.argmax, logits.argmax(dim=1))
    assert scores.argmax[3:6].tolist() == [100, 600, 2400]
    assert torch.equal(scores.picked[:, 0], logits.gather(1, targets[:, None])[:, 0])
    assert torch.equal(scores.picked[:, 1:], logits.gather(1, index))
    assert scores.dot is not None
    assert torch.allclose(scores.dot, (weights.double() * whole).sum(dim=1), rtol=1e-12, atol=0)
    expected = torch.log_softmax(whole, dim=1)
    assert torch.allclose(scores.nll, -expected.gather(1, targets[:, None])[:, 0], atol=1e-6)
    assert torch.allclose(scores.log_probs(), expected.gather(1, index), atol=1e-6)


@pytest.mark.parametrize("hooked_head", [False, True])
def test_vocabulary_slices_and_passes_do_not_change_the_numbers(
    monkeypatch: pytest.MonkeyPatch, hooked_head: bool
) -> None:
    """Perplexity, KLD and top-1 through the head's weight in slices of 37 columns and passes of 5 rows (or,
    with a hook on the head, through its output rows) equal those of one slice and one pass per batch."""
    model = tiny_llama(seed=3)
    tokens = stream(300, seed=7)
    protocol = PerplexityProtocol("disjoint", 64)
    kw = {"text_bytes": 1, "text_words": 1, "bos_token_id": BOS, "progress": False}
    reference = BaseReference.build(model, tokens, protocol, storage=ReferenceStorage(k=16, samples=8), **kw)
    quantized = tiny_llama(seed=3)
    with torch.no_grad():
        for param in quantized.model.layers.parameters():
            param.copy_(param.half().float() + 0.01 * torch.randn_like(param))

    def numbers() -> tuple[torch.Tensor, ...]:
        ppl = perplexity(quantized, tokens, protocol, **kw)
        against, divergence = evaluate_against(quantized, reference, progress=False)
        return (
            torch.from_numpy(ppl.nll),
            torch.from_numpy(against.nll),
            torch.from_numpy(divergence.kld),
            torch.from_numpy(divergence.top1_match),
        )

    whole = numbers()
    if hooked_head:
        quantized.lm_head.register_forward_hook(lambda module, args, out: out)
    monkeypatch.setattr(perplexity_module, "VOCAB_SLICE", 37)  # 256 = 6 × 37 + 34: a ragged last slice
    monkeypatch.setattr(perplexity_module, "ROWS_PER_PASS", 5)
    sliced = numbers()
    assert torch.allclose(sliced[0], whole[0], rtol=0, atol=1e-6)
    assert torch.allclose(sliced[1], whole[1], rtol=0, atol=1e-6)
    assert torch.allclose(sliced[2], whole[2], rtol=0, atol=1e-6)
    assert torch.equal(sliced[3], whole[3]) and not bool(whole[3].all())


def test_a_head_with_hooks_is_checked_and_used_through_its_output() -> None:
    """A head whose hooks change its output (as a quantized lm_head's dtype casts do) is checked and used
    through its output rows, not its weight: it reproduces the forward, so nothing falls back to full
    logits."""
    model = tiny_llama(seed=4)
    model.lm_head.register_forward_hook(lambda module, args, out: out * 0.5)
    tokens = stream(200, seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = perplexity(
            model, tokens, PerplexityProtocol("disjoint", 64), text_bytes=1, text_words=1, progress=False
        )
    assert not [w for w in caught if "full logits" in str(w.message)]
    nll, _ = reference_disjoint(model, tokens, 64)
    assert result.nll_sum == pytest.approx(nll, rel=1e-4)


def test_text_counts_per_document() -> None:
    class Tok:
        all_special_ids = (0, 1)

        def decode(self, ids: list[int]) -> str:
            return "".join({5: "héllo", 6: " world", 7: "  ", 8: "x"}[i] for i in ids)

    tokens = torch.tensor([[1, 5, 6, 0, 8, 0, 7, 0, 5]])
    # documents: "héllo world" (12 bytes, 2 words), "x" (1, 1), "" (dropped), "héllo" (6, 1)
    assert text_counts(Tok(), tokens) == (19, 4)


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.integration
def test_smollm2_three_protocols() -> None:
    from harness.data import token_splits

    model, tokenizer = smollm2()
    tokens = token_splits(
        "wikipedia", tokenizer, calibration_sequences=0, calibration_length=8, eval_tokens=1024
    ).evaluation
    n_bytes, n_words = text_counts(tokenizer, tokens)
    assert n_bytes > 2 * 1024 and n_words > 100
    kw = {
        "text_bytes": n_bytes,
        "text_words": n_words,
        "bos_token_id": tokenizer.bos_token_id,
        "progress": False,
    }
    results = {
        name: perplexity(model, tokens, PerplexityProtocol(name, 256), **kw)  # type: ignore[arg-type]
        for name in ("disjoint", "sliding", "llamacpp")
    }
    for r in results.values():
        assert 3 < r.ppl < 200 and 0.3 < r.bits_per_byte < 3
    assert results["disjoint"].n_tokens_scored == results["sliding"].n_tokens_scored == 1023
    assert results["llamacpp"].n_tokens_scored == 4 * 127
    # more context per scored token, lower perplexity
    assert results["sliding"].ppl < results["disjoint"].ppl
    nll, _ = reference_llamacpp(
        model, tokens, 256, tokenizer.bos_token_id if results["llamacpp"].bos else None
    )
    assert results["llamacpp"].nll_sum == pytest.approx(nll, rel=1e-4)


def test_a_models_head_is_checked_once_and_again_when_its_parts_change() -> None:
    """``LogitHead.of``: one probe forward per model, whatever its weights become in place; a new check when
    the output head module is replaced; and the cache never keeps a model alive."""
    model = tiny_llama().requires_grad_(False)
    probe = torch.arange(3, 19)[None]  # a (1, N) stream
    first = LogitHead.of(model, probe)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # a config quantizes in place
    assert LogitHead.of(model, probe) is first
    model.lm_head = torch.nn.Linear(64, 256, bias=False).requires_grad_(False)  # adapters on the head
    second = LogitHead.of(model, probe)
    assert second is not first and second.split is not None and second.split.head is model.lm_head
    alive = weakref.ref(model)
    del model, first, second
    gc.collect()
    assert alive() is None
