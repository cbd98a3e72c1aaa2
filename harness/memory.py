"""Resident memory on glibc: a fixed mmap threshold, and the pages a sweep no longer needs handed back.

glibc's malloc serves a block above its mmap threshold with a mapping of its own, returned to the kernel
on free. The threshold starts at 128 KiB but rises to the size of each mapped block freed (up to 32 MiB), so
after the first forward pass the activations, logits tiles and widened operands of every later pass come from
the heap, and the holes between the blocks that stay alive are rarely given back. Measured on the default
experiment (gemma-3-270m in bf16, 2 configs at 4,096 tokens): peak RSS 2.84 GB with glibc's rule, 1.83 GB with
the threshold fixed at 1 MiB, 2.57 GB at 4 MiB, for a pass 1.72x instead of 1.62x its FLOP floor (fresh pages
are zeroed for each block). Elsewhere (musl, macOS) nothing here has an effect."""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from harness.errors import HarnessError

T = TypeVar("T")

MMAP_THRESHOLD = 1 << 20  # bytes: larger blocks are mapped for themselves and unmapped when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h); setting it also stops glibc from raising it
_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def bound_heap() -> bool:
    """Fix malloc's mmap threshold at ``MMAP_THRESHOLD`` for this process (once per process; again is
    harmless). True when the C library took it."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_freed() -> None:
    """Hand the heap pages freed by temporaries back to the OS. Otherwise glibc keeps them, the quantized
    weights kept between them fragment the heap, and on SmolLM2 the RSS after ``apply`` ended 0.7x the fp32
    model higher (1.7 GB instead of 1.3 GB)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):  # glibc only
        _LIBC.malloc_trim(0)


def page_out(tensor: torch.Tensor) -> None:
    """Ask the kernel to reclaim the pages of ``tensor`` (MADV_PAGEOUT): a pristine weight is not read again
    until the next config quantizes it. A weight memory-mapped from a safetensors file leaves this process's
    resident memory (Gemma 3 270M: 0.4 GB over its blocks, which kept the default sweep above 3 GB) and is
    read back, unchanged, when next used; the kernel never drops the contents of anonymous memory without
    swap, so nothing can be lost. A hint only: on kernels without it (before Linux 5.4) nothing happens."""
    if _LIBC is None or not hasattr(_LIBC, "madvise") or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


class OutOfMemory(HarnessError, RuntimeError):
    """A pass that does not fit even one window at a time; one line."""


def halving(run: Callable[[int], T], rows: int, what: str) -> tuple[T, int]:
    """``run(rows)``, and on running out of memory (CUDA's, or the host's ``MemoryError``) again with half as
    many rows per forward, down to one: the result and the rows it took. OutOfMemory when one row fails."""
    while True:
        try:
            return run(rows), rows
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if rows == 1:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise OutOfMemory(f"{what}: out of memory at one window per forward ({reason})") from None
            rows //= 2
