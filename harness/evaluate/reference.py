"""The cached base reference: the base model's distribution at a perplexity protocol's scored positions,
plus per-token statistics (its NLL of each target, its argmax).

It is computed once per (model, tokens, protocol) and reused by every quantization config of a sweep, which
``harness.evaluate.divergence`` scores against it. ``ReferenceStorage`` says how it keeps the distribution:
the base's top k tokens, m tokens drawn from the rest (∝ p, with a fixed seed) and the tail's mass, or the
whole vocabulary's log-probabilities in float16 or float32; the divergence module's docstring says what KL
each gives and what it costs.

Either way the cache is a folder named by a hash of (key, a fingerprint of the model's weights, the tokens,
the protocol, BOS handling, the storage), built under a temporary name and renamed into place, meta.json
written last (``harness.cache.building``), so an entry is either complete or absent and two processes needing
the same one compute it once. Its arrays are read back a chunk of rows at a time, never whole.
``cache_dir=None`` keeps it in RAM.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from harness import gemm
from harness.cache import building
from harness.evaluate.logits import column_tiles, reduce_logits
from harness.evaluate.windows import (
    PerplexityProtocol,
    PerplexityResult,
    check_finite,
    check_tokens,
    make_windows,
    scored_rows,
    starts_with_bos,
    summarize,
)
from harness.models import offload

FORMAT = 5  # bump when the cache layout or its meaning changes
STORAGE_DTYPES = ("float16", "float32")
TAIL_SEED = 0  # the tail samples are part of the reference: drawn once, reproducibly
_BUILD_ROWS = 32
_STATS, _META = "stats.npz", "meta.json"


@dataclass(frozen=True)
class ReferenceStorage:
    """How a reference keeps the base distribution: its top ``k`` tokens, or the whole vocabulary in
    ``dtype``."""

    kind: Literal["topk", "exact"] = "topk"
    k: int = 64
    samples: int = 48  # topk only: tail tokens drawn per position
    dtype: str = "float16"  # exact only

    def __post_init__(self) -> None:
        if self.kind == "exact" and self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"exact storage keeps {' or '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.kind == "topk" and (self.k < 1 or self.samples < 1):
            raise ValueError(f"top-k storage needs k >= 1 and samples >= 1, got {self.k}, {self.samples}")

    @property
    def arrays(self) -> dict[str, str]:
        """The per-token row arrays of the cache, by name and dtype."""
        if self.kind == "exact":
            return {"logprobs": self.dtype}
        return {
            "topk_index": "int32",
            "topk_logprob": "float32",
            "tail_index": "int32",
            "tail_logprob": "float32",
        }

    @property
    def label(self) -> str:
        if self.kind == "exact":
            return f"full vocabulary, {self.dtype}"
        return f"top-{self.k} exact + {self.samples}-sample tail estimate"


def model_fingerprint(model: nn.Module) -> str:
    """A cheap hash of every parameter's name, shape, dtype and ~1k evenly spaced values: guards the cache
    against being built from, or hit by, a different (e.g. already quantized) set of weights."""
    digest = hashlib.sha256()
    for name, param in offload.named_parameters(model):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


class BaseReference:
    """The base model's distribution at a protocol's scored positions, plus per-token statistics."""

    def __init__(
        self,
        *,
        tokens: torch.Tensor,
        protocol: PerplexityProtocol,
        bos_token_id: int | None,
        text_bytes: int,
        text_words: int,
        batch_size: int,
        storage: ReferenceStorage,
        arrays: dict[str, np.ndarray],
        stats: dict[str, np.ndarray],
        meta: dict,
        path: Path | None,
    ) -> None:
        self.tokens = tokens
        self.protocol = protocol
        self.bos_token_id = bos_token_id
        self.text_bytes = text_bytes
        self.text_words = text_words
        self.batch_size = batch_size
        self.storage = storage
        self.arrays = arrays  # per storage.arrays: (n_scored, width), memmaps when cached on disk
        self.nll = stats["nll"]  # base NLL of each target, float64
        self.top1 = stats["top1"]  # base argmax from fp32 logits, int64
        self.mass = stats["mass"]  # exact: Σ exp(stored log-probs); topk: the tail mass outside the top k
        self.stats = stats  # and for exact storage, neg_entropy: Σ p~ log p~ of the stored vector
        self.meta = meta
        self.path = path
        self.vocab_size = int(meta["vocab_size"])

    @property
    def n_tokens(self) -> int:
        return len(self.nll)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()) + sum(a.nbytes for a in self.stats.values()))

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / self.n_tokens

    @property
    def bos(self) -> bool:
        return starts_with_bos(self.tokens, self.bos_token_id)

    def perplexity(self) -> PerplexityResult:
        """The base model's own perplexity under the protocol, from the cached NLLs (no forward pass)."""
        return summarize(
            self.protocol,
            self.nll,
            self.tokens.shape[1],
            text_bytes=self.text_bytes,
            text_words=self.text_words,
            bos=self.bos,
        )

    def rows(self, rows: slice) -> dict[str, np.ndarray]:
        """The stored arrays' rows for positions ``rows``.

        Read with plain file I/O rather than through the memory map: every page touched through a map stays
        in the process's RSS, so one pass over a large exact reference would hold it all resident; this way a
        pass holds one chunk (re-reads still come from the kernel's page cache)."""
        return {name: _read_rows(array, rows) for name, array in self.arrays.items()}

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokens: torch.Tensor,
        protocol: PerplexityProtocol,
        cache_dir: Path | str | None = None,
        key: str = "",
        *,
        text_bytes: int,
        text_words: int,
        bos_token_id: int | None = None,
        storage: ReferenceStorage = ReferenceStorage(),
        batch_size: int = 4,
        progress: bool = True,
    ) -> BaseReference:
        """Load the reference from ``cache_dir`` or compute it with one pass of the (unquantized) ``model``.

        ``key`` names the model (asset, compute dtype); with the weight fingerprint, the tokens, the protocol,
        the batch size, torch's thread count and how 16-bit products run (``gemm.methods``) it decides the
        cache entry. The last three are part of it because a bf16 pass's bits can depend on the GEMM shapes,
        on how the threads split them and on the kernel's summation order, and bf16 rounding makes a one-ulp
        flip visible: a bf16 smollm2-135m baseline read against a reference cached by another process was
        seen at a KLD of 1.2e-3 from itself.
        Build before quantizing: the fingerprint keeps a quantized model from hitting the base's entry, but
        cannot tell that a model is not the base.
        ``text_bytes``/``text_words`` only feed the perplexity numbers.
        """
        tokens = check_tokens(tokens)
        common = {
            "tokens": tokens,
            "protocol": protocol,
            "bos_token_id": bos_token_id,
            "text_bytes": text_bytes,
            "text_words": text_words,
            "batch_size": batch_size,
            "storage": storage,
        }
        if cache_dir is None:
            arrays, stats, meta = _compute(
                model, tokens, protocol, bos_token_id, storage, batch_size, progress
            )
            return cls(**common, arrays=arrays, stats=stats, meta=meta, path=None)

        digest = _digest(key, model_fingerprint(model), tokens, protocol, bos_token_id, storage, batch_size)
        final = Path(cache_dir).expanduser() / digest
        with building(final, _META) as build:
            if build is not None:
                _, _, meta = _compute(
                    model, tokens, protocol, bos_token_id, storage, batch_size, progress, out=build
                )
                meta.update(key=key, digest=digest)
                (build / _META).write_text(json.dumps(meta, indent=2) + "\n")
        return cls(**common, **_load(final, storage), path=final)


def _digest(
    key: str,
    fingerprint: str,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    bos_token_id: int | None,
    storage: ReferenceStorage,
    batch_size: int,
) -> str:
    head = json.dumps(
        {
            "format": FORMAT,
            "key": key,
            "model": fingerprint,
            "protocol": asdict(protocol),
            "bos_token_id": bos_token_id,
            "storage": asdict(storage),
            "batch_size": batch_size,
            "threads": torch.get_num_threads(),
            "products": gemm.methods(),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(head.encode())
    digest.update(tokens.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:24]


def _load(folder: Path, storage: ReferenceStorage) -> dict:
    meta = json.loads((folder / _META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder} holds a base reference of format {meta.get('format')}, expected {FORMAT}")
    with np.load(folder / _STATS) as npz:
        stats = {name: npz[name] for name in npz.files}
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in storage.arrays}
    return {"arrays": arrays, "stats": stats, "meta": meta}


@torch.inference_mode()
def _compute(
    model: nn.Module,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    bos_token_id: int | None,
    storage: ReferenceStorage,
    batch_size: int,
    progress: bool,
    out: Path | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """One pass of the base model; writes the row arrays (.npy) and stats.npz into ``out`` when given."""
    start = time.perf_counter()
    windows = make_windows(protocol, tokens.shape[1])
    n = sum(w.n_scored for w in windows)
    bos = starts_with_bos(tokens, bos_token_id)
    arrays: dict[str, np.ndarray] = {}
    stats = {name: np.empty(n, np.float64) for name in ("nll", "mass")}
    stats["top1"] = np.empty(n, np.int64)
    if storage.kind == "exact":
        stats["neg_entropy"] = np.empty(n, np.float64)
    at = 0
    generator = torch.Generator().manual_seed(TAIL_SEED)
    head, passes = scored_rows(
        model,
        tokens,
        protocol,
        bos_token_id=bos_token_id,
        batch_size=batch_size,
        progress=progress,
        desc=f"base reference {protocol.name}",
        whole_rows=True,  # the top k and the tail draws need the full distribution
    )
    vocab = head.vocab
    head_width, tail = min(storage.k, vocab), storage.samples
    widths = {"logprobs": vocab, "topk_index": head_width, "topk_logprob": head_width}
    widths |= {"tail_index": tail, "tail_logprob": tail}
    for name, dtype in storage.arrays.items():
        shape = (n, widths[name])
        if out is None:
            arrays[name] = np.empty(shape, dtype=dtype)
        else:  # the header and the file's size; rows are then written with plain file I/O
            arrays[name] = np.lib.format.open_memmap(out / f"{name}.npy", "w+", dtype, shape)
    buffers = torch.empty(2, head.rows, vocab)  # the logits, and their probabilities in _store
    for rows in passes:
        logits = head.full(rows, out=buffers[0, : len(rows)])
        scores = reduce_logits(column_tiles(logits), rows.targets)  # as every evaluation reduces them
        finite = torch.isfinite(scores.nll).numpy()  # NaN or +inf anywhere in a row makes its NLL so
        stats["nll"][at : at + len(rows)] = np.where(finite, scores.nll.numpy(), np.nan)
        stats["top1"][at : at + len(rows)] = scores.argmax.numpy()
        if not finite.all():  # nothing of a non-finite model is stored; the pass goes on to count
            at += len(rows)
            continue
        # a few rows at a time: each step makes vocabulary-wide temporaries (Gemma: 1-2 MiB a row)
        for first in range(0, len(rows), _BUILD_ROWS):
            part = slice(first, first + _BUILD_ROWS)
            where = slice(at + first, at + min(first + _BUILD_ROWS, len(rows)))
            scratch = buffers[1, : where.stop - where.start]
            _store(arrays, stats, where, logits[part], scores.lse[part], storage, generator, scratch)
        at += len(rows)
    assert arrays and at == n
    check_finite(stats["nll"], "the base model")  # raised before the entry is complete: it is not kept
    seconds = time.perf_counter() - start
    if out is not None:
        np.savez(out / _STATS, **stats)
    meta = {
        "format": FORMAT,
        "protocol": asdict(protocol),
        "n_tokens_scored": n,
        "vocab_size": vocab,
        "storage": asdict(storage),
        "bos": bos,
        "stream_tokens": int(tokens.shape[1]),
        "bytes": int(sum(a.nbytes for a in arrays.values())),
        "build_seconds": round(seconds, 3),
    }
    return arrays, stats, meta


def _store(
    arrays: dict[str, np.ndarray],
    stats: dict[str, np.ndarray],
    rows: slice,
    logits: torch.Tensor,
    lse: torch.Tensor,
    storage: ReferenceStorage,
    generator: torch.Generator,
    scratch: torch.Tensor,
) -> None:
    """The reference's arrays and its mass statistic for the positions ``rows``, from the base's fp32 logits
    and their float64 log-sum-exp (``reduce_logits``); ``scratch`` is a buffer of the logits' shape."""
    if storage.kind == "exact":
        lp = logits.double() - lse[:, None]
        # ~ -65504 (finite) for float16 instead of -inf, so that 0 * l stays 0 below
        stored = lp.clamp(min=float(np.finfo(storage.dtype).min)).to(getattr(torch, storage.dtype))
        _write_rows(arrays["logprobs"], rows, stored.numpy())
        exact = stored.double()  # the statistics of what was stored, not of lp
        weights = exact.exp()
        mass = weights.sum(dim=-1)
        stats["neg_entropy"][rows] = (weights.mul_(exact).sum(dim=-1) / mass - mass.log()).numpy()
    else:
        head_z, head_index = logits.topk(arrays["topk_index"].shape[1], dim=-1)
        _write_rows(arrays["topk_index"], rows, head_index.to(torch.int32).numpy())
        _write_rows(arrays["topk_logprob"], rows, (head_z.double() - lse[:, None]).float().numpy())
        # the tail's mass summed from its own probabilities: 1 − Σ head is all rounding when the tail is tiny
        tail = torch.sub(logits, lse[:, None].float(), out=scratch).exp_().scatter_(1, head_index, 0.0)
        mass = tail.sum(dim=-1).double()  # cascade-summed in float32: no float64 copy of the row
        tail[mass == 0, 0] = 1.0  # no tail to draw from: any index, weighted by r = 0 below
        drawn = torch.multinomial(tail, storage.samples, replacement=True, generator=generator)
        _write_rows(arrays["tail_index"], rows, drawn.to(torch.int32).numpy())
        drawn_lp = logits.gather(1, drawn).double() - lse[:, None]
        _write_rows(arrays["tail_logprob"], rows, drawn_lp.float().numpy())
    stats["mass"][rows] = mass.numpy()


def _read_rows(array: np.ndarray, rows: slice) -> np.ndarray:
    if not isinstance(array, np.memmap):
        return np.asarray(array[rows])
    width = array.shape[1]
    with open(array.filename, "rb") as file:
        file.seek(array.offset + rows.start * width * array.itemsize)
        block = np.fromfile(file, array.dtype, (rows.stop - rows.start) * width)
    return block.reshape(-1, width)


def _write_rows(array: np.ndarray, rows: slice, block: np.ndarray) -> None:
    if not isinstance(array, np.memmap):
        array[rows] = block
        return
    with open(array.filename, "r+b") as file:
        file.seek(array.offset + rows.start * array.shape[1] * array.itemsize)
        file.write(np.ascontiguousarray(block, array.dtype).data)
