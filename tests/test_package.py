"""The package works installed, not only from a checkout: a real wheel, run from an unrelated directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
QUICK = [
    "eval.tokens=256",
    "eval.context_length=128",
    "eval.tasks=[]",
    "eval.kld=false",
    "data.calibration_sequences=1",
    "data.calibration_length=64",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of this tree (no stale build folder), installed (not editable) into a
    folder of its own."""
    source, build = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT / "harness", source / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            build,
            source,
        ],
        check=True,
        cwd=build,
    )
    (wheel,) = build.glob("harness-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "-t", target, wheel], check=True
    )
    return target


def harness(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "MLFLOW_TRACKING_URI": ""}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.integration  # other processes or a peer's registry: seconds each
def test_installed_package_lists_its_experiments(installed: Path, tmp_path: Path) -> None:
    where = harness(installed, tmp_path, "list")
    assert where.returncode == 0, where.stderr
    assert "smoke" in where.stdout and "default" in where.stdout
    assert str(installed / "harness" / "registry" / "smoke.yaml") in where.stdout  # not the checkout's
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mine.yaml").write_text("model: smollm2-135m\ngrid: {format: [nf4]}\n")
    assert "mine" in harness(installed, tmp_path, "list").stdout


@pytest.mark.integration
def test_installed_package_sweeps_into_the_working_directory(installed: Path, tmp_path: Path) -> None:
    overrides = [arg for o in QUICK for arg in ("--set", o)]
    done = harness(installed, tmp_path, "sweep", "smoke", "--limit", "2", *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "_pytree" not in done.stderr  # the peers kept quiet
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlartifacts").is_dir()
    tables = harness(installed, tmp_path, "tables", "smoke")
    assert tables.returncode == 0, tables.stderr[-2000:]
    assert (tmp_path / "results" / "smoke" / "datatypes.md").is_file()
    beside = {p.name for p in (installed / "harness").iterdir()}
    assert not beside & {"mlflow.db", "mlartifacts", "results"}  # nothing written beside the package


def test_the_torch_pin_keeps_a_cuda_build_of_the_same_torch() -> None:
    """``make install TORCH_INDEX=…/cu128`` (or a user's own venv) holds torch 2.13.0+cu128 before the package
    installs: its pin must accept that build, so that installing the package never swaps it for the CPU
    wheel, and must refuse another torch."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [torch_pin] = [r for r in map(Requirement, project["dependencies"]) if r.name == "torch"]
    assert all(torch_pin.specifier.contains(v) for v in ("2.13.0", "2.13.0+cu128", "2.13.0+cpu"))
    assert not torch_pin.specifier.contains("2.12.0+cu128")
