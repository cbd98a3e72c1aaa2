"""GPTQ's calibration protocol: the calibration tokens run through the model one block at a time, each block
fed the hidden states that the blocks before it give as they are now, quantized once their turn has passed.

The hidden states entering the current block are kept (a few MB: tokens × hidden size in the model's dtype),
so each block runs twice in all: once, up to its last Linear's input, to collect its Linears' input
statistics, once, after its layers are quantized, to give the next block its input. Statistics leave out the
held-out positions, whose inputs the per-layer output error is measured on.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import Any

import torch
from torch import nn

from harness.methods import LayerQuantized, gptq
from harness.models.anatomy import Blocks, blocks, device_of
from harness.quant.quantize import QuantConfig, QuantizationError


class _Stop(BaseException):  # control flow, not an error: no `except Exception` on the way may catch it
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class SequentialInputs:
    """Input statistics of each block's Linears, block by block in order, for ``ids`` (sequences × length);
    ``fit`` (same shape, bool) marks the positions the statistics take."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, fit: torch.Tensor, chunk: int = 8) -> None:
        self.model = model
        self.structure: Blocks = blocks(model)
        self.chunks = list(zip(ids.split(chunk), fit.split(chunk), strict=True))
        self.entering: list[torch.Tensor] | None = None  # per chunk, the hidden states entering ``self.at``
        self.at = 0

    def hessians(self, block: int, names: list[str]) -> dict[str, torch.Tensor]:
        """2XᵀX / N over the fit positions of the inputs of ``names`` (Linears of ``block``, with the blocks
        before it as they are now, each called once in the block's forward); Linears fed the same tensor
        (q/k/v, gate/up) share one sum."""
        if block < self.at:
            raise ValueError(f"block {block} was passed already (at {self.at}); blocks go in order")
        while self.at < block:
            self.entering = [self._run(self.at, i) for i in range(len(self.chunks))]
            self.at += 1
        sums: dict[str, torch.Tensor] = {}  # per layer, in one chunk; siblings hold the same tensor
        count = 0
        mask: list[torch.Tensor] = []
        last: list[Any] = []  # the latest input and its sum: siblings (q/k/v, gate/up) are called in a row

        def accumulate(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not last or last[0] is not x:  # identity, not id(): a freed input's id may come back
                last[:] = [x, 2.0 * gram(x[mask[0]].float())]
            sums[name] = last[1]
            if len(sums) == len(names):  # every input collected: the rest of the block is not needed
                raise _Stop(x)

        with ExitStack() as stack:
            for name in names:
                handle = self.model.get_submodule(name).register_forward_pre_hook(partial(accumulate, name))
                stack.callback(handle.remove)
            totals: dict[str, torch.Tensor] = {}
            for i, (_, fit) in enumerate(self.chunks):
                mask[:] = [fit]
                sums.clear()
                self._run(block, i)
                last.clear()
                added: dict[int, torch.Tensor] = {}  # siblings' shared sum, added once
                for name in names:
                    part = sums[name]
                    if id(part) not in added:
                        added[id(part)] = part if name not in totals else totals[name] + part
                    totals[name] = added[id(part)]
                count += int(fit.sum())
        means: dict[int, torch.Tensor] = {}  # siblings keep sharing one tensor: GPTQ factorises it once
        for total in totals.values():
            means.setdefault(id(total), total / max(count, 1))
        return {name: means[id(total)] for name, total in totals.items()}

    def _run(self, block: int, chunk: int) -> torch.Tensor:
        """The output of ``block`` for one chunk of sequences, the blocks before it skipped (their output is
        ``self.entering``) except for block 0, which the model's own embedding feeds."""
        ids = self.chunks[chunk][0]
        target = self.structure.layers[block]
        handle = target.register_forward_hook(_stop)
        with ExitStack() as stack:
            stack.callback(handle.remove)
            if block > 0:
                assert self.entering is not None
                entering = self.entering[chunk]
                stack.enter_context(self.structure.starting_at(block, _constant(entering)))
            try:
                with torch.no_grad():
                    self.model(input_ids=ids.to(device_of(self.model)), use_cache=False)
            except _Stop as stop:
                return stop.hidden
        raise RuntimeError(f"block {block} of {type(self.model).__name__} never ran")


GRAM_WIDTH = 256  # columns per block-row of a Hessian's product


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows.T @ rows`` from the GEMMs of its upper block-rows (``GRAM_WIDTH`` columns each), mirrored below:
    56 % of the full product's FLOPs at 2048 columns. On the CPU's BLAS each entry is the same dot product
    summed in the same order, so the values are the full product's bit for bit (tested)."""
    size, width = rows.shape[1], GRAM_WIDTH
    out = torch.empty(size, size, dtype=rows.dtype, device=rows.device)
    for i in range(0, size, width):
        out[i : i + width, i:] = rows[:, i : i + width].T @ rows[:, i:]
        out[i + width :, i : i + width] = out[i : i + width, i + width :].T
    return out


def _stop(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    raise _Stop(output[0] if isinstance(output, tuple) else output)


def _constant(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: value


class SequentialGptq:
    """GPTQ over a model's blocks in order (``apply`` asks for layers in module order): a layer's Hessian
    comes from its block's inputs with the blocks before it as ``apply`` has left them, quantized."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        ids: torch.Tensor,
        fit: torch.Tensor,
        settings: dict[str, Any],
    ) -> None:
        self.inputs = SequentialInputs(model, ids, fit)
        self.names = names
        self.settings = settings
        self.pending: dict[str, gptq.Factor] = {}

    @property
    def fit_tokens(self) -> int:
        return int(sum(int(fit.sum()) for _, fit in self.inputs.chunks))

    def __call__(self, name: str, weight: torch.Tensor, config: QuantConfig) -> LayerQuantized:
        if name not in self.pending:
            block = self.inputs.structure.index(name)
            if block is None:
                raise QuantizationError(f"{name}: gptq quantizes the Linears inside the transformer blocks")
            members = [n for n in self.names if self.inputs.structure.index(n) == block]
            factors: dict[int, gptq.Factor] = {}  # siblings (q/k/v, gate/up) share one Hessian
            for member, hessian in self.inputs.hessians(block, members).items():
                if id(hessian) not in factors:
                    factors[id(hessian)] = gptq.factorise(
                        hessian, damp=self.settings["damp"], act_order=self.settings["act_order"]
                    )
                self.pending[member] = factors[id(hessian)]
        factor = self.pending.pop(name)
        return gptq.quantize_factored(
            weight, factor, config, lazy_block=self.settings["lazy_block"], name=name
        )
