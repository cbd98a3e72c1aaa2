"""glibc's heap: freed blocks between live ones are kept until ``release_freed`` returns them; a loop's
reference cycles are freed after each item; a pass that runs out of memory is retried with half the windows
per forward; how many windows a forward takes."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch

from harness.memory import OutOfMemory, collecting, halving, rows_that_fit

# A freed 8 MiB block raises glibc's threshold to 8 MiB; then 2 MiB blocks, each followed by a small one that
# stays alive, are freed: heap holes between survivors, which glibc keeps unless asked to return them.
SCRIPT = """
import sys, torch
from harness import memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
torch.ones(8 << 20, dtype=torch.uint8).sum()  # allocated, then freed
before = rss()
big, small = [], []
for _ in range(100):
    big.append(torch.ones(2 << 20, dtype=torch.uint8))
    small.append(torch.ones(64 << 10, dtype=torch.uint8))
del big
if sys.argv[1] == "release":
    memory.release_freed()
print(rss() - before)
"""


def _retained_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_release_freed_returns_the_holes_between_live_blocks() -> None:
    assert _retained_mib("release") < 30  # the 6.25 MiB of small survivors, and slack
    assert _retained_mib("keep") > 150  # of the 200 MiB freed


class Node:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_collecting_frees_each_items_cycles_before_the_next_and_freezes_nothing_for_good() -> None:
    kept = Node()  # alive before the loop: frozen during it, collectable again after
    cycles: list[weakref.ref[Node]] = []
    for _ in collecting(range(3)):
        assert gc.get_freeze_count() > 0
        assert all(ref() is None for ref in cycles), "an earlier item's cycle outlived it"
        cycles.append(weakref.ref(Node()))  # garbage at once, but a cycle: freed by a collection only
        assert cycles[-1]() is not None
    assert gc.get_freeze_count() == 0 and cycles[-1]() is None
    loop = collecting(range(3))  # a loop left early unfreezes too
    next(loop)
    loop.close()
    assert gc.get_freeze_count() == 0
    ref = weakref.ref(kept)
    del kept
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("error", [MemoryError, torch.cuda.OutOfMemoryError])
def test_a_pass_out_of_memory_is_retried_with_half_the_rows(error: type[Exception]) -> None:
    tried: list[int] = []

    def run(rows: int) -> str:
        tried.append(rows)
        if rows > 2:
            raise error("no room")
        return f"done at {rows}"

    assert halving(run, 8, "evaluation") == ("done at 2", 2) and tried == [8, 4, 2]


def test_out_of_memory_at_one_row_is_one_line() -> None:
    def run(rows: int) -> None:
        raise MemoryError("cannot allocate 2 GiB\nsecond line")

    with pytest.raises(OutOfMemory) as caught:
        halving(run, 3, "the base reference")
    assert str(caught.value) == (
        "the base reference: out of memory at one window per forward (cannot allocate 2 GiB)"
    )


def test_rows_per_forward_are_the_setting_on_the_cpu_and_what_fits_on_a_cuda_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU the configured windows, the probe not run; on CUDA (its memory calls stood in for here)
    80 % of the free memory over one window's peak, between one and every window."""
    probed = []
    assert rows_that_fit(torch.device("cpu"), 4, 32, lambda: probed.append(1)) == 4 and not probed
    gib = 2**30
    state = {"allocated": 1 * gib, "peak": 1 * gib, "free": 10 * gib}
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: state["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (state["free"], 80 * gib))

    def probe() -> None:  # one window's pass peaks 0.5 GiB above what was allocated
        probed.append(torch.is_inference_mode_enabled())
        state["peak"] = state["allocated"] + gib // 2

    cuda = torch.device("cuda", 0)
    assert rows_that_fit(cuda, 4, 64, probe) == 16 and probed == [True]  # 0.8 × 10 GiB / 0.5 GiB
    assert rows_that_fit(cuda, 4, 5, probe) == 5
    state["free"] = gib // 4
    assert rows_that_fit(cuda, 4, 64, probe) == 1
