"""The hidden states entering every block, computed once per evaluation window, and probes that start from
them: a unit whose layers lie in blocks b and later runs blocks b..end and the head only."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from harness.cache import cache_dir
from harness.errors import HarnessError
from harness.evaluate.divergence import divergence_of, whole_rows
from harness.evaluate.logits import LogitHead, ScoredRows, WindowBatch
from harness.evaluate.reference import BaseReference
from harness.evaluate.windows import window_batches
from harness.models import blocks
from harness.models.anatomy import device_of
from harness.session import ModelSession


class SensitivityError(HarnessError, ValueError):
    """A sensitivity or allocation request that cannot be met (one line)."""


class PrefixCache:
    """The hidden states entering every block for every evaluation window of the base, and probes that
    start from them.

    ``states[b, w, :n]`` holds what enters block b at window w's n input positions (right-padded as the
    windows are batched). In memory up to ``memory_bytes``, else in a file that is removed on ``close``."""

    def __init__(self, session: ModelSession, memory_bytes: int) -> None:
        reference = _reference(session)
        model = session.loaded.model
        self.session, self.reference = session, reference
        self.structure = blocks(model)
        self.batches: list[WindowBatch] = window_batches(
            reference.tokens,
            reference.protocol,
            bos_token_id=reference.bos_token_id,
            batch_size=reference.batch_size,
        )
        with torch.inference_mode():
            self.head = LogitHead.of(model, reference.tokens)
        if self.head.split is None:
            raise SensitivityError(f"{session.loaded.name}: prefix caching needs a decoder and output head")
        decoder = self.head.split
        self.device = device_of(model)  # the states stay in host memory (or on disk); ids and states move
        windows = sum(len(b.ids) for b in self.batches)
        width = max(b.ids.shape[1] for b in self.batches)
        dtype = next(model.parameters()).dtype
        shape = (len(self.structure.layers), windows, width, self.structure.hidden_size)
        self.nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        if self.nbytes <= memory_bytes:
            self.states = torch.zeros(shape, dtype=dtype)
        else:
            (cache_dir() / "prefix").mkdir(parents=True, exist_ok=True)
            self._folder = tempfile.TemporaryDirectory(dir=cache_dir() / "prefix")
            path = Path(self._folder.name) / "states.bin"
            with open(path, "wb") as file:
                file.truncate(self.nbytes)
            self.states = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
            self.states = self.states.view(shape)
        self.rows: list[slice] = []
        at = 0
        for batch in self.batches:
            self.rows.append(slice(at, at + len(batch.ids)))
            at += len(batch.ids)
        current: slice = self.rows[0]

        def keep(block: int, hidden_states: torch.Tensor) -> None:
            self.states[block, current, : hidden_states.shape[1]] = hidden_states.detach()

        with torch.inference_mode(), self.structure.recording(keep):
            for rows, batch in zip(self.rows, self.batches, strict=True):
                current = rows
                decoder.hidden_states(batch.ids.to(self.device))

    @property
    def on_disk(self) -> bool:
        return self._folder is not None

    def close(self) -> None:
        if self._folder is not None:
            del self.states
            self._folder.cleanup()
            self._folder = None

    def passes(self, first_block: int | None) -> Iterator[ScoredRows]:
        """The scored positions' hidden states, from block ``first_block`` on (None: all)."""
        split = self.head.split
        assert split is not None
        for rows, batch in zip(self.rows, self.batches, strict=True):
            ids, mask = batch.ids.to(self.device), batch.mask.to(self.device)
            if first_block is None:
                picked = split.scored(ids, mask)
            else:
                entering = self.states[first_block, rows, : batch.ids.shape[1]].to(self.device)
                with self.structure.starting_at(first_block, lambda: entering):  # noqa: B023 (used at once)
                    picked = split.scored(ids, mask)
            yield from self.head.rows_of(picked, batch.targets, whole_rows(self.reference))

    def evaluate(self, first_block: int | None) -> dict[str, np.ndarray]:
        """Per scored token against the base reference: nll, kld, top1_match."""
        with torch.inference_mode():
            ppl, divergence = divergence_of(self.reference, self.head, self.passes(first_block))
        return {"nll": ppl.nll, "kld": divergence.kld, "top1_match": divergence.top1_match}


def _reference(session: ModelSession) -> BaseReference:
    if session.reference is None:
        raise SensitivityError("sensitivity needs KLD against the base: set eval.kld: true")
    return session.reference
