"""Where a model runs: an experiment's ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), resolved
against the devices torch sees. ``auto`` is CUDA when there is a device, else the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.cache import cache_dir
from harness.errors import HarnessError
from harness.liveness import pid_alive

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


MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's automatic device maps


@dataclass(frozen=True)
class DeviceMap:
    """One model's modules spread over devices by accelerate: ``modules`` is a strategy (``MAP_STRATEGIES``:
    fill the GPUs, then the host, then the disk) or an explicit {module name: GPU index, ``cpu`` or ``disk``}
    map; ``max_memory`` caps each device ({0: "20GiB", "cpu": "64GiB"}). Modules placed on ``cpu`` or ``disk``
    next to a GPU are offloaded: their weights wait there and visit the GPU for each forward."""

    modules: str | Mapping[str, int | str]
    max_memory: Mapping[int | str, int | str] | None = None

    def targets(self) -> set[int | str]:
        """Every device the map may place a module on."""
        named = set(self.modules.values()) if isinstance(self.modules, Mapping) else set()
        return named | set(self.max_memory or {})

    def check(self, device: str) -> None:
        """DeviceError unless the map fits ``device`` (resolved): on the CPU, it names only cpu and disk."""
        gpus = sorted(str(t) for t in self.targets() if t not in ("cpu", "disk"))
        if device_type(device) == "cpu" and gpus:
            raise DeviceError(f"device_map places modules on {', '.join(gpus)}, but the device is {device}")

    def placement(self, device: str, offload_folder: Path) -> dict[str, Any]:
        """``from_pretrained``'s arguments. On the CPU the map holds only host and disk, whatever GPUs are
        visible: max_memory then names the host alone (all of its free memory when not capped). On CUDA a
        device max_memory leaves out keeps all of its free memory (accelerate would give it none)."""
        from accelerate.utils import get_max_memory

        memory = dict(self.max_memory or {})
        free = get_max_memory()
        if device_type(device) == "cpu":
            memory.setdefault("cpu", free["cpu"])
        elif memory:
            memory = free | memory
        return {
            "device_map": dict(self.modules) if isinstance(self.modules, Mapping) else self.modules,
            "max_memory": memory or None,
            "offload_folder": str(offload_folder),
        }

    @property
    def text(self) -> str:
        """The map as asked, for a run's params."""
        modules = self.modules if isinstance(self.modules, str) else json.dumps(dict(self.modules))
        return modules if self.max_memory is None else f"{modules}, max_memory {dict(self.max_memory)}"


def offload_folder() -> Path:
    """A folder of the cache for the weights a device map sends to disk, named by host and process; those
    of this host's processes that died before removing theirs (killed) are removed first."""
    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for folder in root.glob(f"{host}-*"):
        pid = folder.name.removeprefix(f"{host}-").partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{host}-{os.getpid()}-", dir=root))
