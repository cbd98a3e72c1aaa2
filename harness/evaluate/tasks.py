"""Zero-shot multiple-choice tasks through lm-eval 0.4.13 with the in-memory model, from local files only.

The task YAMLs ship in ``tasks/`` beside this module. Each takes its documents from ``custom_dataset:
!function local_docs.<task>``, which calls ``dataset`` below: the evals asset is located (and fetched if
missing) when the task loads, so no file holds an absolute path and nothing is generated at run time. The
prompts follow lm-eval's own tasks so that numbers compare with published ones:

- ``mmlu_local``: 1,000 MMLU questions (evals ``sandbagging/samples-all-large.jsonl``) as lm-eval's mmlu, the
  letters A-D scored after the question's own "Answer:"; acc only (letters have equal length).
- ``mmlu_cloze_local`` (extra): the same questions in cloze form, the option texts scored after
  "Question: <stem>\\nAnswer:" (how SmolLM2/lighteval report MMLU for small models, which sit at chance on
  letters; SmolLM2-135M answers "A" to everything); acc and acc_norm.
- ``siqa_local``: Social IQa (``theory_of_mind/socialiqa/test.jsonl``, 2,224) as lm-eval's social_iqa, the
  three answer texts scored after "Q: <context> <question>\\nA:"; acc and acc_norm.
- ``logiqa_local``: LogiQA (``logiqa/logiqa.jsonl``, 1,354) as lm-eval's logiqa, the option texts scored after
  the passage, question and lettered options; acc and acc_norm.

The evals files hold chat-formatted prompts; ``load_docs`` parses them back into fields (every row parses).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

TASK_DIR = Path(__file__).with_name("tasks")
TASKS: tuple[str, ...] = ("mmlu_local", "siqa_local", "logiqa_local")  # the default set
FILES = {
    "mmlu_local": "sandbagging/samples-all-large.jsonl",
    "mmlu_cloze_local": "sandbagging/samples-all-large.jsonl",
    "siqa_local": "theory_of_mind/socialiqa/test.jsonl",
    "logiqa_local": "logiqa/logiqa.jsonl",
}
LETTERS = "ABCD"
_MMLU = re.compile(r"^(.*?)\s*\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\nAnswer:\s*$", re.S)
_SIQA = re.compile(r"^(.*) A: (.*); B: (.*); C: (.*)\.$", re.S)
_LOGIQA = re.compile(
    r"^\s*Passage: (.*?)\s*Question: (.*)\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\nAnswer:\s*$", re.S
)
_OPTION_PREFIX = re.compile(r"^[A-D]\.\s*")


@cache
def available_tasks() -> tuple[str, ...]:
    """The tasks lm-eval's TaskManager finds in ``tasks/``, by name."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    return tuple(sorted(manager.all_tasks))


def load_docs(task: str) -> list[dict[str, Any]]:
    """The task's documents as the YAML's templates expect them, with ``label`` the gold option's index."""
    if task not in FILES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(FILES)}")
    from harness.assets import ensure

    path = ensure("evals", progress=False) / FILES[task]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_parse(task, row, number) for number, row in enumerate(rows, start=1)]


def _parse(task: str, row: dict[str, Any], number: int) -> dict[str, Any]:
    if task == "mmlu_local":
        return {"question": row["question"], "label": LETTERS.index(row["answer"])}
    if task == "mmlu_cloze_local":
        match = _MMLU.match(row["question"])
        if match is None:
            raise ValueError(f"{FILES[task]}:{number}: unexpected question layout: {row['question'][:80]!r}")
        stem, *options = (part.strip() for part in match.groups())
        return {"stem": stem, "options": options, "label": LETTERS.index(row["answer"])}
    content = row["input"][-1]["content"]
    match = (_SIQA if task == "siqa_local" else _LOGIQA).match(content)
    if match is None:
        raise ValueError(f"{FILES[task]}:{number}: unexpected prompt layout: {content[:80]!r}")
    label = LETTERS.index(row["ideal"])
    if task == "siqa_local":
        prompt, *answers = match.groups()
        return {"prompt": prompt.strip(), "answers": [a.strip() for a in answers], "label": label}
    context, question, *options = match.groups()
    options = [_OPTION_PREFIX.sub("", o.strip()) for o in options]  # "A. A.Zhao ..." holds the letter twice
    return {"context": context.strip(), "question": question.strip(), "options": options, "label": label}


def dataset(task: str) -> Any:
    """The documents as the DatasetDict lm-eval expects from a ``custom_dataset`` (one "test" split)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_docs(task))})


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str] | tuple[str, ...] = TASKS,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task: {task: {acc, acc_stderr, [acc_norm, acc_norm_stderr], n}}.

    ``limit`` keeps the first ``limit`` documents of each task. Nothing touches the network: the model and
    tokenizer are objects and the documents local files.
    """
    unknown = [task for task in tasks if task not in FILES]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {', '.join(FILES)}")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        limit=limit,
        num_fewshot=0,
        log_samples=False,
    )
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        metrics = out["results"][task]
        entry = {"n": float(out["n-samples"][task]["effective"])}
        for name in ("acc", "acc_norm"):
            if f"{name},none" in metrics:
                entry[name] = float(metrics[f"{name},none"])
                entry[f"{name}_stderr"] = float(metrics[f"{name}_stderr,none"])
        results[task] = entry
    return results
