"""Finding and loading experiments, each error one line naming the file, key, value and what is allowed.

Experiments are read from ``./experiments/*.yaml`` in the working directory, then from the registry shipped
in the package (``harness/registry``); a working-directory file shadows a shipped one of the same name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from harness.experiments.grid import Experiment, expand
from harness.experiments.schema import ExperimentError, ExperimentFile

SHIPPED_DIR = Path(__file__).parents[1] / "registry"
LOCAL_DIR = Path("experiments")  # relative to the working directory


# ---- finding and loading -----------------------------------------------------------------------------------


def experiment_paths() -> dict[str, Path]:
    """Every experiment by name: the working directory's ``experiments/`` shadows the shipped registry."""
    found = {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}
    found |= {p.stem: p.resolve() for p in sorted(LOCAL_DIR.glob("*.yaml"))}
    return dict(sorted(found.items()))


def experiment_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ExperimentError(f"{candidate}: no such experiment file")
        return candidate
    known = experiment_paths()
    if name_or_path not in known:
        raise ExperimentError(
            f"unknown experiment {name_or_path!r}; known experiments: {', '.join(known)} "
            f"(or pass a path to a .yaml file)"
        )
    return known[name_or_path]


def load_experiment(name_or_path: str, overrides: list[str] | None = None) -> Experiment:
    path = experiment_path(name_or_path)
    try:
        raw = _parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ExperimentError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ExperimentError(
            f"{path}: not valid YAML{_where(exc)}: {getattr(exc, 'problem', exc)}"
        ) from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    for override in overrides or []:
        _apply_override(raw, override, path)
    try:
        spec = ExperimentFile.model_validate(raw)
    except ValidationError as exc:
        raise ExperimentError(f"{path}: {_one_line(exc)}") from None
    return expand(spec, path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not "last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                problem = f"duplicate key {key!r} (first given on line {seen[key]})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only


def list_experiments() -> list[tuple[str, Experiment | ExperimentError]]:
    """Every registry entry, loaded, or the one-line error that stops it loading."""
    out: list[tuple[str, Experiment | ExperimentError]] = []
    for name, path in experiment_paths().items():
        try:
            out.append((name, load_experiment(str(path))))
        except ExperimentError as exc:
            out.append((name, exc))
    return out


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    """``--set eval.tokens=1024`` or ``--set grid.format=[nf4,fp4]``: the value is parsed as YAML."""
    if "=" not in override:
        raise ExperimentError(f"--set {override!r}: expected KEY=VALUE, e.g. eval.tokens=1024")
    key, value = (part.strip() for part in override.split("=", 1))
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"{path}: --set {key}: {part!r} is not a mapping")
    try:
        node[leaf] = _parse(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ExperimentError(f"--set {key}: {value!r} is not a valid YAML value: {problem}") from None


# ---- validation errors as one line ------------------------------------------------------------------------


def _one_line(exc: ValidationError) -> str:
    """The first error as ``key: problem``, in the words of this file's schema."""
    error = exc.errors()[0]
    kind, value = error["type"], error.get("input")
    key, owner, described = _locate(error["loc"], unknown_key=kind == "extra_forbidden")
    if kind == "extra_forbidden":
        return f"{key}: unknown key; allowed: {', '.join(owner.model_fields) if owner else '(none)'}"
    if kind == "value_error":
        return f"{key}: {str(error['msg']).removeprefix('Value error, ')}"
    if kind == "missing":
        return f"{key}: expected {described or 'a value'}; it is missing"
    if described:
        return f"{key}: expected {described}, got {value!r}"
    if kind == "greater_than_equal":
        return f"{key}: expected an integer >= {error['ctx']['ge']}, got {value!r}"
    expected = {
        "int_type": "an integer",
        "bool_type": "true or false",
        "string_type": "a string",
        "model_type": "a mapping",
        "dict_type": "a mapping",
        "list_type": "a list",
        "tuple_type": "a list",
    }.get(kind)
    return f"{key}: expected {expected}, got {value!r}" if expected else f"{key}: {error['msg']}"


def _locate(loc: tuple[Any, ...], unknown_key: bool) -> tuple[str, type[BaseModel] | None, str | None]:
    """The dotted key of an error, the schema model holding it, and the field's description.

    List positions and pydantic's union-member tags are left out of the key: ``grid.format``, not
    ``grid.format.0``."""
    model: type[BaseModel] | None = ExperimentFile
    owner, description, keys = model, None, []
    parts = [p for p in loc if isinstance(p, str)]
    for i, part in enumerate(parts):
        if model is not None and part in model.model_fields:
            owner, info = model, model.model_fields[part]
            keys.append(part)
            description, model = info.description, _model_in(info.annotation)
        elif unknown_key and i == len(parts) - 1:
            owner, description = model, None
            keys.append(part)
    return ".".join(keys) or "(top level)", owner, description


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]`` or ``Annotated[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation) if get_origin(annotation) is not None else ():
        if (found := _model_in(arg)) is not None:
            return found
    return None
