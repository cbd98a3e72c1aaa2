"""KL(base ‖ quantized) per token, exact over the full vocabulary, and top-1 agreement, against a cached base.

The base model's distribution at every scored position is computed once per (model, tokens, protocol) and
reused by every quantization config of a sweep, so a config costs one forward pass, which also yields its
perplexity (``evaluate_against``). The windows and scored positions are a perplexity protocol's (llama.cpp's
``--kl-divergence`` uses its llamacpp windows; that is the usual choice).

Storage. An exact KL needs the whole base distribution, so the cache holds, per scored position, the full
vector of base log-probabilities in float16: 2 bytes x vocab, i.e. 96 KiB/token for SmolLM2 (49,152) and
512 KiB/token for Gemma 3 (262,144); 1,000 scored Gemma tokens take 0.5 GB. It is an .npy file read through a
memmap, beside a few per-token float64 statistics, in a folder named by a hash of (key, a fingerprint of the
model's weights, the tokens, the protocol, BOS handling, storage dtype). The folder is built under a temporary
name and renamed into place, meta.json written last (``harness.cache.building``), so an entry is either
complete or absent and two processes needing the same one compute it once. ``cache_dir=None`` keeps it in RAM.

Precision. float16 keeps 11 significant bits: a stored log-prob l carries an error |d| <= 2^-12 |l| (2.4e-4
at l = -1, where the mass is; 0.008 at l = -32, where it is not). bfloat16 would be 8x coarser: not offered.
The stored vector is renormalised, p~ = exp(l~) / sum(exp(l~)), so the KL computed is a true KL of a proper
distribution p~ against the quantized q; KL(p~ ‖ p) itself is second order, about Var_p(d)/2 < 1e-7, which is
the floor the self-check (base against its own cache) measures. The per-config cost is kept small by the
identity KL = [sum p~ log p~] - sum p~ z + logsumexp(z), z the quantized logits shifted by their max: the
bracket is precomputed at build time, leaving per position one exp of the stored vector, one dot product and
one logsumexp (about 5x cheaper than two full log-softmaxes at Gemma's vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.cache import building
from harness.evaluate.perplexity import (
    PerplexityProtocol,
    PerplexityResult,
    check_tokens,
    make_windows,
    scored_logits,
    starts_with_bos,
    summarize,
)

FORMAT = 1  # bump when the cache layout or its meaning changes
STORAGE_DTYPES = ("float16", "float32")
_LOGPROBS, _STATS, _META = "logprobs.npy", "stats.npz", "meta.json"


@dataclass(frozen=True, eq=False)
class DivergenceResult:
    """Per scored token, in protocol order: KL(base ‖ quantized) and whether both argmaxes agree."""

    kld: np.ndarray  # float64, nats
    top1_match: np.ndarray  # bool: base and quantized argmax agree ("same top p")
    base_nll: np.ndarray  # float64: the base model's NLL of each target, from the reference
    storage: str  # how the reference holds the base distribution
    protocol: str

    @property
    def n_tokens(self) -> int:
        return len(self.kld)

    @property
    def kld_mean(self) -> float:
        return float(self.kld.mean())

    @property
    def top1_agreement(self) -> float:
        return float(self.top1_match.mean())


def model_fingerprint(model: nn.Module) -> str:
    """A cheap hash of every parameter's name, shape, dtype and ~1k evenly spaced values: guards the cache
    against being built from, or hit by, a different (e.g. already quantized) set of weights."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


class BaseReference:
    """The base model's full log-probabilities at a protocol's scored positions, plus per-token statistics."""

    def __init__(
        self,
        *,
        tokens: torch.Tensor,
        protocol: PerplexityProtocol,
        bos_token_id: int | None,
        text_bytes: int,
        text_words: int,
        batch_size: int,
        logprobs: np.ndarray,
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
        self.logprobs = logprobs  # (n_scored, vocab), float16 (memmap when cached on disk)
        self.nll = stats["nll"]  # base NLL of each target, float64
        self.top1 = stats["top1"]  # base argmax from fp32 logits, int64
        self.neg_entropy = stats["neg_entropy"]  # sum p~ log p~ of the stored (renormalised) vector
        self.inv_mass = stats["inv_mass"]  # 1 / sum exp(stored log-probs)
        self.meta = meta
        self.path = path

    @property
    def n_tokens(self) -> int:
        return self.logprobs.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.logprobs.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.logprobs.nbytes + sum(a.nbytes for a in (self.nll, self.top1, self.neg_entropy)))

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
        storage_dtype: str = "float16",
        batch_size: int = 4,
        progress: bool = True,
    ) -> BaseReference:
        """Load the reference from ``cache_dir`` or compute it with one pass of the (unquantized) ``model``.

        ``key`` names the model (asset, compute dtype); with the weight fingerprint, the tokens and the
        protocol it decides the cache entry. Build before quantizing: the fingerprint keeps a quantized model
        from hitting the base's entry, but cannot tell that a model is not the base.
        ``text_bytes``/``text_words`` only feed the perplexity numbers.
        """
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}"
            )
        tokens = check_tokens(tokens)
        common = {
            "tokens": tokens,
            "protocol": protocol,
            "bos_token_id": bos_token_id,
            "text_bytes": text_bytes,
            "text_words": text_words,
            "batch_size": batch_size,
        }
        if cache_dir is None:
            logprobs, stats, meta = _compute(
                model, tokens, protocol, bos_token_id, storage_dtype, batch_size, progress, out=None
            )
            return cls(**common, logprobs=logprobs, stats=stats, meta=meta, path=None)

        digest = _digest(key, model_fingerprint(model), tokens, protocol, bos_token_id, storage_dtype)
        final = Path(cache_dir).expanduser() / digest
        with building(final, _META) as build:
            if build is not None:
                _, _, meta = _compute(
                    model, tokens, protocol, bos_token_id, storage_dtype, batch_size, progress, out=build
                )
                meta.update(key=key, digest=digest)
                (build / _META).write_text(json.dumps(meta, indent=2) + "\n")
        return cls(**common, **_load(final), path=final)


def _digest(
    key: str,
    fingerprint: str,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    bos_token_id: int | None,
    storage_dtype: str,
) -> str:
    head = json.dumps(
        {
            "format": FORMAT,
            "key": key,
            "model": fingerprint,
            "protocol": asdict(protocol),
            "bos_token_id": bos_token_id,
            "storage_dtype": storage_dtype,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(head.encode())
    digest.update(tokens.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:24]


def _load(folder: Path) -> dict:
    meta = json.loads((folder / _META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder} holds a base reference of format {meta.get('format')}, expected {FORMAT}")
    with np.load(folder / _STATS) as npz:
        stats = {name: npz[name] for name in npz.files}
    return {"logprobs": np.load(folder / _LOGPROBS, mmap_mode="r"), "stats": stats, "meta": meta}


@torch.inference_mode()
def _compute(
    model: nn.Module,
    tokens: torch.Tensor,
    protocol: PerplexityProtocol,
    bos_token_id: int | None,
    storage_dtype: str,
    batch_size: int,
    progress: bool,
    out: Path | None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """One pass of the base model; writes logprobs.npy and stats.npz into ``out`` when given."""
    start = time.perf_counter()
    windows = make_windows(protocol, tokens.shape[1])
    n = sum(w.n_scored for w in windows)
    bos = starts_with_bos(tokens, bos_token_id)
    logprobs: np.ndarray | None = None
    stats = {
        "nll": np.empty(n, np.float64),
        "top1": np.empty(n, np.int64),
        "neg_entropy": np.empty(n, np.float64),
        "inv_mass": np.empty(n, np.float64),
    }
    at = 0
    for logits, targets in scored_logits(
        model,
        tokens,
        protocol,
        bos_token_id=bos_token_id,
        batch_size=batch_size,
        progress=progress,
        desc=f"base reference {protocol.name}",
    ):
        if logprobs is None:
            shape = (n, logits.shape[1])
            if out is None:
                logprobs = np.empty(shape, dtype=storage_dtype)
            else:  # the header and the file's size; rows are then written with plain file I/O
                logprobs = np.lib.format.open_memmap(
                    out / _LOGPROBS, mode="w+", dtype=storage_dtype, shape=shape
                )
        rows = slice(at, at + len(targets))
        lp = torch.log_softmax(logits, dim=-1)
        stats["nll"][rows] = (-lp.gather(1, targets[:, None])[:, 0]).double().numpy()
        stats["top1"][rows] = logits.argmax(dim=-1).numpy()
        # ~ -65504 (finite) for float16 instead of -inf, so that 0 * l stays 0 below
        stored = lp.clamp(min=float(np.finfo(storage_dtype).min)).to(getattr(torch, storage_dtype))
        _write_rows(logprobs, rows, stored.numpy())
        exact = stored.double()  # the statistics of what was stored, not of lp
        weights = exact.exp()
        mass = weights.sum(dim=-1)
        stats["inv_mass"][rows] = (1.0 / mass).numpy()
        stats["neg_entropy"][rows] = (weights.mul_(exact).sum(dim=-1) / mass - mass.log()).numpy()
        at += len(targets)
    assert logprobs is not None and at == n
    seconds = time.perf_counter() - start
    if out is not None:
        np.savez(out / _STATS, **stats)
    meta = {
        "format": FORMAT,
        "protocol": asdict(protocol),
        "n_tokens_scored": n,
        "vocab_size": int(logprobs.shape[1]),
        "storage_dtype": storage_dtype,
        "bos": bos,
        "stream_tokens": int(tokens.shape[1]),
        "bytes": int(logprobs.nbytes),
        "build_seconds": round(seconds, 3),
    }
    return logprobs, stats, meta


# A cached reference is read and written with plain file I/O rather than through its memory map: every page
# touched through a map stays in the process's RSS, so one pass over Gemma's 1 GiB of log-probs would hold
# 1 GiB resident; this way a pass holds one chunk (re-reads still come from the kernel's page cache).
def _read_rows(logprobs: np.ndarray, rows: slice) -> np.ndarray:
    if not isinstance(logprobs, np.memmap):
        return np.asarray(logprobs[rows])
    width = logprobs.shape[1]
    with open(logprobs.filename, "rb") as file:
        file.seek(logprobs.offset + rows.start * width * logprobs.itemsize)
        block = np.fromfile(file, logprobs.dtype, (rows.stop - rows.start) * width)
    return block.reshape(-1, width)


def _write_rows(logprobs: np.ndarray, rows: slice, block: np.ndarray) -> None:
    if not isinstance(logprobs, np.memmap):
        logprobs[rows] = block
        return
    with open(logprobs.filename, "r+b") as file:
        file.seek(logprobs.offset + rows.start * logprobs.shape[1] * logprobs.itemsize)
        file.write(np.ascontiguousarray(block, logprobs.dtype).data)


@torch.inference_mode()
def evaluate_against(
    model: nn.Module,
    reference: BaseReference,
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[PerplexityResult, DivergenceResult]:
    """Perplexity and divergence of ``model`` against the base, from one forward pass per window.

    ``batch_size`` defaults to the reference's, so that the base against itself runs the very same GEMMs and
    agrees exactly on top-1.
    """
    n = reference.n_tokens
    kld = np.empty(n, np.float64)
    nll = np.empty(n, np.float64)
    same_top = np.empty(n, bool)
    at = 0
    for logits, targets in scored_logits(
        model,
        reference.tokens,
        reference.protocol,
        bos_token_id=reference.bos_token_id,
        batch_size=batch_size or reference.batch_size,
        progress=progress,
        desc=f"kld {reference.protocol.name}",
    ):
        if logits.shape[1] != reference.vocab_size:
            raise ValueError(f"model has {logits.shape[1]} logits, the base reference {reference.vocab_size}")
        rows = slice(at, at + len(targets))
        top, argmax = logits.max(dim=-1)
        logits -= top[:, None]  # z <= 0: better conditioned sums below
        lse = torch.logsumexp(logits, dim=-1)
        nll[rows] = (lse - logits.gather(1, targets[:, None])[:, 0]).double().numpy()
        weights = torch.from_numpy(_read_rows(reference.logprobs, rows)).float().exp_()
        # sum() reduces pairwise; a bmm/matmul dot product here was off by 5e-4 at a 49k vocabulary
        dot = weights.mul_(logits).sum(dim=-1).double().numpy()
        kld[rows] = reference.neg_entropy[rows] - dot * reference.inv_mass[rows] + lse.double().numpy()
        same_top[rows] = argmax.numpy() == reference.top1[rows]
        at += len(targets)
    assert at == n
    divergence = DivergenceResult(
        kld, same_top, reference.nll, f"full vocabulary, {reference.logprobs.dtype}", reference.protocol.name
    )
    ppl = summarize(
        reference.protocol,
        nll,
        reference.tokens.shape[1],
        text_bytes=reference.text_bytes,
        text_words=reference.text_words,
        bos=reference.bos,
    )
    return ppl, divergence
