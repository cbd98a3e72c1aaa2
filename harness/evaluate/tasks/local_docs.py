"""Documents for the task YAMLs beside this file; lm-eval imports it by path through ``!function``."""

from __future__ import annotations

from typing import Any

from harness.evaluate.tasks import dataset


def mmlu_local(**_: Any) -> Any:
    return dataset("mmlu_local")


def siqa_local(**_: Any) -> Any:
    return dataset("siqa_local")


def logiqa_local(**_: Any) -> Any:
    return dataset("logiqa_local")


def mmlu_cloze_local(**_: Any) -> Any:
    return dataset("mmlu_cloze_local")
