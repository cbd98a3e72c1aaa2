"""The on-disk cache: where it lives, how an entry gets into it whole, and how it checks itself.

Assets, GGUF conversions, base references and downloaded artifacts take from seconds to minutes to build and
are shared by every process that uses the same cache, so an entry is built once, by one process, in a
temporary folder beside it, and appears under its final name in one rename: readers see a complete entry or
none. Each entry ends with ``.checksums.json``: every file's size and xxh3-64 digest (the whole file, about
0.3 s per GB), checked each time the entry is used. An entry that fails the check (truncated, bit-flipped, a
file deleted) is reported in one line and built again, once; if that rebuild fails, the error names the
folder to delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import xxhash
from filelock import FileLock

from harness.errors import HarnessError

CHECKSUMS = ".checksums.json"
# A build's temporary folder, as ``building`` names it with mkdtemp: ``.NAME.PID.RANDOM.tmp``
_TEMPORARY = re.compile(r"\.(?P<entry>.+)\.\d+\.[a-z0-9_]+\.tmp")


class CacheError(HarnessError, RuntimeError):
    """A cache entry could not be rebuilt; the message names the folder to delete."""


def cache_dir() -> Path:
    """Root of the cache: ``$HARNESS_CACHE``, else ``~/.cache/harness``."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness").expanduser()


@contextlib.contextmanager
def building(
    final: Path, marker: str, stale: Callable[[Path], bool] | None = None, source: Path | None = None
) -> Iterator[Path | None]:
    """Build the cache entry folder ``final`` unless it is complete; yields where to build it, or None.

    Complete means that ``final / marker`` exists, ``stale(final)``, when given, is false, and every file
    matches the entry's checksums. The caller writes the entry into the yielded (empty) folder and the marker
    file last; when the block ends without an exception, the checksums are written and the folder replaces
    ``final`` in one rename (an older entry there, stale, corrupt or forced, is moved aside and deleted). When
    the block raises, or ends without writing the marker, the folder is deleted and ``final`` is left as it
    was, so an entry never lacks its marker. ``source``, the file the entry is derived from, is recorded so
    that ``harness cache clean`` can tell when the entry has outlived it.

    A lock file beside the entry (``.NAME.lock``) lets one process build at a time: another process asking for
    the same entry waits, then finds it complete and gets None. The lock dies with its process, so temporary
    folders of this entry found while holding it are left by a killed builder and are removed.
    """
    if _problem(final, marker, stale) is None:
        yield None
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f".{final.name}.lock"):
        problem = _problem(final, marker, stale)
        if problem is None:
            yield None
            return
        corrupt = problem not in (_MISSING, _STALE)
        if corrupt:
            print(f"harness: warning: cache entry {final} {problem}; building it again", file=sys.stderr)
        _remove_abandoned(final)
        scratch = Path(
            tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
        )
        try:
            build = scratch / final.name  # made with the usual permissions, unlike mkdtemp's private folder
            build.mkdir()
            try:
                yield build
            except Exception as exc:
                if corrupt:
                    raise CacheError(
                        f"rebuilding the corrupt cache entry {final} failed ({type(exc).__name__}: {exc}); "
                        f"delete {final} and run again"
                    ) from exc
                raise
            if not (build / marker).is_file():
                raise RuntimeError(f"the build of {final} ended without writing {marker}; nothing was kept")
            _seal(build, source)
            if final.exists():  # os.replace cannot overwrite a non-empty folder
                final.rename(scratch / "previous")
            os.replace(build, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


_MISSING, _STALE = "is missing", "is stale"


def _problem(final: Path, marker: str, stale: Callable[[Path], bool] | None) -> str | None:
    """None when the entry is complete; else why not."""
    if not (final / marker).is_file():
        return _MISSING
    if stale is not None and stale(final):
        return _STALE
    return verify(final)


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, xxhash.xxh3_64).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _seal(folder: Path, source: Path | None) -> None:
    files = {str(p.relative_to(folder)): [p.stat().st_size, _digest(p)] for p in _files(folder)}
    record: dict[str, object] = {"algorithm": "xxh3_64", "files": files}
    if source is not None:
        stat = source.stat()
        record["source"] = {"path": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (folder / CHECKSUMS).write_text(json.dumps(record, indent=1) + "\n")


def _record(entry: Path) -> dict | None:
    """The entry's checksums file, parsed; None when it is missing or unreadable."""
    try:
        record = json.loads((entry / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def verify(entry: Path) -> str | None:
    """None when every file of the entry has its recorded size and digest and no file is missing or extra;
    else what is wrong, in a few words."""
    record = _record(entry)
    if record is None:
        return f"has no valid {CHECKSUMS} (written by an older harness, or damaged)"
    files = record["files"]
    present = {str(p.relative_to(entry)) for p in _files(entry)}
    for name, (size, digest) in files.items():
        path = entry / name
        if name not in present:
            return f"lacks {name}"
        if path.stat().st_size != size:
            return f"has {name} of {path.stat().st_size:,} bytes where {size:,} were written"
        if _digest(path) != digest:
            return f"has {name} with other contents than were written (checksum mismatch)"
    if extra := sorted(present - set(files)):
        return f"holds {extra[0]}, which was not written with it"
    return None


@dataclass(frozen=True)
class Entry:
    path: Path
    problem: str | None  # None: the entry is whole
    unused: bool  # its recorded source file is gone or changed

    @cached_property
    def size(self) -> int:  # walked once: `harness cache clean` prints it and sums it
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def entries(root: Path | None = None) -> list[Entry]:
    """Every entry in the cache (a folder with its ``.NAME.lock`` beside it), checked, and the temporary
    folders of builds that never finished (``problem`` says so)."""
    root = root or cache_dir()
    found = []
    for lock in sorted(root.rglob(".*.lock")):
        entry = lock.with_name(lock.name[1 : -len(".lock")])
        if entry.is_dir():
            found.append(Entry(entry, verify(entry), _outlived(entry)))
    for folder in {e.path.parent for e in found}:
        for leftover in folder.glob(".*.tmp"):
            built = _TEMPORARY.fullmatch(leftover.name)
            if built and not _locked(folder / built["entry"]):
                found.append(Entry(leftover, "is an unfinished build", False))
    return found


def _outlived(entry: Path) -> bool:
    source = (_record(entry) or {}).get("source")
    try:
        path, recorded = Path(source["path"]), (source["size"], source["mtime_ns"])  # type: ignore[index]
    except (KeyError, TypeError):  # no source recorded, or not in this form
        return False
    if not path.is_file():
        return True
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns) != recorded


def _locked(entry: Path) -> bool:
    """Whether a build of ``entry`` may still run: its lock is held."""
    lock = FileLock(entry.parent / f".{entry.name}.lock")
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        return True
    lock.release()
    return False


def _remove_abandoned(final: Path) -> None:
    """Delete the temporary folders of ``final``; call while holding its lock."""
    for path in final.parent.iterdir():
        built = _TEMPORARY.fullmatch(path.name)
        if built and built["entry"] == final.name:
            shutil.rmtree(path, ignore_errors=True)
