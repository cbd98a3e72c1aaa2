"""The experiment registry: shipped experiments load, grids expand, hashes are stable, bad files fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import experiments
from harness.experiments import ExperimentError, list_experiments, load_experiment
from harness.quant.double_quant import DoubleQuantConfig

SHIPPED = {"default", "qlora-datatypes", "blocksize", "double-quant", "kbit", "formats-beyond", "smoke"}


def test_every_shipped_experiment_is_valid() -> None:
    entries = dict(list_experiments())
    assert set(entries) >= SHIPPED
    for name, entry in entries.items():
        assert not isinstance(entry, Exception), f"{name}: {entry}"


def test_default_grid() -> None:
    exp = load_experiment("default")
    assert len(exp.configs) == 3 * 4 * 2 and exp.models == ["gemma-3-270m"]
    labels = {c.label for c in exp.configs}
    assert {"int4-b32", "fp4-b256-dq", "nf4-b64-dq", "nf4-b64"} <= labels
    assert len({c.hash for c in exp.configs}) == len(exp.configs)


def test_shipped_shapes() -> None:
    assert {c.format for c in load_experiment("qlora-datatypes").configs} == {
        "int4",
        "fp4",
        "fp4_e3m0",
        "nf4",
    }
    assert len(load_experiment("qlora-datatypes").configs) == 5
    blocks = {c.block_size for c in load_experiment("blocksize").configs}
    assert {32, 4096, "channel", "tensor"} <= blocks
    codes = {c.double_quant.code for c in load_experiment("double-quant").configs if c.double_quant}
    assert codes == {"dynamic", "linear_int8", "fp8_e4m3"}


def write(tmp_path: Path, text: str, name: str = "exp") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


BASE = "model: m\ngrid: {format: [nf4, fp4], block_size: [64, 128]}\n"


def test_hash_ignores_key_order_and_names(tmp_path: Path) -> None:
    a = load_experiment(
        write(
            tmp_path,
            "name: a\nmodel: m\neval: {tokens: 2048, protocol: sliding}\n"
            "grid: {block_size: [64], format: [nf4]}\n",
            "a",
        )
    )
    b = load_experiment(
        write(
            tmp_path,
            "grid: {format: [nf4], block_size: [64]}\n"
            "eval: {protocol: sliding, tokens: 2048}\nmodel: m\nname: b\n",
            "b",
        )
    )
    assert a.configs[0].hash == b.configs[0].hash
    changed = load_experiment(write(tmp_path, BASE.replace("64, 128", "64"), "c"), ["eval.tokens=4096"])
    assert changed.configs[0].hash != a.configs[0].hash


@pytest.mark.integration  # other processes or a peer's registry: seconds each
def test_hash_is_stable_across_processes(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    code = (
        f"from harness.experiments import load_experiment; print(load_experiment({path!r}).configs[0].hash)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == load_experiment(path).configs[0].hash


def test_overrides_and_exclusions(tmp_path: Path) -> None:
    exp = load_experiment(
        write(tmp_path, BASE + "exclude: [{format: fp4, block_size: 128}]\n"),
        ["grid.double_quant=[off, {code: linear_int8, block_size: 64}]", "eval.tasks=[piqa]"],
    )
    assert len(exp.configs) == 2 * 2 * 2 - 2
    assert all(c.eval.tasks == ("piqa",) for c in exp.configs)


def test_invalid_combination_points_at_exclude(tmp_path: Path) -> None:
    with pytest.raises(
        ExperimentError, match=r"invalid combination \(format=int4_asym, double_quant=.*exclude"
    ):
        load_experiment(write(tmp_path, "model: m\ngrid: {format: [int4_asym], double_quant: [on]}\n"))


MALFORMED = [
    ("model: m\ngrid: {format: [nf9]}\n", "grid.format: unknown format 'nf9'"),
    ("model: m\ngrid: {format: nf4}\n", "grid.format: expected a non-empty list"),
    ("model: m\ngrid: {format: []}\n", "grid.format: expected a non-empty list"),
    ("model: m\ngrid: {format: [nf4], block_size: [0]}\n", "grid.block_size: 0 is not a block size"),
    ("model: m\ngrid: {format: [nf4], block_size: [-64]}\n", "grid.block_size: -64 is not a block size"),
    ("model: m\ngrid: {format: [nf4], block_size: [6.5]}\n", "grid.block_size: 6.5 is not a block size"),
    ("model: m\ngrid: {format: [nf4], block_size: [row]}\n", "grid.block_size: 'row' is not a block size"),
    ("model: m\ngrid: {format: [mxfp4], block_size: [64]}\n", "mxfp4 fixes its block size at 32"),
    ("model: m\ngrid: {format: [nf4], double_quant: [maybe]}\n", "grid.double_quant: 'maybe' is not allowed"),
    ("model: m\ngrid: {format: [nf4], double_quant: [{code: int4}]}\n", "unknown double_quant.code 'int4'"),
    (
        "model: m\ngrid: {format: [nf4], double_quant: [{blocks: 3}]}\n",
        "grid.double_quant.blocks: unknown key",
    ),
    (
        "model: m\ngrid: {format: [nf4], compute_dtype: [float8]}\n",
        "grid.compute_dtype: 'float8' is not allowed",
    ),
    ("model: m\ngrid: {format: [nf4], colour: [red]}\n", "grid.colour: unknown key"),
    ("model: m\ngrid: {block_size: [64]}\n", "grid.format: every experiment needs at least one format"),
    ("grid: {format: [nf4]}\n", "model: expected a model name"),
    ("model: [m, 3]\ngrid: {format: [nf4]}\n", "model: expected a model name"),
    ("model: m\nmodle: x\ngrid: {format: [nf4]}\n", "modle: unknown key"),
    (
        "model: m\neval: {protocol: rolling}\ngrid: {format: [nf4]}\n",
        "eval.protocol: 'rolling' is not a protocol",
    ),
    ("model: m\neval: {tokens: -5}\ngrid: {format: [nf4]}\n", "eval.tokens: expected an integer >= 1"),
    ("model: m\neval: {tokens: 100}\ngrid: {format: [nf4]}\n", "eval.tokens: 100 is fewer than one window"),
    ("model: m\neval: {stride: 64}\ngrid: {format: [nf4]}\n", "eval.stride: only the sliding protocol"),
    ("model: m\neval: {tasks: [nope]}\ngrid: {format: [nf4]}\n", "eval.tasks: expected a list of tasks"),
    ("model: m\neval: {kld: yes please}\ngrid: {format: [nf4]}\n", "eval.kld: expected true or false"),
    (
        "model: m\neval: {limit: 0}\ngrid: {format: [nf4]}\n",
        "eval.limit: expected a positive integer or null",
    ),
    ("model: m\ndata: {corpus: 3}\ngrid: {format: [nf4]}\n", "data.corpus: expected a string"),
    ("model: m\ndata: {calibration_length: 0}\ngrid: {format: [nf4]}\n", "data.calibration_length: expected"),
    (
        "model: m\nlayers: {include: q_proj}\ngrid: {format: [nf4]}\n",
        "layers.include: expected a list of glob",
    ),
    ("model: m\nseed: x\ngrid: {format: [nf4]}\n", "seed: expected an integer"),
    ("model: m\ngrid: {format: [nf4]}\nexclude: [{format: nf4}]\n", "exclude: excludes every combination"),
    ("model: m\ngrid: {format: [nf4]}\nexclude: nf4\n", "exclude: expected a list of mappings"),
    ("model: m\ngrid: [nf4]\n", "grid: expected a mapping"),
    ("- just\n- a list\n", "expected a mapping of keys"),
    ("model: m\ngrid: {format: [nf4\n", "not valid YAML"),
]


def test_malformed_files_each_give_one_line(tmp_path: Path) -> None:
    for i, (text, message) in enumerate(MALFORMED):
        path = write(tmp_path, text, f"bad{i}")
        with pytest.raises(ExperimentError) as info:
            load_experiment(path)
        error = str(info.value)
        assert error.startswith(path) and message in error and "\n" not in error, (text, error)


@pytest.mark.integration  # other processes or a peer's registry: seconds each
def test_cli_reports_fifty_malformed_files_without_traceback(tmp_path: Path) -> None:
    paths = []
    for i in range(50):
        text, _ = MALFORMED[i % len(MALFORMED)]
        paths.append(write(tmp_path, text, f"bad{i:02d}"))
    code = (
        "import sys\nfrom harness.cli import main\n"
        "codes = [main(['show', p]) for p in sys.argv[1:]]\nassert all(c == 2 for c in codes), codes\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 50 and all(line.startswith("harness: error: ") for line in lines)
    assert "Traceback" not in out.stderr


def test_unknown_experiment_lists_known() -> None:
    with pytest.raises(ExperimentError, match=r"unknown experiment 'nope'; known experiments: .*default"):
        load_experiment("nope")


def test_yaml_off_on_spellings_collapse(tmp_path: Path) -> None:
    exp = load_experiment(
        write(tmp_path, "model: m\ngrid: {format: [nf4], double_quant: [false, 'on', off, null]}\n")
    )
    assert [c.double_quant is not None for c in exp.configs] == [False, True]
    assert exp.axes["double_quant"] == [None, DoubleQuantConfig()]
    assert yaml.safe_load("x: off")["x"] is False  # why both spellings must work


def test_two_spellings_of_one_config_share_a_hash(tmp_path: Path) -> None:
    """Defaults are resolved before hashing; duplicate grid values collapse."""
    omitted = load_experiment(write(tmp_path, "model: m\ngrid: {format: [nf4]}\n", "omitted"))
    explicit = load_experiment(
        write(
            tmp_path,
            "model: m\nmodel_dtype: bfloat16\n"
            "grid: {format: [nf4, nf4], block_size: [64], double_quant: [false, off]}\n"
            "fixed: {compute_dtype: bfloat16}\neval: {protocol: llamacpp, reference_dtype: bfloat16}\n",
            "explicit",
        )
    )
    assert len(omitted.configs) == len(explicit.configs) == 1
    # auto is the checkpoint's dtype, and compute and reference default to the model dtype: once resolved
    # for a bf16 checkpoint, both spellings are one config
    resolved = omitted.configs[0].resolved("bfloat16")
    assert resolved.hash == explicit.configs[0].resolved("bfloat16").hash
    assert resolved.hash != omitted.configs[0].resolved("float32").hash
    assert resolved.block_size == 64 and resolved.label == "nf4-b64"
    assert omitted.configs[0].resolved("float32").label == "nf4-b64-fp32"
    own = load_experiment(write(tmp_path, "model: m\ngrid: {format: [mxfp4, nvfp4]}\n", "own"))
    assert [c.block_size for c in own.configs] == [32, 16]  # the format's own block size
    sliding = "model: m\ngrid: {format: [nf4]}\neval: {protocol: sliding, context_length: 512%s}\n"
    implicit = load_experiment(write(tmp_path, sliding % "", "s1")).configs[0]
    assert implicit.hash == load_experiment(write(tmp_path, sliding % ", stride: 256", "s2")).configs[0].hash


def test_hash_covers_the_numerics_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_experiment(write(tmp_path, BASE)).configs[0]
    before, identity = config.hash, config.config_id
    monkeypatch.setattr(experiments.config, "NUMERICS_VERSION", "older")
    assert config.hash != before and config.config_id == identity


@pytest.mark.integration  # other processes or a peer's registry: seconds each
def test_show_takes_a_name_or_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    path = write(tmp_path, BASE.replace("model: m", "model: smollm2-135m"), "mine")
    monkeypatch.chdir(tmp_path)
    for spec in ("smoke", path):
        code = main(["show", spec])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "configs" in out.out


def test_working_directory_experiments_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mine.yaml").write_text(BASE)
    monkeypatch.chdir(tmp_path)
    entries = dict(list_experiments())
    assert {"mine", "smoke"} <= set(entries)
    assert len(load_experiment("mine").configs) == 4
