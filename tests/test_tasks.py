"""lm-eval tasks from local files: the parsers, the shipped YAMLs, and a fully offline run_tasks (a tiny
random model with a byte-level tokenizer built here; then the real SmolLM2 on the real files)."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from conftest import tiny_llama

from harness.evaluate import tasks as tasks_module
from harness.evaluate.tasks import FILES, TASK_DIR, TASKS, _parse, load_docs, run_tasks


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_parsers_on_the_file_layouts() -> None:
    siqa = {
        "input": [{"role": "user", "content": "Alex sat. Why? A: to rest; B: to eat; C: to go."}],
        "ideal": "B",
    }
    assert _parse("siqa_local", siqa, 1) == {
        "prompt": "Alex sat. Why?",
        "answers": ["to rest", "to eat", "to go"],
        "label": 1,
    }
    logiqa = {
        "input": [
            {"role": "system", "content": "Instructions"},
            {
                "role": "user",
                "content": (
                    "\nPassage: All cats sleep.Question: Which follows?\n"
                    "A. A.Cats sleep.\nB. B.Dogs.\nC. C.None.\nD. D.All.\nAnswer:"
                ),
            },
        ],
        "ideal": "A",
    }
    assert _parse("logiqa_local", logiqa, 1) == {
        "context": "All cats sleep.",
        "question": "Which follows?",
        "options": ["Cats sleep.", "Dogs.", "None.", "All."],
        "label": 0,
    }
    mmlu = {"question": "What is 2+2?\nA. 3\nB. 4 \nC. 5\nD. 22\nAnswer:", "answer": "B"}
    assert _parse("mmlu_local", mmlu, 1) == {"question": mmlu["question"], "label": 1}
    assert _parse("mmlu_cloze_local", mmlu, 1) == {
        "stem": "What is 2+2?",
        "options": ["3", "4", "5", "22"],
        "label": 1,
    }
    with pytest.raises(ValueError, match="layout"):
        _parse("siqa_local", {"input": [{"content": "no options here"}], "ideal": "A"}, 7)


def test_yamls_ship_in_the_package_and_index_offline() -> None:
    from lm_eval.tasks import TaskManager

    names = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
    assert names == sorted(FILES)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(FILES) <= set(manager.all_tasks)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + BOS/EOS) built in memory: no hub, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<s>": 256, "</s>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_run_tasks_offline_with_a_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {
        "mmlu_local": [
            {"question": f"Q{i}?\nA. a\nB. b\nC. c\nD. d\nAnswer:", "label": i % 4} for i in range(6)
        ],
        "siqa_local": [{"prompt": f"P{i}.", "answers": ["x", "yy", "zzz"], "label": i % 3} for i in range(6)],
        "logiqa_local": [
            {"context": "C.", "question": f"Q{i}", "options": ["o1", "o22", "o3", "o4"], "label": i % 4}
            for i in range(6)
        ],
    }
    monkeypatch.setattr(tasks_module, "load_docs", lambda task: docs[task])
    tokenizer = byte_tokenizer()
    results = run_tasks(tiny_llama(vocab=260), tokenizer, list(TASKS), limit=5, batch_size=4)
    assert set(results) == set(TASKS)
    for task, metrics in results.items():
        assert metrics["n"] == 5
        assert 0.0 <= metrics["acc"] <= 1.0 and metrics["acc_stderr"] >= 0.0
        assert ("acc_norm" in metrics) == (task != "mmlu_local")
    with pytest.raises(ValueError, match="unknown tasks"):
        run_tasks(tiny_llama(vocab=260), tokenizer, ["hellaswag"])


@cache
def smollm2() -> tuple[torch.nn.Module, object]:
    from harness.models import load_model

    loaded = load_model("smollm2-135m")
    return loaded.model.eval(), loaded.tokenizer


@pytest.mark.integration
def test_local_files_parse_completely() -> None:
    sizes = {"mmlu_local": 1000, "mmlu_cloze_local": 1000, "siqa_local": 2224, "logiqa_local": 1354}
    for task, size in sizes.items():
        docs = load_docs(task)
        assert len(docs) == size
        n_options = 3 if task == "siqa_local" else 4
        assert all(0 <= d["label"] < n_options for d in docs)
        for field in ("answers", "options"):
            assert all(len(d[field]) == n_options and all(d[field]) for d in docs if field in d)


@pytest.mark.integration
def test_smollm2_tasks_offline() -> None:
    model, tokenizer = smollm2()
    results = run_tasks(model, tokenizer, list(TASKS), limit=4, batch_size=4)
    assert set(results) == set(TASKS)
    for metrics in results.values():
        assert metrics["n"] == 4 and 0.0 <= metrics["acc"] <= 1.0
