"""The inputs each chosen Linear layer sees on the unquantized model, at seeded calibration positions, and the
first module of a forward pass whose output is not finite."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from harness.models.anatomy import body, device_of
from harness.models.layers import LayerInfo

CAPTURE_ROWS = 256  # held-out calibration positions each layer's output error is measured on


@torch.inference_mode()
def first_nonfinite_module(model: nn.Module, input_ids: torch.Tensor) -> str | None:
    """The first module, in the order the forward pass runs them, whose output holds a NaN or an infinity
    (forward hooks on every module; one pass over ``input_ids``); None if every output is finite."""
    found: list[str] = []

    def hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            tensors = [output]
        else:  # a tuple of outputs, or a ModelOutput (a mapping)
            tensors = list(output.values() if isinstance(output, Mapping) else output or ())
        if not found and any(
            isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
            for t in tensors
        ):
            found.append(name)

    handles = [m.register_forward_hook(partial(hook, name)) for name, m in model.named_modules() if name]
    try:
        model(input_ids.to(device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


@torch.inference_mode()
def capture_inputs(
    model: nn.Module,
    layers: list[LayerInfo],
    input_ids: torch.Tensor,
    positions: slice = slice(0, CAPTURE_ROWS),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs of each chosen Linear on the unquantized model at the same token positions for every layer:
    ``positions`` of a seeded permutation of ``input_ids``' (n_seq, seq_len); the first ``CAPTURE_ROWS`` are
    the held-out rows (``held_out``) each layer's output error is measured on. In the model's dtype (the error
    metrics widen them exactly). Layers fed the same tensor (q/k/v, gate/up) share one copy. Sequences run one
    at a time so that memory stays at one sequence's activations plus the kept rows."""
    n_seq, seq_len = input_ids.shape
    rows = _permutation(n_seq * seq_len, seed)[positions].sort().values
    kept: dict[str, list[torch.Tensor]] = {info.name: [] for info in layers}
    current = rows[:0]
    last: list[torch.Tensor] = []  # the latest input and its kept rows: siblings are called one after another

    def keep(name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        if not last or last[0] is not x:
            last[:] = [x, x.reshape(-1, x.shape[-1])[current]]
        kept[name].append(last[1])

    runner = body(model, [info.name for info in layers])
    handles = [
        model.get_submodule(info.name).register_forward_pre_hook(partial(keep, info.name)) for info in layers
    ]
    try:
        for i in range(n_seq):
            current = rows[(rows >= i * seq_len) & (rows < (i + 1) * seq_len)] - i * seq_len
            if current.numel():
                runner(input_ids=input_ids[i : i + 1].to(device_of(model)))
    finally:
        last.clear()
        for handle in handles:
            handle.remove()
    joined: dict[tuple[int, ...], torch.Tensor] = {}
    for xs in kept.values():
        key = tuple(id(x) for x in xs)
        joined.setdefault(key, torch.cat(xs))
    return {name: joined[tuple(id(x) for x in xs)] for name, xs in kept.items()}


def held_out(input_ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A (n_seq, seq_len) mask of the positions ``capture_inputs`` takes by default: those a method that fits
    on calibration tokens leaves out, so that the output error is measured on positions it never saw."""
    mask = torch.zeros(input_ids.numel(), dtype=torch.bool)
    mask[_permutation(input_ids.numel(), seed)[:CAPTURE_ROWS]] = True
    return mask.view(input_ids.shape)


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
