"""Cache entries are built once across processes, appear whole, and a failed build leaves nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.cache import CacheError, building, entries, verify
from harness.cli import main

# Builds ENTRY unless it is complete, logging each build and holding it open until the file GO exists, then
# prints what the entry holds.
CHILD = """
import sys, time
from pathlib import Path
from harness.cache import CacheError, building, entries, verify
from harness.cli import main

entry, log, go = map(Path, sys.argv[1:])
with building(entry, "done") as build:
    if build is not None:
        with log.open("a") as f:
            f.write("build\\n")
        while not go.exists():
            time.sleep(0.02)
        (build / "data").write_text("complete")
        (build / "done").write_text("")
print((entry / "data").read_text())
"""


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def temporaries(root: Path) -> list[str]:
    """The build folders in ``root`` that were not renamed into place."""
    return [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


DATA = bytes(range(256)) * 64


def built(entry: Path, files: dict[str, str | bytes], **options: Any) -> None:
    """Build ``entry`` (it must not be complete) holding ``files``, its marker ``done`` among them."""
    with building(entry, "done", **options) as folder:
        assert folder is not None
        for name, content in files.items():
            path = folder / name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def test_two_processes_build_an_entry_once(tmp_path: Path) -> None:
    entry, log, go = tmp_path / "cache" / "entry", tmp_path / "log", tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(entry), str(log), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    _wait_for(lambda: log.exists())  # one child holds the lock and is building
    time.sleep(0.5)  # time for the other to reach the lock
    assert all(child.poll() is None for child in children)  # the other waits rather than builds
    go.touch()
    outputs = [child.communicate(timeout=60)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert log.read_text() == "build\n"
    assert outputs == ["complete\n", "complete\n"]
    assert temporaries(entry.parent) == []


def test_a_complete_entry_is_not_built_again(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    built(entry, {"done": "first"})
    with building(entry, "done") as build:
        assert build is None
    assert (entry / "done").read_text() == "first"


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_build_leaves_no_entry_and_no_temporary(tmp_path: Path, error: BaseException) -> None:
    entry = tmp_path / "entry"
    with pytest.raises(type(error)), building(entry, "done") as build:
        assert build is not None
        (build / "half").write_text("half")
        raise error
    assert not entry.exists() and temporaries(tmp_path) == []


def test_a_build_without_its_marker_is_discarded(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    with pytest.raises(RuntimeError, match="without writing done"), building(entry, "done") as build:
        assert build is not None
        (build / "data").write_text("no marker")
    assert not entry.exists() and temporaries(tmp_path) == []


def test_a_stale_entry_is_replaced_whole_and_kept_when_the_rebuild_fails(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    built(entry, {"old-only": "", "done": "old"})
    with pytest.raises(RuntimeError), building(entry, "done", stale=lambda _: True) as build:
        raise RuntimeError("boom")
    assert (entry / "done").read_text() == "old"
    with building(entry, "done", stale=lambda path: (path / "done").read_text() == "old") as build:
        assert build is not None
        (build / "done").write_text("new")
    assert sorted(p.name for p in entry.iterdir()) == [".checksums.json", "done"]
    assert (entry / "done").read_text() == "new" and temporaries(tmp_path) == []


def test_temporaries_of_a_killed_builder_are_removed(tmp_path: Path) -> None:
    left = tmp_path / ".entry.4242.abc_12.tmp"  # a builder of this entry killed with -9
    (left / "entry").mkdir(parents=True)
    other = tmp_path / ".entry.x.4242.abc_12.tmp"  # another entry's
    other.mkdir()
    built(tmp_path / "entry", {"done": ""})
    assert temporaries(tmp_path) == [other.name]


@pytest.mark.parametrize("damage", ["truncate", "flip a bit", "delete", "add"])
def test_a_damaged_entry_is_rebuilt_once(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = tmp_path / "entry"
    built(entry, {"data": DATA, "done": ""})
    assert verify(entry) is None
    data = entry / "data"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-1])
    elif damage == "flip a bit":
        flipped = bytearray(data.read_bytes())
        flipped[5000] ^= 0x10
        data.write_bytes(bytes(flipped))
    elif damage == "delete":
        data.unlink()
    else:
        (entry / "stray").write_text("")
    problem = verify(entry)
    assert problem is not None
    built(entry, {"data": DATA, "done": ""})  # found damaged: built again
    assert capsys.readouterr().err == f"harness: warning: cache entry {entry} {problem}; building it again\n"
    assert verify(entry) is None
    with building(entry, "done") as build:  # whole: used as it is
        assert build is None


def test_a_failed_rebuild_names_the_folder_to_delete(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    built(entry, {"done": ""})
    (entry / "done").write_text("changed")
    with (
        pytest.raises(
            CacheError, match=rf"rebuilding the corrupt cache entry {entry} failed .*delete {entry}"
        ),
        building(entry, "done"),
    ):
        raise OSError("no space left on device")
    assert (entry / "done").read_text() == "changed"  # left as it was, for the user to inspect or delete


def test_verify_and_clean_find_what_is_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    source = tmp_path / "model.gguf"
    source.write_text("weights")
    for name in ("whole", "broken", "outlived"):
        built(tmp_path / "kind" / name, {"done": name}, source=source if name == "outlived" else None)
    (tmp_path / "kind" / "broken" / "done").write_text("BROKEN")  # the same size, other bytes
    source.write_text("other weights")  # the conversion of the old file has outlived it
    (tmp_path / "kind" / ".half.4242.abc_1.tmp").mkdir()  # a killed build's folder
    found = {e.path.name: e for e in entries(tmp_path)}
    assert found["whole"].problem is None and not found["whole"].unused
    assert "checksum mismatch" in str(found["broken"].problem)
    assert found["outlived"].problem is None and found["outlived"].unused
    assert found[".half.4242.abc_1.tmp"].problem == "is an unfinished build"
    assert main(["cache", "verify"]) == 1
    assert main(["cache", "clean"]) == 0
    assert sorted(p.name for p in (tmp_path / "kind").iterdir() if not p.name.endswith(".lock")) == ["whole"]
    assert main(["cache", "verify"]) == 0
    assert main(["cache", "clean", "--all"]) == 0 and not tmp_path.exists()
