"""Where a transformers model can be cut: the parts that evaluation and input capture run instead of it all.

Running only a part saves the output head where it is not needed: Gemma's projects onto 262k tokens, so full
logits for every position of a window cost more than the rest of the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from harness.models.offload import execution_device


@dataclass(frozen=True)
class LogitSplit:
    """A causal LM as ``decoder`` (ids → last hidden states) then ``head`` (hidden states → logits), the
    logits soft-capped as ``softcap * tanh(logits / softcap)`` when ``softcap`` is set (Gemma's last step)."""

    decoder: nn.Module
    head: nn.Module
    softcap: float | None

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states (B, L, H) for input ids (B, L)."""
        out = self.decoder(input_ids=ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def scored(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last hidden states (C, H) at the positions ``mask`` (B, L) marks, on the device they end on
        (the last GPU of a model spread over several)."""
        hidden = self.hidden_states(ids)
        return hidden[mask.to(hidden.device)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states, in the head's dtype, soft-capped as the model's forward does it."""
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def device_of(model: nn.Module) -> torch.device:
    """Where a model's inputs go: where its first parameters live, or, when a device map placed the model,
    where its first module runs (its weights may wait on the host or the disk, as empty ``meta`` tensors)."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return execution_device(module)
        for param in module.parameters(recurse=False):
            return param.device
    return torch.device("cpu")


def logit_split(model: nn.Module) -> LogitSplit | None:
    """The decoder, output head and final-logit soft-capping of a causal LM, or None when the model does not
    expose a decoder and an output head apart from itself. Nothing here proves that the parts reproduce the
    model's forward; a caller that relies on it checks once."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None
    decoder, head = get_decoder(), get_head()
    if not (isinstance(decoder, nn.Module) and isinstance(head, nn.Module)) or decoder is model:
        return None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return LogitSplit(decoder, head, softcap)


def body(model: nn.Module, names: list[str]) -> nn.Module:
    """The base model when every named submodule lies inside it, else the model: running the base skips the
    output head (262k × seq logits for Gemma) where only the layers' inputs are wanted."""
    base = getattr(model, "base_model", model)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if base is not model and all(name.startswith(prefix) for name in names):
        return base
    return model


@dataclass(frozen=True)
class Blocks:
    """A model's transformer blocks: the ModuleList of decoder layers, its dotted name, and how to run the
    model from block ``b`` on with the hidden states that enter it supplied from outside (a prefix cache)."""

    name: str
    layers: nn.ModuleList
    hidden_size: int  # the width of the hidden states between blocks

    def index(self, layer_name: str) -> int | None:
        """The block a (sub)module lies in, or None outside the blocks (lm_head, embeddings)."""
        head, found, rest = layer_name.partition(f"{self.name}.")
        if found and not head and rest.split(".", 1)[0].isdigit():
            return int(rest.split(".", 1)[0])
        return None

    def part(self, layer_name: str) -> str:
        """A layer's path inside its block, e.g. ``self_attn.v_proj``: the same part of every block."""
        return layer_name.removeprefix(f"{self.name}.").split(".", 1)[-1]

    @contextmanager
    def recording(self, sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
        """Hand ``sink`` the hidden states entering each block, on every forward pass of the model."""

        def record(index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sink(index, _hidden_states(args, kwargs))

        handles = [
            block.register_forward_pre_hook(partial(record, i), with_kwargs=True)
            for i, block in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def starting_at(self, first: int, hidden: Callable[[], torch.Tensor]) -> Iterator[None]:
        """Forward passes skip blocks before ``first`` and feed it ``hidden()`` instead of what they would
        have computed. The embedding, masks and rotary tables are still made by the model's own forward (they
        are cheap), so the blocks from ``first`` on see exactly what a full pass gives them."""

        def substitute(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (hidden(), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden()}

        skipped = list(self.layers)[:first]
        wrapped = [block.__dict__.get("forward") for block in skipped]  # a device map's hook wraps forward
        for block in skipped:
            block.forward = _pass_through  # an instance attribute: the class's forward is untouched
        handle = self.layers[first].register_forward_pre_hook(substitute, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for block, forward in zip(skipped, wrapped, strict=True):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward


def blocks(model: nn.Module) -> Blocks:
    """The model's transformer blocks: the first nn.ModuleList of modules that all hold a Linear."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module)
        ):
            return Blocks(name, module, int(model.get_input_embeddings().embedding_dim))
    raise ValueError(f"{type(model).__name__} has no list of transformer blocks")


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _pass_through(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _hidden_states(args, kwargs)
