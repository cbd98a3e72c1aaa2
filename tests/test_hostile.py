"""What a careless or hostile user can feed the CLI: each mistake gets one line on stderr and exit code 2, and
nothing reaches the store; a model whose outputs are not finite gives a FAILED run, never a number."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_with_tokenizer, stored_runs, tiny_llama, word_corpus
from test_experiments import MALFORMED

from harness import measure, session, sweep
from harness.cache import cache_dir
from harness.cli import main
from harness.executors import Shard
from harness.experiments import Experiment, load_experiment
from harness.experiments.schema import RecoverySettings
from harness.floor import PassCost
from harness.sweep import estimate
from harness.tracking import ERROR_TAG, RunRecord, Tracker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama directory (512 positions), one whose final norm holds a NaN, and a word corpus."""
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_llama()
    paths = {"model": save_with_tokenizer(model, root / "tiny"), "corpus": word_corpus(root / "words.txt")}
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # outside every Linear layer a config quantizes
    paths["nan"] = save_with_tokenizer(model, root / "tiny-nan")
    truncated = save_with_tokenizer(tiny_llama(), root / "tiny-truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    paths["truncated"] = truncated
    return paths


def experiment(tiny: dict[str, Path], model: str = "model", **sections: str) -> str:
    """A valid experiment on the tiny model, with whole sections replaced by ``sections``."""
    parts = {
        "model": str(tiny[model]),
        "data": f"{{corpus: 'file:{tiny['corpus']}', calibration_sequences: 2, calibration_length: 64}}",
        "eval": "{protocol: disjoint, context_length: 128, tokens: 512}",
        "grid": "{format: [nf4, int4]}",
    }
    parts |= sections
    return "".join(f"{key}: {value}\n" for key, value in parts.items())


# (file text, or None for a minimal valid one; --set values; what the one line must say)
Case = tuple[str | bytes | None, list[str], str]
SCHEMA: list[Case] = [(text, [], message) for text, message in MALFORMED]
INPUTS: list[Case] = [
    (b"model: m\ngrid: {format: [nf4]}\n# \xff\xfe\n", [], "not UTF-8 text"),
    ("", [], "expected a mapping of keys"),
    ("model: m\ngrid: {format: [nf4]}\nmodel: n\n", [], "duplicate key 'model' (first given on line 1)"),
    ("model: m\neval: {tokens: 1024, tokens: 2048}\ngrid: {format: [nf4]}\n", [], "duplicate key 'tokens'"),
    ("model: m\ngrid:\n  format: [nf4]\n  format: [fp4]\n", [], "duplicate key 'format'"),
    ("model: m\ngrid: {format: [nf4]}\nname: ''\n", [], "name: expected a non-empty string"),
    ("model: 7\ngrid: {format: [nf4]}\n", [], "model: expected a model name"),
    ("model: m\neval: {kld_reference: full}\ngrid: {format: [nf4]}\n", [], "eval.kld_reference: 'full'"),
    ("model: m\neval: {kld_topk: 0}\ngrid: {format: [nf4]}\n", [], "eval.kld_topk: expected an integer >= 1"),
    ("model: m\ndata: {calibration_sequences: -1}\ngrid: {format: [nf4]}\n", [], "calibration_sequences"),
    ("model: m\ngrid: {format: [nf4], rounding: [up]}\n", [], "grid.rounding: 'up' is not allowed"),
    ("model: m\neval: {context_length: 1e3}\ngrid: {format: [nf4]}\n", [], "eval.context_length: expected"),
    (None, ["grid.format"], "--set 'grid.format': expected KEY=VALUE"),
    (None, ["grid.format=[nf4"], "--set grid.format: '[nf4' is not a valid YAML value"),
    (None, ["grid={format: [nf4], format: [fp4]}"], "duplicate key 'format'"),
    (None, ["model.name=x"], "--set model.name: 'model' is not a mapping"),
    (None, ["eval.tokenz=5"], "eval.tokenz: unknown key"),
    (None, ["eval.tokens=many"], "eval.tokens: expected an integer, got 'many'"),
    (None, ["grid.format=[nf4, nf17]"], "grid.format: unknown format 'nf17'"),
    (None, ["eval.protocol=sliding", "eval.stride=4096"], "eval.stride: 4096 exceeds context_length 512"),
]


def preflight_cases(tiny: dict[str, Path]) -> list[Case]:
    """Mistakes only the model or the corpus can reveal, caught before any weight loads."""
    corpus = tiny["corpus"]
    bad_jsonl = corpus.with_name("bad.jsonl")
    bad_jsonl.write_text('{"text": "t5 t6"}\n{not json\n')
    csv = corpus.with_suffix(".csv")
    csv.write_text("text\nt5 t6\n")
    cut = corpus.with_name("cut.gguf")  # a GGUF header cut off after its magic and version
    cut.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 3)
    text = corpus.with_name("notes.gguf")
    text.write_text("not a model\n")
    data = "{{corpus: '{}', calibration_sequences: 2, calibration_length: 64}}"
    return [
        (experiment(tiny, model="model") + "", ["model=some-org/not-a-model"], "hub is unreachable"),
        (experiment(tiny), [f"model={corpus.parent}"], "is not a transformers model"),
        (experiment(tiny, model="truncated"), [], "model.safetensors is truncated or corrupt"),
        (experiment(tiny), ["model=./nowhere/model.gguf"], "does not exist"),
        (experiment(tiny), [f"model={cut}"], "cut.gguf cannot be read as a GGUF model"),
        (experiment(tiny), [f"model={text}"], "notes.gguf cannot be read as a GGUF model"),
        (
            experiment(tiny, eval="{protocol: disjoint, context_length: 1024, tokens: 2048}"),
            [],
            "eval.context_length: 1024 exceeds",
        ),
        (experiment(tiny), ["layers.include=[lm_head_x]"], "no Linear layer matches"),
        (experiment(tiny), ["layers.exclude=['*']"], "no Linear layer matches"),
        (experiment(tiny), ["eval.tokens=100000"], "evaluation tokens"),
        (experiment(tiny), ["data.calibration_sequences=1000"], "calibration tokens"),
        (experiment(tiny, data=data.format("file:/nonexistent/words.txt")), [], "does not exist"),
        (experiment(tiny, data=data.format(f"file:{csv}")), [], "must end in .txt or .jsonl"),
        (experiment(tiny, data=data.format(f"file:{bad_jsonl}")), [], "bad.jsonl:2: not valid JSON"),
    ]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def check_cases(
    cases: list[Case],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store.db"
    for i, (text, sets, message) in enumerate(cases):
        path = tmp_path / f"case{i:02d}.yaml"
        content = "model: m\ngrid: {format: [nf4]}\n" if text is None else text
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        overrides = [arg for value in sets for arg in ("--set", value)]
        for command in ("show", "sweep"):
            extra = ["--tracking-uri", f"sqlite:///{store}"] if command == "sweep" else []
            code, lines = run_cli([command, str(path), *overrides, *extra], capsys)
            assert (code, len(lines)) == (2, 1), (command, text, sets, lines)
            assert lines[0].startswith("harness: error: ") and message in lines[0], (command, message, lines)
    assert not store.exists()  # no sweep got as far as opening the store
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("case")) == []


def test_malformed_inputs_each_give_one_line_and_leave_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = SCHEMA + INPUTS
    assert len(cases) >= 40
    check_cases(cases, tmp_path, capsys, monkeypatch)


def test_what_only_the_model_and_corpus_reveal_is_caught_before_work(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "valid.yaml"
    path.write_text(experiment(tiny))
    code, _ = run_cli(["show", str(path)], capsys)
    assert code == 0  # the base of every case below is valid
    (tmp_path / "cases").mkdir()
    loads: list[str] = []
    monkeypatch.setattr(session, "load_model", lambda spec, *args, **kwargs: loads.append(spec))
    check_cases(preflight_cases(tiny), tmp_path / "cases", capsys, monkeypatch)
    assert loads == []  # every case was refused before a session loaded weights


def test_every_problem_is_said_before_anything_starts(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "two.yaml"
    path.write_text(experiment(tiny, eval="{protocol: disjoint, context_length: 1024, tokens: 100000}"))
    code, lines = run_cli(["sweep", str(path), "--set", "layers.include=[nothing]"], capsys)
    assert code == 2 and len(lines) == 3, lines
    assert ["exceeds" in lines[0], "no Linear layer" in lines[1], "evaluation tokens" in lines[2]] == [
        True
    ] * 3


def test_a_million_configs_are_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    formats = "nf4, fp4, int4, nf3, nf5, int8, fp4_e2m1, int4_asym, nf2, int3"
    blocks = ", ".join(str(16 * (i + 1)) for i in range(25_000))
    path = tmp_path / "huge.yaml"
    path.write_text(
        "model: smollm2-135m\n"
        f"grid: {{format: [{formats}], block_size: [{blocks}], rounding: [ties_down, ties_even],"
        " double_quant: [off, on]}\n"
    )
    built: list[dict[str, object]] = []
    build = Experiment._config
    monkeypatch.setattr(
        Experiment, "_config", lambda self, model, choice: built.append(choice) or build(self, model, choice)
    )
    code, lines = run_cli(["sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 's.db'}"], capsys)
    assert built == []  # refused from the axes' lengths, before a single config was built
    assert code == 2 and len(lines) == 1
    assert "up to 1,000,000 configs" in lines[0] and "more than 1,000" in lines[0] and "--yes" in lines[0]
    assert not (tmp_path / "s.db").exists()
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "up to 1,000,000 configs" in shown and "999,980 more (--all lists them)" in shown
    assert len(shown.splitlines()) < 40


def test_a_non_finite_model_fails_and_is_never_tabulated(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "nan.yaml"
    path.write_text(experiment(tiny, model="nan"))
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["sweep", str(path), "--tracking-uri", store]) == 1
    runs = stored_runs(store, "nan")
    configs = runs[runs["tags.harness.kind"] == "config"]
    assert list(configs["status"]) == ["FAILED"]  # the baseline; nothing was measured against it
    error = configs[f"tags.{ERROR_TAG}"].iloc[0]
    assert "NonFiniteError: the base model: 100.00% of" in error
    assert "first non-finite output: model.norm" in error
    assert not any((cache_dir() / "reference").glob("*/*.json"))  # no base reference was kept
    assert not any(s == "RUNNING" for s in runs["status"])
    capsys.readouterr()
    code, lines = run_cli(["tables", "nan", "--tracking-uri", store], capsys)
    assert code == 2 and "no FINISHED config runs (1 FAILED)" in lines[0]


def test_an_error_of_the_machine_is_one_line_and_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache that cannot be created (its parent is a file): not the user's mistake in the experiment, not a
    bug either; one line, and the traceback in a log."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HARNESS_CACHE", str(blocker / "cache"))
    code, lines = run_cli(["sweep", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 's.db'}"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("harness: error: NotADirectoryError") and "traceback in " in lines[0]
    log = Path(lines[0].rsplit("traceback in ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in log.read_text()
    assert not (tmp_path / "s.db").exists()


@pytest.mark.integration
def test_a_reader_that_leaves_early_is_no_error(tmp_path: Path) -> None:
    """``harness list | head -1``: the pipe closes under the command, which says nothing and writes no log."""
    import subprocess
    import sys

    env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        f"{sys.executable} -m harness.cli list | head -1", shell=True, capture_output=True, text=True, env=env
    )
    assert done.stdout.count("\n") == 1 and done.stderr == ""
    assert not (tmp_path / "cache" / "logs").exists()


def test_the_estimate_says_where_it_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """Earlier runs of the model in the same model dtype and method when the store has them, else the FLOP
    floor at the torch.mm rate of the pass's GEMM shapes in the model dtype (measured once), the base
    reference counted once per model and dtype however many shards it has; a method other than round to
    nearest says its quantization is left out."""
    configs = [c.resolved("bfloat16") for c in load_experiment("smoke").configs]
    shards = [Shard("smollm2-135m", configs[:1]), Shard("smollm2-135m", configs[1:2])]
    logged = [("FINISHED", "bfloat16", 10.0), ("FINISHED", "bfloat16", 30.0), ("FAILED", "bfloat16", 1e3)]
    logged.append(("FINISHED", "float32", 1e3))  # another model dtype: not this sweep's time
    history = [
        RunRecord.of(
            SimpleNamespace(
                info=SimpleNamespace(run_id=str(i), status=status, start_time=i),
                data=SimpleNamespace(
                    params={"model": "smollm2-135m", "model_dtype": dtype},
                    tags={},
                    metrics={"time_total_s": t},
                ),
            )
        )
        for i, (status, dtype, t) in enumerate(logged)
    ]
    assert (
        estimate(shards, history, {}) == "estimated 40 s (the median time of this experiment's earlier runs)"
    )
    calls = []
    monkeypatch.setattr(
        sweep, "gemm_rates", lambda cost, dtype, device: calls.append((dtype, device)) or {"mm": 1e12}
    )
    cost = PassCost(10**8, 2e12, 1e12, {"mm": (1, 1, 1)})
    text = estimate(shards, [], {"smollm2-135m": cost})
    expected = sweep.SWEEP_OVERHEAD * 4 * 3e12 / 1e12  # two shards, each one config and one base pass
    assert text.startswith(f"estimated {expected:.0f} s (") and "bfloat16 (1000 GFLOP/s)" in text
    assert calls == [(torch.bfloat16, "cpu")]
    assert estimate(shards, [], {}) == "no estimate of its duration"
    fitted = [Shard("smollm2-135m", tuple(replace(configs[1], method=m) for m in ("gptq", "hqq", "rtn")))]
    text = estimate(fitted, [], {"smollm2-135m": cost})
    assert "gptq and hqq's quantization not included" in text
    # the earlier runs were round to nearest: they time the rtn config alone, the floor the other two
    text = estimate(fitted, history, {"smollm2-135m": cost})
    expected = 20 + sweep.SWEEP_OVERHEAD * 3 * 3e12 / 1e12
    assert text.startswith(f"estimated {expected:.0f} s (") and "earlier runs; " in text
    recipe = RecoverySettings(steps=10, batch=2, sequence_length=50)  # 1,000 tokens per training
    trained = [Shard("smollm2-135m", (replace(configs[0], recovery=recipe),))]
    text = estimate(trained, [], {"smollm2-135m": cost})
    training = sweep.TRAINING_OVERHEAD * 6 * 10**8 * 1000 / 1e12  # one config: one training
    expected = sweep.SWEEP_OVERHEAD * 3 * 3e12 / 1e12 + training  # the base pass, before and after LoRA
    assert (
        text.startswith(f"estimated {expected:.0f} s (") and "LoRA training at 2.9 × 6 × parameters" in text
    )
    recomputing = recipe.model_copy(update={"checkpointing": True})
    trained = [Shard("smollm2-135m", (replace(configs[0], recovery=recomputing),))]
    text = estimate(trained, [], {"smollm2-135m": cost})
    expected += (sweep.CHECKPOINTING_COST - 1) * training
    assert text.startswith(f"estimated {expected:.0f} s (") and "LoRA training at 4.64 × 6 × param" in text


def test_every_error_of_input_or_circumstance_is_a_harness_error() -> None:
    """The CLI prints a ``HarnessError`` on one line and lets everything else keep its traceback, so every
    error class the package defines derives from it; the one exception is the outcome of a measurement."""
    import importlib
    import inspect
    import pkgutil

    import harness
    from harness.errors import HarnessError
    from harness.evaluate.windows import NonFiniteError  # a FAILED run's reason, never shown by the CLI

    defined = set()
    for module in pkgutil.walk_packages(harness.__path__, "harness."):
        for _, value in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(value, Exception) and value.__module__.startswith("harness."):
                defined.add(value)
    assert len(defined) >= 12
    assert {error for error in defined if not issubclass(error, HarnessError)} == {NonFiniteError}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize(
    ("flag", "said"), [("cuda", "torch sees no CUDA device"), ("gpu", "expected auto, cpu")]
)
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(
    tiny: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "dev.yaml"
    path.write_text(experiment(tiny))
    code, lines = run_cli(["sweep", str(path), "--device", flag, "--tracking-uri", "sqlite:///s.db"], capsys)
    assert code == 2 and len(lines) == 1 and said in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.yaml"]  # no store, no cache entry


MEASURED = ("ppl", "kld_mean", "top1_agreement", "nmse", "output_rel_err", "bits_per_param")


def test_device_cpu_and_auto_are_one_config_on_a_cpu(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a machine without CUDA, ``auto`` is the CPU: the same hash, and bit-identical metrics; a CUDA run
    is another config, whose hash holds the device kind and not its index."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "dev.yaml"
    path.write_text(experiment(tiny, grid="{format: [nf4]}"))
    found = {}
    for device in ("cpu", "auto"):
        store = f"sqlite:///{tmp_path / device}.db"
        assert main(["sweep", str(path), "--device", device, "--tracking-uri", store]) == 0
        records = Tracker(store).records("dev")
        found[device] = {r.config_id: (r.device, *(r.metric(k) for k in MEASURED)) for r in records}
    assert found["cpu"] == found["auto"] and {v[0] for v in found["cpu"].values()} == {"cpu"}
    config = load_experiment(str(path)).configs[0].resolved("float32")
    assert "device" not in config.content()
    assert replace(config, device="cuda:1").hash == replace(config, device="cuda").hash != config.hash


def test_a_pass_out_of_memory_runs_again_with_fewer_windows(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MemoryError from every forward of more than one window (injected at the decoder): the base
    reference and each config run again one window per forward, say so, and agree with an unconstrained
    sweep (one window per forward only changes the GEMM shapes)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "oom.yaml"
    path.write_text(experiment(tiny, grid="{format: [nf4]}"))
    forward = LlamaModel.forward

    def tight(self: LlamaModel, input_ids: torch.Tensor | None = None, **kwargs: object) -> object:
        if input_ids is not None and input_ids.shape[0] > 1:
            raise MemoryError("injected")
        return forward(self, input_ids=input_ids, **kwargs)

    found = {}
    for run in ("free", "tight"):
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / f"cache-{run}"))  # the reference is built again
        if run == "tight":
            monkeypatch.setattr(LlamaModel, "forward", tight)
        store = f"sqlite:///{tmp_path / run}.db"
        assert main(["sweep", str(path), "--tracking-uri", store]) == 0
        found[run] = {r.label: r for r in Tracker(store).records("oom")}
    assert found["free"].keys() == found["tight"].keys() == {"baseline-fp32", "nf4-b64-fp32"}
    for label, free in found["free"].items():
        tight_run = found["tight"][label]
        assert (free.metric("eval_windows_per_forward"), tight_run.metric("eval_windows_per_forward")) == (
            4,
            1,
        )
        assert tight_run.metric("ppl") == pytest.approx(free.metric("ppl"), rel=1e-4)
        assert tight_run.metric("kld_mean") == pytest.approx(free.metric("kld_mean"), rel=1e-3, abs=1e-6)


def test_a_config_out_of_memory_at_one_window_fails_alone(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "oom.yaml"
    path.write_text(experiment(tiny))
    evaluate, calls = measure.evaluate_against, []

    def after_the_baseline(*args: object, **kwargs: object) -> object:
        calls.append(kwargs["batch_size"])
        if len(calls) > 1:  # the baseline's first try passes; every quantized config's try fails
            raise MemoryError("injected")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(measure, "evaluate_against", after_the_baseline)
    store = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["sweep", str(path), "--tracking-uri", store]) == 1
    runs = {r.label: r for r in Tracker(store).records("oom")}
    assert {label: r.status for label, r in runs.items()} == {
        "baseline-fp32": "FINISHED",
        "nf4-b64-fp32": "FAILED",
        "int4-b64-fp32": "FAILED",
    }
    assert calls == [4, 4, 2, 1, 4, 2, 1]
    errors = stored_runs(store, "oom").set_index("tags.mlflow.runName")[f"tags.{ERROR_TAG}"]
    said = "OutOfMemory: evaluation: out of memory at one window per forward (injected)"
    assert errors["nf4-b64-fp32"] == errors["int4-b64-fp32"] == said
