"""Mixed-precision configs, prefix-cached sensitivity probes, and allocation under a budget: unit tests on a
tiny random Llama, then `harness sensitivity` and `harness allocate` on the shipped smoke experiment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_BOS, stored_runs, tiny_llama

from harness import sensitivity
from harness.cli import main
from harness.evaluate.reference import BaseReference
from harness.evaluate.windows import PerplexityProtocol
from harness.experiments import ExperimentError, load_experiment
from harness.models import LoadedModel, apply, blocks, discover_layers, layer_plan, restore, snapshot
from harness.quant.double_quant import DoubleQuantConfig
from harness.quant.quantize import QuantConfig
from harness.sensitivity import drivers
from harness.sensitivity.allocate import (
    BudgetError,
    allocate,
    more_bits_allocation,
    random_allocation,
    use_more_bits,
)
from harness.session import ModelSession

MIXED = """
name: mixed-test
model: smollm2-135m
grid: {format: [nf4]}
fixed: {block_size: 64}
mixed:
  name: NAME
  rules:
    - {layers: "*.v_proj", format: nf5, block_size: 64}
    - {layers: "*.layers.0.*", format: nf3, block_size: 32, double_quant: on}
"""


def _experiment(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mixed-test.yaml"
    path.write_text(text)
    return path


def test_overrides_last_match_wins_and_are_hashed(tmp_path: Path) -> None:
    named = load_experiment(str(_experiment(tmp_path, MIXED.replace("NAME", "vfive")))).configs[0]
    unnamed = load_experiment(str(_experiment(tmp_path, MIXED.replace("NAME", "null")))).configs[0]
    uniform = load_experiment(str(_experiment(tmp_path, MIXED.split("mixed:")[0]))).configs[0]
    assert named.label == "vfive" and unnamed.label == f"mixed-{unnamed.hash[:6]}"
    assert named.hash == unnamed.hash != uniform.hash  # the rules count, the name does not
    assert "overrides" not in uniform.content()  # a uniform config keeps the hash it always had
    names = [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.up_proj",
    ]
    plan = layer_plan(names, named.quant_config(), named.layer_rules())
    assert [(plan[n].format, plan[n].block_size, plan[n].double_quant is not None) for n in names] == [
        ("nf3", 32, True),  # both rules match; the later one wins
        ("nf5", 64, False),
        ("nf4", 64, False),  # no rule: the base settings
    ]


def test_a_bad_override_is_one_line(tmp_path: Path) -> None:
    bad = MIXED.replace("NAME", "x").replace("format: nf5", "format: nf9")
    with pytest.raises(ExperimentError, match=r"mixed.rules.format: unknown format 'nf9'") as caught:
        load_experiment(str(_experiment(tmp_path, bad)))
    assert "\n" not in str(caught.value)
    extra = MIXED.replace("NAME", "x").replace("format: nf5", "format: nf5, bits: 5")
    with pytest.raises(ExperimentError, match=r"mixed.rules.bits: unknown key"):
        load_experiment(str(_experiment(tmp_path, extra)))


def test_a_mixed_config_stores_each_layer_at_its_own_bits() -> None:
    model = tiny_llama()
    layers = discover_layers(model)
    pristine = snapshot(model, layers)
    base = QuantConfig("nf4", 64)
    rules = [("*.v_proj", QuantConfig("int8", 128))]
    result = apply(pristine, base, plan=layer_plan([i.name for i in layers], base, rules))
    restore(pristine)
    bits = {r.name: 8 * r.stored_bytes / r.numel for r in result.layers}
    assert bits["model.layers.0.self_attn.v_proj"] == pytest.approx(8 + 32 / 128)
    assert bits["model.layers.0.self_attn.q_proj"] == pytest.approx(4 + 32 / 64)


def test_two_double_quant_variants_of_one_menu_stay_apart(tmp_path: Path) -> None:
    """A menu holding QLoRA's DQ and an fp8 DQ: its choices have names of their own, a mix keeps each layer's,
    and the YAML fragment an allocation writes says which DQ, so loading it gives the same config back."""
    default, fp8 = DoubleQuantConfig(), DoubleQuantConfig(128, "fp8_e4m3")
    plain, qlora, other = (QuantConfig("nf4", 64, dq) for dq in (None, default, fp8))
    assert [sensitivity.choice_label(c) for c in (plain, qlora, other)] == [
        "nf4-b64",
        "nf4-b64-dq",
        "nf4-b64-dq-fp8_e4m3-128",
    ]
    base = load_experiment(str(_experiment(tmp_path, MIXED.split("mixed:")[0]))).configs[0]
    mixed = drivers._mixed(base, ["a", "b", "c"], [qlora, qlora, other], "two-dq")
    assert mixed.double_quant == default
    assert [(o.layers, o.double_quant) for o in mixed.overrides] == [("c", fp8)]
    fragment = drivers._fragment(mixed)
    (tmp_path / "mixed-test.yaml").write_text("name: mixed-test\nmodel: smollm2-135m\n" + fragment)
    [loaded] = load_experiment(str(tmp_path / "mixed-test.yaml")).configs
    assert loaded.double_quant == default and loaded.overrides == mixed.overrides


def _tiny_session() -> ModelSession:
    model = tiny_llama()
    tokens = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(5))
    tokens[0, 0] = TINY_BOS
    protocol = PerplexityProtocol("disjoint", 48)
    reference = BaseReference.build(
        model,
        tokens,
        protocol,
        text_bytes=640,
        text_words=80,
        bos_token_id=TINY_BOS,
        batch_size=2,
        progress=False,
    )
    layers = discover_layers(model)
    loaded = LoadedModel("tiny", model, True, "tiny", {f"{i.name}.weight": "F32" for i in layers})
    calibration = {
        i.name: torch.randn(32, i.shape[1], generator=torch.Generator().manual_seed(1)) for i in layers
    }
    ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    return ModelSession(
        loaded, None, TINY_BOS, snapshot(model, layers), calibration, ids, tokens, protocol, 2, reference, {}
    )


@pytest.mark.parametrize("memory_bytes", [2**30, 0], ids=["in-memory", "on-disk"])
def test_prefix_cached_probe_gives_the_full_forward_logits(memory_bytes: int) -> None:
    session = _tiny_session()
    cache = sensitivity.PrefixCache(session, memory_bytes)
    assert cache.on_disk == (memory_bytes == 0)
    layer = "model.layers.1.mlp.down_proj"
    assert cache.structure.index(layer) == 1 and cache.structure.part(layer) == "mlp.down_proj"
    config = QuantConfig("nf3", 64)
    apply(session.pristine, config, plan={layer: config})

    def logits(first_block: int | None) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([cache.head.full(rows) for rows in cache.passes(first_block)])

    try:
        full, cached, from_zero = logits(None), logits(1), logits(0)
    finally:
        restore(session.pristine)
    base_full = logits(None)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)  # fp32
    torch.testing.assert_close(from_zero, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, base_full, atol=1e-3)  # the probe did change the model
    cache.close()


def test_probe_of_a_unit_measures_against_the_base() -> None:
    session = _tiny_session()
    cache = sensitivity.PrefixCache(session, 2**30)
    base = cache.evaluate(None)
    assert np.abs(base["kld"]).max() < 1e-6 and base["top1_match"].all()
    units = sensitivity.make_units(
        [i.name for i in session.pristine.layers],
        blocks(session.loaded.model),
        ["layer", "block", "projection"],
    )
    assert len(units) == 14 + 2 + 7
    whole_block = next(u for u in units if u.kind == "block" and u.first_block == 1)
    one_layer = next(u for u in units if u.name == "model.layers.1.mlp.down_proj")
    rows = [sensitivity.probe(cache, base, u, QuantConfig("nf3", 64)) for u in (one_layer, whole_block)]
    for row in rows:
        assert row["delta_kld"] > 3 * row["delta_kld_se"] > 0
        assert 0 < row["top1_agreement"] < 1 and row["act_weighted_err"] > 0
    assert rows[1]["delta_kld"] > rows[0]["delta_kld"]  # seven layers quantized hurt more than one of them
    assert rows[1]["numel"] == sum(
        i.numel for i in session.pristine.layers if i.name.startswith("model.layers.1.")
    )
    assert all(
        w is p
        for w, p in (
            (session.loaded.model.get_submodule(n).weight, session.pristine.weights[n])
            for n in session.pristine.weights
        )
    )


def test_allocation_spends_the_budget_where_it_saves_most() -> None:
    # three layers, choices (cheap, dear): layer 1 gains most per bit, layer 2 nothing
    costs = np.array([[30.0, 50.0], [30.0, 50.0], [30.0, 50.0]])
    losses = np.array([[0.5, 0.2], [0.9, 0.1], [0.3, 0.3]])
    assert allocate(costs, losses, 110).tolist() == [0, 1, 0]
    assert allocate(costs, losses, 130).tolist() == [1, 1, 0]  # the no-gain upgrade is never bought
    assert allocate(costs, losses, 1000).tolist() == [1, 1, 0]
    with pytest.raises(BudgetError):
        allocate(costs, losses, 80)
    chosen = random_allocation(costs, 110, seed=0)
    assert costs[np.arange(3), chosen].sum() <= 110
    assert [use_more_bits(i, 16) for i in range(16)] == [
        i < 2 or i >= 14 or (i - 2) % 3 == 2 for i in range(16)
    ]
    assert more_bits_allocation(costs, np.array([True, False, False]), 110).tolist() == [1, 0, 0]


def test_the_greedy_matches_brute_force_on_random_menus() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        costs = np.sort(rng.integers(1, 20, (4, 3)).astype(float), axis=1)
        losses = -np.sort(-rng.random((4, 3)), axis=1)
        budget = float(rng.uniform(costs[:, 0].sum(), costs[:, -1].sum()))
        grid = np.array(np.meshgrid(*[range(3)] * 4)).reshape(4, -1).T
        feasible = [g for g in grid if costs[np.arange(4), g].sum() <= budget]
        best = min(losses[np.arange(4), g].sum() for g in feasible)
        chosen = allocate(costs, losses, budget)
        assert costs[np.arange(4), chosen].sum() <= budget
        step = (losses[:, :-1] - losses[:, 1:]).max()  # the LP bound: at most one step's saving above
        assert losses[np.arange(4), chosen].sum() <= best + step + 1e-12


@pytest.mark.integration
def test_sensitivity_and_allocate_commands_on_the_smoke_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped commands, trimmed to two blocks of smollm2-135m to keep the suite short."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trim = ["--set", "layers.include=['model.layers.0.*','model.layers.29.*']"]
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> int:
        return main([*args, "--tracking-uri", uri, *trim])

    assert run("sensitivity", "sensitivity-smoke") == 0, capsys.readouterr().err[-2000:]
    table = pd.read_csv(tmp_path / "results/sensitivity-smoke/sensitivity.csv")
    assert len(table) == 14 and set(table["unit"]) == set(table["unit"].unique())
    assert {"unit", "delta_kld", "delta_kld_se", *sensitivity.PROXIES} <= set(table.columns)
    assert (table["delta_kld"].diff().dropna() <= 0).all()  # ranked
    assert (table["delta_kld_se"] > 0).all()
    assert run("allocate", "sensitivity-smoke", "--budget", "4.25") == 0, capsys.readouterr().err[-2000:]

    runs = stored_runs(uri, "sensitivity-smoke")
    allocation = runs[
        (runs["tags.harness.kind"] == "allocation") & (runs["tags.harness.allocation_method"] == "allocated")
    ]
    assert len(allocation) == 1 and (runs["status"] == "FINISHED").all()
    bits = float(allocation["metrics.bits_per_param"].iloc[0])
    assert 4.0 < bits <= 4.25 and float(allocation["metrics.kld_mean"].iloc[0]) > 0
    sens = runs[runs["tags.harness.kind"] == "sensitivity"]
    assert np.isfinite(sens["metrics.spearman_nmse"].iloc[0])
    fragment = (tmp_path / "results/sensitivity-smoke/allocation-4.25.yaml").read_text()
    assert "mixed:" in fragment and "rules:" in fragment


def test_output_names_and_plot_titles_follow_the_models() -> None:
    """A hub id names a file, not a folder; a title says "re-quantized" only of a source on a quantized
    grid."""
    assert drivers._model_suffix(["Qwen/Qwen2.5-0.5B"], "Qwen/Qwen2.5-0.5B") == ""
    suffix = drivers._model_suffix(["smollm2-135m", "Qwen/Qwen2.5-0.5B"], "Qwen/Qwen2.5-0.5B")
    assert suffix == "-Qwen-Qwen2.5-0.5B"
    checkpoint = discover_layers(tiny_llama())  # a checkpoint in fp32: nothing is re-quantized
    assert {info.source_precision for info in checkpoint} == {"torch.float32"}
    assert drivers._source_note(checkpoint) == ""
    gguf = [dataclasses.replace(info, source_precision="Q4_1") for info in checkpoint]
    assert drivers._source_note(gguf) == " (re-quantized Q4_1 weights)"
