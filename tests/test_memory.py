"""glibc's heap: freed blocks between live ones are kept until ``release_freed`` returns them; a pass that
runs out of memory is retried with half the windows per forward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness.memory import OutOfMemory, halving

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
