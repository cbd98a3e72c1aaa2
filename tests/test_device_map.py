"""A model spread by accelerate's device map: here on the CPU, with part of it offloaded to disk (its weights
wait in files and visit for each forward), which runs every hook path a GPU map runs."""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import save_with_tokenizer, tiny_experiment, tiny_llama

from harness.cli import main
from harness.devices import DeviceMap
from harness.evaluate.reference import model_fingerprint
from harness.models import blocks, discover_layers, load_model, placement, quantized, snapshot
from harness.models.offload import named_parameters
from harness.quant.quantize import QuantConfig
from harness.tracking import Tracker

# On the tiny Llama in fp32: the embedding and block 0 stay in host memory, block 1 and the head go to disk
PARTLY_ON_DISK = {"cpu": 400_000}
MEASURED = ("ppl", "kld_mean", "top1_agreement", "nmse", "output_rel_err", "bits_per_param")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_tokenizer(tiny_llama(), tmp_path_factory.mktemp("map") / "tiny")


def test_an_offloaded_model_quantizes_and_restores_every_weight_bit_for_bit(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three configs applied and restored on a model half on disk and on the plain one (its weights memory-
    mapped from the checkpoint): the two forwards are equal under each, every weight of both is the
    checkpoint's afterwards, and the fingerprint, which reads the offloaded weights, is the same."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    plain = load_model(str(tiny_dir), torch.float32)
    spread = load_model(str(tiny_dir), torch.float32, "cpu", DeviceMap("auto", PARTLY_ON_DISK))
    assert placement(plain.model) == "cpu"
    assert "cpu: " in placement(spread.model) and "disk: " in placement(spread.model)
    assert spread.model.model.layers[1].mlp.down_proj.weight.is_meta  # offloaded: the hook loads it
    pristine = {m: snapshot(m, discover_layers(m)) for m in (plain.model, spread.model)}
    assert len(pristine[spread.model].maps) == 7 and not pristine[plain.model].maps  # block 1's Linears
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    for config, compute in [("nf4", torch.float32), ("int4", torch.bfloat16), ("fp4", torch.float32)]:
        logits = []
        for model, layers in pristine.items():
            with quantized(layers, QuantConfig(config, 64), compute):
                logits.append(model(ids).logits)
        assert torch.equal(*logits)
    checkpoint = dict(named_parameters(load_model(str(tiny_dir), torch.float32).model))
    for model in (plain.model, spread.model):
        assert all(torch.equal(checkpoint[name], w) for name, w in named_parameters(model))
    assert torch.equal(plain.model(ids).logits, spread.model(ids).logits)
    assert model_fingerprint(plain.model) == model_fingerprint(spread.model)


def test_starting_at_a_block_keeps_the_hooks_of_the_blocks_it_skips(tiny_dir: Path, tmp_path: Path) -> None:
    """A prefix cache skips the blocks before one; the blocks' own forwards (accelerate's wrappers, which
    load offloaded weights) come back afterwards."""
    model = load_model(str(tiny_dir), torch.float32, "cpu", DeviceMap("auto", PARTLY_ON_DISK)).model
    structure = blocks(model)
    wrapped = structure.layers[0].forward
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    with structure.starting_at(1, lambda: torch.zeros(1, 16, structure.hidden_size)):
        assert not torch.equal(model(ids).logits, expected)
    assert structure.layers[0].forward == wrapped and torch.equal(model(ids).logits, expected)


def test_a_sweep_with_part_of_the_model_on_disk_gives_the_plain_sweeps_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same configs (the map is a tag, not part of the hash) with bit-identical PPL, KLD, top-1, errors
    and bits, and the placement recorded with each run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tiny_experiment(tmp_path, "spread", "{format: [nf4, int4], block_size: [64]}")
    found = {}
    for name, sets in [("plain", []), ("spread", ["device_map=auto", f"max_memory={PARTLY_ON_DISK}"])]:
        store = f"sqlite:///{tmp_path / name}.db"
        sweep = ["sweep", str(path), "--tracking-uri", store, *(f"--set={s}" for s in sets)]
        assert main(sweep) == 0
        records = Tracker(store).records("spread")
        found[name] = {r.config_id: tuple(r.metric(k) for k in MEASURED) for r in records}
        placed = {r.params["placement"] for r in records}
    assert len(found["plain"]) == 3 and found["spread"] == found["plain"]
    assert len(placed) == 1 and "disk: " in (where := placed.pop())
    assert main(["tables", "spread", "--tracking-uri", store, "--out", str(tmp_path / "tables")]) == 0
    assert f"placed by a device map ({where})" in (tmp_path / "tables" / "datatypes.md").read_text()
    gc.collect()  # accelerate's hooks hold their module in a cycle
    assert not list((tmp_path / "cache" / "offload").iterdir())  # the offloaded weights' files went with it


@pytest.mark.parametrize(
    ("sets", "said"),
    [
        (["device_map={0: cpu}"], "a mapping {module name: GPU index, 'cpu' or 'disk'}"),
        (["max_memory={cpu: [1]}"], "bytes or a size such as 20GiB"),
        (
            ["device_map=auto", "max_memory={cpu: 1x}"],
            "'1x' is not a size; write bytes or a size with a unit",
        ),
        (["device_map=auto", "max_memory={0: 1GiB}"], "places modules on 0, but the device is cpu"),
        (["max_memory={cpu: 1GiB}"], "set device_map (e.g. auto) too"),
        (["device_map={model.layer.9: cpu}"], "names no module of"),
        (["device_map={model.embed_tokens: cpu}"], "no device for model.layers, model.norm, lm_head of"),
        (["device_map={model.embed_tokens: cpu, '': disk}"], "'' (the whole model) cannot sit beside"),
    ],
)
def test_a_device_map_that_cannot_work_is_refused_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    sets: list[str],
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tiny_experiment(tmp_path, "bad", "{format: [nf4]}")
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code = main(["sweep", str(path), "--tracking-uri", "sqlite:///s.db", *(f"--set={s}" for s in sets)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and said in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store written


def test_show_says_the_device_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tiny_experiment(tmp_path, "shown", "{format: [nf4]}")
    assert main(["show", str(path), "--set", "device_map=auto", "--set", "max_memory={cpu: 1GiB}"]) == 0
    assert "device_map: auto, max_memory {'cpu': '1GiB'} (accelerate's placement" in capsys.readouterr().out


def test_offload_folders_of_dead_processes_are_removed(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A process killed with part of its model on disk leaves its folder; the next load on the host removes
    it, and leaves alone those of live processes and of other hosts (a cache shared over a cluster)."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    root = tmp_path / "offload"
    host = socket.gethostname()
    kept = [root / f"{host}-{os.getpid()}-live", root / "another-host-1-theirs"]
    dead = root / f"{host}-{2**22 + 7}-killed"  # above Linux's largest pid
    for folder in (*kept, dead):
        folder.mkdir(parents=True)
    model = load_model(str(tiny_dir), torch.float32, "cpu", DeviceMap("auto", PARTLY_ON_DISK))
    assert not dead.exists() and all(folder.exists() for folder in kept)
    assert len(list(root.iterdir())) == 3  # this load's own
    del model
    gc.collect()
    assert sorted(root.iterdir()) == sorted(kept)
