"""Resident memory: the heap pages a sweep no longer needs handed back (glibc), the reference cycles of each
config freed before the next, and passes that do not fit.

glibc's malloc serves blocks below its mmap threshold (which rises up to 32 MiB as larger mapped blocks are
freed) from its heap, and keeps the pages of freed blocks there for the next allocation. A pass's activations
and logits tiles are reused from them at no cost; but the quantized weights of a config, allocated between
temporaries, leave holes that glibc does not return by itself: ``release_freed`` returns them after each layer
is quantized. A threshold fixed low instead (1 MiB) kept the heap smaller but mapped and zeroed fresh pages
for every block: on 7 configs of the default experiment (16,384 tokens) the kernel's time went from 24 s to
124 s and the sweep from 1.81x to 2.24x its FLOP floor, for a peak of 1.52 GB against 1.61 GB. Elsewhere
(musl, macOS) nothing here has an effect."""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from harness.errors import HarnessError

T = TypeVar("T")

_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def release_freed() -> None:
    """Hand the heap pages freed by temporaries back to the OS. Otherwise glibc keeps them, the quantized
    weights kept between them fragment the heap, and on SmolLM2 the RSS after ``apply`` ended 0.7x the fp32
    model higher (1.7 GB instead of 1.3 GB)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):  # glibc only
        _LIBC.malloc_trim(0)


def collecting(items: Iterable[T]) -> Iterator[T]:
    """``items``, with the reference cycles each leaves behind (a matplotlib figure is one, holding its
    pixels) freed before the next. Python collects its oldest generation only once the objects waiting
    there number a quarter of those living there; with the 0.8 million objects of a sweep's imports, a
    config's cycles (12,000 objects on gemma-3-270m) waited there for twenty configs, and the default sweep's
    resident memory crept 5 MB a config. The objects alive at the start are frozen out of the collector's
    sight meanwhile, so each collection takes milliseconds, not half a second."""
    gc.collect()
    gc.freeze()
    try:
        for item in items:
            yield item
            gc.collect()
    finally:
        gc.unfreeze()


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


DEVICE_MEMORY_SHARE = 0.8  # of a CUDA device's free memory that the windows of one forward may take


def rows_that_fit(device: torch.device, requested: int, most: int, probe: Callable[[], object]) -> int:
    """Windows per forward pass: ``requested`` on the CPU (the host's memory is not known to be free); on a
    CUDA device as many as ``DEVICE_MEMORY_SHARE`` of its free memory holds (``torch.cuda.mem_get_info``),
    at the peak that ``probe``, a pass of one window, allocated, and at most ``most`` (every window)."""
    if device.type != "cuda":
        return requested
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        probe()
    per_window = max(1, torch.cuda.max_memory_allocated(device) - before)
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(most, int(DEVICE_MEMORY_SHARE * free) // per_window))
