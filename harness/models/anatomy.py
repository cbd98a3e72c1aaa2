"""Where a transformers model can be cut: the parts that evaluation and input capture run instead of it all.

Running only a part saves the output head where it is not needed: Gemma's projects onto 262k tokens, so full
logits for every position of a window cost more than the rest of the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states, in the head's dtype, soft-capped as the model's forward does it."""
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


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
