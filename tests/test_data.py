"""Corpora and token splits: deterministic, disjoint at the document level, clear one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from harness.assets import ensure
from harness.data import DataError, TokenSplits, is_calibration_doc, load_texts, token_splits

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def _docs(n: int) -> list[str]:
    """Documents of varied length, each opening with its own id word, so tokens trace back to documents."""
    return [f"doc{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + i % 17)) for i in range(n)]


def _tokenizer(n_docs: int, bos: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate([*specials, *WORDS, *(f"doc{i}" for i in range(n_docs))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", bos_token="<s>" if bos else None
    )


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(_docs(400))))
    return f"file:{path}"


def _doc_ids(tokens: torch.Tensor, tokenizer: PreTrainedTokenizerFast) -> set[str]:
    return {t for t in tokenizer.convert_ids_to_tokens(tokens.flatten().tolist()) if t.startswith("doc")}


def _split(corpus: str, tokenizer: PreTrainedTokenizerFast, **sizes: int) -> TokenSplits:
    sizes = {"calibration_sequences": 4, "calibration_length": 32, "eval_tokens": 300, **sizes}
    return token_splits(corpus, tokenizer, **sizes)


def test_shapes_dtypes_bos_and_determinism(corpus: str) -> None:
    tokenizer = _tokenizer(400)
    first, second = _split(corpus, tokenizer), _split(corpus, tokenizer)
    assert first.calibration.shape == (4, 32) and first.calibration.dtype == torch.int64
    assert first.evaluation.shape == (1, 300) and first.evaluation.dtype == torch.int64
    assert (first.calibration[:, 0] == tokenizer.bos_token_id).all()
    assert first.evaluation[0, 0] == tokenizer.bos_token_id
    assert (first.evaluation[0, 1:] != tokenizer.bos_token_id).all()
    assert torch.equal(first.calibration, second.calibration) and torch.equal(
        first.evaluation, second.evaluation
    )
    assert first.corpus == corpus and (first.n_docs_cal, first.n_docs_eval) == (
        second.n_docs_cal,
        second.n_docs_eval,
    )


def test_calibration_and_evaluation_share_no_document(corpus: str) -> None:
    tokenizer = _tokenizer(400)
    splits = _split(corpus, tokenizer, calibration_sequences=8, eval_tokens=1000)
    cal, ev = _doc_ids(splits.calibration, tokenizer), _doc_ids(splits.evaluation, tokenizer)
    assert cal and ev and not cal & ev
    assert (len(cal), len(ev)) == (splits.n_docs_cal, splits.n_docs_eval)
    by_id = {doc.split()[0]: doc for doc in _docs(400)}
    assert all(is_calibration_doc(by_id[i]) for i in cal) and not any(
        is_calibration_doc(by_id[i]) for i in ev
    )


def test_evaluation_ignores_calibration_settings_and_grows_by_prefix(corpus: str) -> None:
    tokenizer = _tokenizer(400)
    base = _split(corpus, tokenizer)
    assert torch.equal(
        _split(corpus, tokenizer, calibration_sequences=9, calibration_length=20).evaluation, base.evaluation
    )
    assert torch.equal(_split(corpus, tokenizer, eval_tokens=600).evaluation[:, :300], base.evaluation)
    assert _split(corpus, tokenizer, calibration_sequences=0).calibration.shape == (0, 32)


def test_documents_are_joined_in_file_order_with_eos(corpus: str) -> None:
    tokenizer = _tokenizer(400)
    eval_docs = [doc for doc in _docs(400) if not is_calibration_doc(doc)]
    expected = [tokenizer.bos_token_id]
    for doc in eval_docs[:3]:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert _split(corpus, tokenizer).evaluation[0, : len(expected)].tolist() == expected


def test_without_bos_rows_are_all_text(corpus: str) -> None:
    for tokenizer, add_bos in ((_tokenizer(400, bos=False), True), (_tokenizer(400), False)):
        splits = _split(corpus, tokenizer, add_bos=add_bos)
        assert splits.evaluation.shape == (1, 300)
        assert tokenizer.convert_ids_to_tokens(splits.calibration[0, 0].item()).startswith("doc")
        assert tokenizer.convert_ids_to_tokens(splits.evaluation[0, 0].item()).startswith("doc")


def test_too_small_corpus_says_how_many_tokens(corpus: str) -> None:
    tokenizer = _tokenizer(400)
    with pytest.raises(
        DataError, match=r"has only \d+ evaluation tokens in \d+ documents; lower eval_tokens"
    ):
        _split(corpus, tokenizer, eval_tokens=10**6)
    with pytest.raises(DataError, match=r"has \d+ calibration tokens in \d+ documents, fewer than 1000 x 31"):
        _split(corpus, tokenizer, calibration_sequences=1000)
    with pytest.raises(DataError, match="calibration_length > 1"):
        _split(corpus, tokenizer, calibration_length=1)


def test_txt_file_splits_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("First paragraph\nstill first.\n\n\n  Second.  \n \n\nThird.\n")
    assert load_texts(f"file:{path}") == ["First paragraph\nstill first.", "Second.", "Third."]


def test_jsonl_file_text_field_or_only_string_field(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one", "title": "t"}\n\n{"body": "two", "n": 3}\n{"text": "  "}\n')
    assert load_texts(f"file:{path}") == ["one", "two"]
    path.write_text('{"a": "x", "b": "y"}\n')
    with pytest.raises(DataError, match=r'rows\.jsonl:1: no "text" field and 2 string fields'):
        load_texts(f"file:{path}")
    path.write_text("{oops\n")
    with pytest.raises(DataError, match=r"rows\.jsonl:1: not valid JSON"):
        load_texts(f"file:{path}")


@pytest.mark.parametrize(
    ("corpus", "message"),
    [
        (
            "wikitext",
            "unknown corpus 'wikitext'; known corpora: wikipedia, openwebtext, lambada, wiki-summaries, "
            "file:PATH",
        ),
        ("file:/nonexistent/x.txt", "corpus file /nonexistent/x.txt does not exist"),
        ("hf:wikitext", "hf corpus must look like hf:NAME/CONFIG:SPLIT or hf:NAME:SPLIT"),
        ("hf:a/b/c/d:test", "hf corpus must look like"),
    ],
)
def test_bad_corpus_names(corpus: str, message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        load_texts(corpus)


def test_unsupported_file_suffix(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"must end in \.txt or \.jsonl"):
        load_texts(f"file:{tmp_path / 'x.csv'}")


def test_hf_offline_suggests_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these variables once at import, and they may already be imported.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(DataError) as caught:
        load_texts("hf:wikitext/wikitext-2-raw-v1:test")
    message = str(caught.value)
    assert "\n" not in message
    assert "hub is unreachable" in message and "file:PATH" in message


@pytest.mark.integration
@pytest.mark.parametrize(
    ("corpus", "size", "distinct", "opening"),
    [
        ("wikipedia", 1000, 1000, "Aubrey Leon Haines"),
        ("openwebtext", 1000, 1000, "Donald Trump"),
        ("lambada", 5153, 5151, "In my palm is a clear stone"),
        ("wiki-summaries", 10033, 10033, "20th-century classical music is Western art music"),
    ],
)
def test_named_corpora_are_the_original_passages(corpus: str, size: int, distinct: int, opening: str) -> None:
    texts = load_texts(corpus)
    assert len(texts) == size and len(set(texts)) == distinct
    assert texts[0].startswith(opening) and texts[0] == texts[0].strip()
    assert 0.2 < sum(map(is_calibration_doc, texts)) / size < 0.3


@pytest.mark.integration
@pytest.mark.parametrize("corpus", ["lambada", "wiki-summaries"])
def test_named_corpora_split_into_disjoint_documents(corpus: str) -> None:
    """No document (LAMBADA repeats two passages) is on both sides, and each side's tokens come from its own
    documents, in order."""
    from transformers import AutoTokenizer

    gguf = ensure("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = load_texts(corpus)
    cal = [text for text in texts if is_calibration_doc(text)]
    ev = [text for text in texts if not is_calibration_doc(text)]
    assert cal and ev and not set(cal) & set(ev) and len(cal) + len(ev) == len(texts)
    splits = token_splits(
        corpus, tokenizer, calibration_sequences=8, calibration_length=256, eval_tokens=8192
    )
    assert tokenizer.decode(splits.calibration[0, 1:40]) in cal[0]
    assert tokenizer.decode(splits.evaluation[0, 1:40]) in ev[0]
    eos = tokenizer.eos_token_id
    pieces = tokenizer.decode(splits.evaluation[0, 1:]).split(tokenizer.decode([eos]))
    assert len(pieces) == splits.n_docs_eval and all(p in ev[i] for i, p in enumerate(pieces))


@pytest.mark.integration
def test_real_tokenizer_splits() -> None:
    from transformers import AutoTokenizer

    gguf = ensure("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    sizes = {"calibration_sequences": 32, "calibration_length": 512, "eval_tokens": 16384}
    first = token_splits("wikipedia", tokenizer, **sizes)
    again = token_splits("wikipedia", tokenizer, **sizes)
    assert first.calibration.shape == (32, 512) and first.evaluation.shape == (1, 16384)
    assert torch.equal(first.calibration, again.calibration) and torch.equal(
        first.evaluation, again.evaluation
    )
    assert 0 < first.n_docs_cal < 256 and 0 < first.n_docs_eval < 744
    eval_docs = [t for t in load_texts("wikipedia") if not is_calibration_doc(t)]
    assert tokenizer.decode(first.evaluation[0, 1:60]) in eval_docs[0]
