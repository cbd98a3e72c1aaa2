"""Where a model runs: an experiment's ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), resolved
against the devices torch sees. ``auto`` is CUDA when there is a device, else the CPU."""

from __future__ import annotations

import re

import torch

from harness.errors import HarnessError

DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(HarnessError, ValueError):
    """A device this machine does not have; one line."""


def resolve_device(name: str) -> str:
    """``name`` as a torch device string: ``auto`` decided here, a CUDA device checked to exist."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return "cuda" if cuda else "cpu"
    if name.startswith("cuda") and int(name.partition(":")[2] or 0) >= cuda:
        seen = f"only {cuda} CUDA device(s) here" if cuda else "torch sees no CUDA device here"
        built = f"torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}"
        raise DeviceError(f"device: {name}: {seen} ({built})")
    return name


def device_type(name: str) -> str:
    """``cpu`` or ``cuda``: what a config's hash and its base reference's key hold (kernels differ by kind;
    the index is only where it ran)."""
    return name.partition(":")[0]
