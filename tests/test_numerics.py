"""``NUMERICS_VERSION`` is pinned to the code that makes the numbers.

The checksum covers the syntax tree of each numerical module without docstrings (so comments, docstrings
and formatting do not count); the task definitions are lm-eval's own, pinned with its version. When this
test fails, the numerical code changed: if any number a run produces can differ, bump
``harness.NUMERICS_VERSION`` (every FINISHED run is then redone by the next sweep); either way, pin the new
checksum below.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import harness

PACKAGE = Path(harness.__file__).parent
NUMERICAL = [
    "assets.py",  # how the pinned files are fetched and checked
    "pins.py",  # which model and corpus files are pinned
    "data.py",
    "gemm.py",  # how 16-bit products run on CPUs without native 16-bit GEMMs
    "measure.py",
    "recovery.py",
    "session.py",
    "methods/__init__.py",
    "methods/awq.py",
    "methods/gptq.py",
    "methods/hqq.py",
    "methods/rtn.py",
    "methods/sequential.py",
    "metrics/declared.py",  # aggregations: how per-layer values become the model's number
    "metrics/error.py",
    "metrics/registry.py",
    "sensitivity/allocate.py",
    "sensitivity/drivers.py",
    "sensitivity/prefix_cache.py",
    "sensitivity/probe.py",
    "stats.py",
    "quant/codebook.py",
    "quant/cpu_kernels.py",
    "quant/double_quant.py",
    "quant/formats.py",
    "quant/packing.py",
    "quant/quantize.py",
    "evaluate/divergence.py",
    "evaluate/logits.py",
    "evaluate/reference.py",
    "evaluate/tasks.py",
    "evaluate/windows.py",
    "models/anatomy.py",
    "models/capture.py",
    "models/gguf_header.py",
    "models/layers.py",
    "models/offload.py",
    "models/sources.py",
]
NOT_NUMERICAL = [
    "__init__.py",  # holds the version itself
    "cache.py",
    "cli.py",
    "devices.py",  # which device; its kind is in the config hash
    "errors.py",
    "evaluate/__init__.py",
    "executors.py",  # where measure runs; the torch threads it sets are logged with each run
    "floor.py",  # FLOP counts and matmul rates: estimates and the sweep's floor multiple, no run's number
    "experiments/__init__.py",
    "experiments/config.py",  # what it resolves is part of the config, and so of the hash already
    "experiments/grid.py",
    "experiments/loader.py",
    "experiments/schema.py",
    "liveness.py",
    "metrics/__init__.py",
    "memory.py",  # where freed blocks go, never what they held
    "models/__init__.py",
    "plots.py",
    "preflight.py",  # checks inputs; measures nothing
    "progress.py",
    "quant/__init__.py",
    "report/__init__.py",
    "report/compare.py",
    "report/export.py",
    "report/layouts.py",
    "report/render.py",
    "report/runs.py",
    "report/table.py",
    "sensitivity/__init__.py",
    "runner.py",  # claims, logs and releases around measure; the torch threads are logged with each run
    "server.py",
    "sweep.py",
    "tracking/__init__.py",
    "tracking/claims.py",
    "tracking/schema.py",
    "tracking/store.py",
    "tracking/ui.py",
]
PINNED = {
    "3": "c5fe689f89d45ccfc348addeb1ef08cf082d4f34c62a29fa7f7b3ad53eaff391",
    "4": "e0c9fe9d650758824653164a3bffe3a8684b95e387fae7c1d5322bf8359ed82b",
}


def _code(path: Path) -> bytes:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0].value if isinstance(body, list) and body and isinstance(body[0], ast.Expr) else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.dump(tree, include_attributes=False).encode()


def numerics_checksum() -> str:
    digest = hashlib.sha256()
    for name in NUMERICAL:
        digest.update(name.encode() + b"\0" + _code(PACKAGE / name))
    return digest.hexdigest()


def test_every_module_is_classified() -> None:
    modules = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
    assert modules == sorted(NUMERICAL + NOT_NUMERICAL), "classify new modules as NUMERICAL or NOT_NUMERICAL"


def test_numerics_version_is_pinned_to_the_numerical_code() -> None:
    found = numerics_checksum()
    assert PINNED.get(harness.NUMERICS_VERSION) == found, (
        f"the numerical code changed (checksum {found}): if any number can differ, bump "
        f"harness.NUMERICS_VERSION; then pin PINNED[{harness.NUMERICS_VERSION!r}] = {found!r} here"
    )


def test_the_checksum_ignores_comments_and_docstrings(tmp_path: Path) -> None:
    plain = tmp_path / "a.py"
    plain.write_text('def f(x):\n    """Doc."""\n    return x + 1  # one\n')
    noted = tmp_path / "b.py"
    noted.write_text("def f(x):\n    # why\n    return (x +\n            1)\n")
    changed = tmp_path / "c.py"
    changed.write_text("def f(x):\n    return x + 2\n")
    assert _code(plain) == _code(noted) != _code(changed)
