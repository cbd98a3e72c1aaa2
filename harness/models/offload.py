"""Modules whose weights accelerate keeps away from where they run: a device map's CPU or disk offload.

Such a module's Parameters are empty ``meta`` tensors; its hook loads each one from the hook's
``weights_map`` onto the execution device before every forward and drops it after. Reading an offloaded
weight, and having the hook load another in its place for a while, go through that map.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn


def offload_map(module: nn.Module) -> Mapping[str, torch.Tensor] | None:
    """Where the hook loads a module's own tensors from for each forward, or None when they live in it."""
    hook = getattr(module, "_hf_hook", None)
    return hook.weights_map if getattr(hook, "offload", False) else None


def execution_device(module: nn.Module) -> torch.device:
    """Where an offloaded module's weights are loaded to for its forward."""
    return torch.device(_named(module._hf_hook.execution_device))


def stored(module: nn.Module, name: str) -> torch.Tensor:
    """A module's own tensor ``name`` (``weight``), read from its offload map when it is offloaded."""
    weights = offload_map(module)
    return getattr(module, name) if weights is None else weights[name]


def named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` (same names, same order, a tied one once) with the offloaded ones read
    from where they are stored."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{name}" if module_name else name, stored(module, name)


class Substituted(Mapping[str, torch.Tensor]):
    """An offload map with some of its entries replaced (by name, as the hook asks for them)."""

    def __init__(self, base: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
        self.base, self.values = base, dict(values)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.values[key] if key in self.values else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def substitute(module: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Have an offloaded module's hook load ``values`` instead of the stored tensors of those names, and give
    the module empty Parameters of the values' dtypes for them: accelerate casts what it loads to the dtype of
    the Parameter it fills. ``restore_map`` undoes the first; the caller puts its own Parameters back."""
    restore_map(module)
    module._hf_hook.weights_map = Substituted(module._hf_hook.weights_map, values)
    for name, value in values.items():
        setattr(module, name, nn.Parameter(torch.empty_like(value, device="meta"), requires_grad=False))


def restore_map(module: nn.Module) -> None:
    """The hook loads the stored tensors again; a no-op on a module nothing was substituted in."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and isinstance(hook.weights_map, Substituted):
        hook.weights_map = hook.weights_map.base


def placement(model: nn.Module) -> str:
    """Where a model's modules are: the one device, or each device of its device map with its share of the
    top-level modules the map places (``cuda:0: 12 modules, disk: 9 modules``)."""
    device_map = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    counts = Counter(_named(target) for target in device_map.values())
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name}: {count} modules" for name, count in counts.items())


def _named(target: int | str | torch.device) -> str:
    """An accelerate device as torch names it: a GPU index is that CUDA device."""
    return f"cuda:{target}" if isinstance(target, int) else str(target)
