"""The README's extension examples, added as a user adds them: each runs in the namespace of the file its
first line names, in a fresh process (the registries are process-wide), and the harness is then checked to
use it through its public paths."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_experiment

README = Path(__file__).parents[1] / "README.md"
pytestmark = pytest.mark.integration  # each example runs in a process of its own


def examples() -> dict[str, str]:
    """The Extending section's code blocks by the file their first line names."""
    section = README.read_text(encoding="utf-8").split("\n## Extending\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {block.splitlines()[0].removeprefix("# "): block for block in blocks}


def run_with(example: str, check: str, tmp_path: Path) -> str:
    """``check`` in a new interpreter, after the example for ``example`` ran in that file's module."""
    module = example.removesuffix(".py").removesuffix("/__init__").replace("/", ".")  # a package's own
    code = (
        f"import importlib\nmodule = importlib.import_module({module!r})\n"
        f"exec({examples()[example]!r}, vars(module))\n{check}"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_names_a_file_of_the_package() -> None:
    found = examples()
    assert set(found) == {
        "harness/quant/formats.py",
        "harness/metrics/declared.py",
        "harness/report/layouts.py",
        "harness/evaluate/tasks.py",
        "harness/methods/__init__.py",
        "harness/executors.py",
    }
    for file in found:
        assert (README.parent / file).is_file(), file


def test_a_format_is_quantized_to_and_accepted_by_experiments(tmp_path: Path) -> None:
    check = """
import torch
from harness.experiments import load_experiment
from harness.metrics import bits_per_param
from harness.quant.formats import get_format
from harness.quant.quantize import fake_quant, quantize
w = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
levels = torch.tensor(get_format("log4").levels)
blocks = w.reshape(-1, 64)
scaled = fake_quant(w, "log4").reshape(-1, 64) / blocks.abs().amax(1, keepdim=True)
assert torch.allclose((scaled[..., None] - levels).abs().min(-1).values, torch.zeros(()), atol=1e-6)
assert bits_per_param(quantize(w, "log4")) == 4.5
[config] = load_experiment("smoke", ["grid={format: [log4]}", "grid.double_quant=[off]"]).configs
assert config.format == "log4" and config.label == "log4-b64", config.label
"""
    run_with("harness/quant/formats.py", check, tmp_path)


def test_a_metric_is_aggregated_and_shown_as_declared(tmp_path: Path) -> None:
    check = """
import pandas as pd
from harness.metrics import aggregate, markdown_table, metric
layers = pd.DataFrame({"numel": [1, 3], "mean_abs": [0.1, 0.2], "nmse": [0.0, 0.0]})
assert abs(aggregate(layers)["mean_abs"] - 0.175) < 1e-12
assert metric("mean_abs").header == "Mean |ΔW| ↓"
assert "| `mean_abs` |" in markdown_table()
"""
    run_with("harness/metrics/declared.py", check, tmp_path)


def test_a_task_group_runs_on_the_local_data(tmp_path: Path) -> None:
    check = """
from conftest import tiny_llama
from test_tasks import byte_tokenizer
from harness.evaluate.tasks import available_tasks, expand_tasks, run_tasks
assert "mmlu_stem" in available_tasks()
scores = run_tasks(tiny_llama(vocab=260), byte_tokenizer(), ["mmlu_stem"], limit=1, batch_size=4)
assert scores["mmlu_stem"]["n"] > 10 and 0 <= scores["mmlu_stem"]["acc"] <= 1, scores["mmlu_stem"]
"""
    tests = str(Path(__file__).parent)
    run_with("harness/evaluate/tasks.py", f"import sys\nsys.path.insert(0, {tests!r})\n{check}", tmp_path)


def test_a_method_errs_no_more_than_round_to_nearest_and_is_a_grid_value(tmp_path: Path) -> None:
    check = """
import torch
from harness.experiments import load_experiment
from harness.measure import layer_quantizer
from harness.quant.quantize import QuantConfig, dequantize, quantize
w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
config = QuantConfig("nf4", 64)
clipped = module.METHODS["clip"].layer(w, config)
rtn = dequantize(quantize(w, config), torch.float32)
assert float((w - clipped.weight()).square().sum()) < float((w - rtn).square().sum())
assert clipped.qt.codes.numel() == quantize(w, config).codes.numel()
[run] = load_experiment("smoke", ["grid={format: [nf4], method: [clip]}", "grid.double_quant=[off]"]).configs
assert run.label == "nf4-b64-clip"
assert layer_quantizer(None, run)("layer", w, config).qt.codes.equal(clipped.qt.codes)
"""
    run_with("harness/methods/__init__.py", check, tmp_path)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_experiment(tmp_path_factory.mktemp("extending"), "tiny-extending", "{format: [nf4, int4]}")


def test_an_executor_runs_a_sweep_and_a_layout_is_written(experiment: Path, tmp_path: Path) -> None:
    """The process executor sweeps the tiny model (each shard in a child process), and the memory layout is
    then one more table of ``harness tables``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = f"""
from harness.experiments import load_experiment
from harness.sweep import SweepOptions, run_sweep
summary = run_sweep(
    load_experiment({str(experiment)!r}), SweepOptions(tracking_uri={uri!r}, progress=False),
    module.ProcessExecutor(),
)
finished = ["baseline-fp32", "int4-b64-fp32", "nf4-b64-fp32"]
assert not summary.failed and sorted(summary.finished) == finished, summary
"""
    run_with("harness/executors.py", sweep, tmp_path)
    tables = f"""
from harness.report import write_report
paths = write_report("tiny-extending", {uri!r}, out_dir=__import__("pathlib").Path("out")).paths
print("\\n".join(str(p) for p in paths))
"""
    written = run_with("harness/report/layouts.py", tables, tmp_path)
    memory = tmp_path / "out" / "memory.md"
    assert str(memory) in written or "out/memory.md" in written
    text = memory.read_text()
    assert "| unquantized |" in text and "| nf4-b64-fp32 |" in text and "Memory on" in text
