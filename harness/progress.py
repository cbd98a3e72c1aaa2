"""Progress a person can read: a ticking bar for a step of unknown length, and quiet imports of the peers."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


def quiet_peer_logs() -> None:
    """torchao, imported by transformers when it is installed, logs that its CUDA kernels do not load on a
    CPU, torch's ``_pytree`` that torchao registers its enums the deprecated way, and bitsandbytes (imported
    by peft) that it cannot fetch a CPU kernel it is not asked to run: harmless lines that a newcomer reads
    as errors. The package calls it when it is imported, before any of its modules imports transformers."""
    for noisy in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextmanager
def ticking(desc: str, enabled: bool = True) -> Iterator[None]:
    """A one-line bar that shows the seconds spent on ``desc`` while the block runs (a step whose length
    is not known in advance, such as converting a GGUF in a child process)."""
    if not enabled:
        yield
        return
    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
