"""The rules of the package's layout, read from its source: who may import what, and how long things grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "harness"
MODULES = sorted(PACKAGE.rglob("*.py"))
LIMITS = {"module": 450, "class": 150, "function": 80}  # lines


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions count)."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def test_only_tracking_imports_mlflow() -> None:
    importers = {_name(p) for p in MODULES if any(m.split(".")[0] == "mlflow" for m in _imports(p))}
    assert importers and all(name.startswith("tracking/") for name in importers), importers


def test_the_quantization_core_imports_nothing_of_the_rest_but_errors() -> None:
    for path in (PACKAGE / "quant").glob("*.py"):
        ours = {m for m in _imports(path) if m.startswith("harness")}
        allowed = {m for m in ours if m.startswith("harness.quant") or m == "harness.errors"}
        assert ours == allowed, (_name(path), ours - allowed)


def test_measure_does_no_io() -> None:
    """No file, store or network access: no open(), no mlflow, no pathlib writes in measure.py."""
    tree = _tree(PACKAGE / "measure.py")
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert not calls & {"open", "write_text", "write_bytes", "savez", "savez_compressed", "save"}
    assert not {
        m for m in _imports(PACKAGE / "measure.py") if m.split(".")[0] in ("mlflow", "requests", "socket")
    }


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_sizes_stay_within_the_limits(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= LIMITS["module"], f"{_name(path)}: {lines} lines"
    for node in ast.walk(_tree(path)):
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= LIMITS[kind], f"{_name(path)}: {kind} {node.name} has {length} lines"
