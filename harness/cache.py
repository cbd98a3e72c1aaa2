"""The on-disk cache: where it lives, and how an entry gets into it whole.

Assets, GGUF conversions and base references take from seconds to minutes to build and are shared by every
process that uses the same cache, so an entry is built once, by one process, in a temporary folder beside it,
and appears under its final name in one rename: readers see a complete entry or none.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def cache_dir() -> Path:
    """Root of the cache: ``$HARNESS_CACHE``, else ``~/.cache/harness``."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness").expanduser()


@contextlib.contextmanager
def building(final: Path, marker: str, stale: Callable[[Path], bool] | None = None) -> Iterator[Path | None]:
    """Build the cache entry folder ``final`` unless it is complete; yields where to build it, or None.

    Complete means that ``final / marker`` exists and ``stale(final)``, when given, is false. The caller
    writes the entry into the yielded (empty) folder and the marker file last; when the block ends without an
    exception, the folder replaces ``final`` in one rename (an older entry there, stale or forced, is moved
    aside and deleted). When the block raises, or ends without writing the marker, the folder is deleted and
    ``final`` is left as it was, so an entry never lacks its marker.

    A lock file beside the entry (``.NAME.lock``) lets one process build at a time: another process asking for
    the same entry waits, then finds it complete and gets None. The lock dies with its process, so temporary
    folders of this entry found while holding it are left by a killed builder and are removed.
    """
    if _complete(final, marker, stale):
        yield None
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f".{final.name}.lock"):
        if _complete(final, marker, stale):
            yield None
            return
        _remove_abandoned(final)
        scratch = Path(
            tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
        )
        try:
            build = scratch / final.name  # made with the usual permissions, unlike mkdtemp's private folder
            build.mkdir()
            yield build
            if not (build / marker).is_file():
                raise RuntimeError(f"the build of {final} ended without writing {marker}; nothing was kept")
            if final.exists():  # os.replace cannot overwrite a non-empty folder
                final.rename(scratch / "previous")
            os.replace(build, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _complete(final: Path, marker: str, stale: Callable[[Path], bool] | None) -> bool:
    return (final / marker).is_file() and not (stale is not None and stale(final))


def _remove_abandoned(final: Path) -> None:
    """Delete the temporary folders of ``final`` (``.NAME.PID.RANDOM.tmp``); call while holding its lock."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.\d+\.[a-z0-9_]+\.tmp")
    for path in final.parent.iterdir():
        if pattern.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
