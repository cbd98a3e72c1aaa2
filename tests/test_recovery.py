"""LoRA recovery: adapters trained with peft on a config's quantized base, evaluated on the same tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import (
    losses_both_ways,
    save_with_tokenizer,
    scaled_llama,
    stored_runs,
    tiny_experiment,
    tiny_gemma3,
    tiny_llama,
)

from harness import recovery as lora
from harness.data import token_splits, training_split
from harness.experiments import ExperimentError, load_experiment
from harness.experiments.schema import RecoverySettings
from harness.measure import _checked_evaluation, measure
from harness.models import discover_layers
from harness.preflight import PreflightError, check
from harness.recovery import RecoveryError, adapted, checkpointed, injected, target_layers
from harness.session import ModelSession
from harness.stats import recovery, recovery_difference

RECIPE = "{steps: 3, batch: 2, sequence_length: 64, rank: 4, lr: 0.01, warmup: 1}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tiny_experiment(tmp_path_factory.mktemp("recovery"), "recovery", "{format: [int4, nf4]}")
    path.write_text(path.read_text() + f"recovery: {RECIPE}\n")
    return path


@pytest.fixture(scope="module")
def session(tiny: Path) -> tuple[ModelSession, list]:
    configs = [c.resolved("float32") for c in load_experiment(str(tiny)).configs]
    return ModelSession.prepare(configs[0]), configs


def _digest(model: torch.nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def test_adapters_at_initialisation_change_no_prediction_and_trained_ones_do(
    session: tuple[ModelSession, list],
) -> None:
    """B = 0: the evaluation with adapters on is bit-identical to the one without; once trained, it is not
    (the evaluation runs through the adapters)."""
    prepared, configs = session
    config = configs[0]
    assert config.recovery is not None
    names = [info.name for info in prepared.pristine.layers]
    _, plain = _checked_evaluation(prepared, config)
    with injected(prepared.loaded.model, names, config.recovery):
        _, fresh = _checked_evaluation(prepared, config)
    np.testing.assert_array_equal(fresh["nll"], plain["nll"])
    assert prepared.training is not None
    with adapted(prepared.loaded.model, names, prepared.training.rows, config.recovery):
        _, trained = _checked_evaluation(prepared, config)
    assert not np.array_equal(trained["nll"], plain["nll"])


def test_training_changes_only_the_adapters_and_leaves_the_model_as_it_was(
    session: tuple[ModelSession, list],
) -> None:
    prepared, configs = session
    config = configs[0]
    assert config.recovery is not None and prepared.training is not None
    model = prepared.loaded.model
    names = [info.name for info in prepared.pristine.layers]
    digests, flags = _digest(model), {n: p.requires_grad for n, p in model.named_parameters()}
    one_step = config.recovery.model_copy(update={"steps": 1})
    with adapted(model, names, prepared.training.rows[:2], one_step) as training:
        inside = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()}
        adapters = {n for n in inside if "lora_" in n}
        assert len(adapters) == 2 * len(names) and training.adapter_params > 0
        base = {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in inside.items()}
        assert {n: base[n] for n in digests} == digests  # every base tensor, after one optimizer step
        assert all(not p.requires_grad for n, p in inside.items() if n not in adapters)
    assert _digest(model) == digests and [n for n, _ in model.named_parameters()] == list(digests)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_the_training_split_shares_no_document_with_calibration_or_evaluation(tmp_path: Path) -> None:
    """Every 8-gram of the training rows is absent from the calibration rows and the evaluation stream (the
    corpus' random words make a shared 8-gram a shared document)."""
    from conftest import tiny_llama, word_corpus

    model = save_with_tokenizer(tiny_llama(), tmp_path / "tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
    corpus = f"file:{word_corpus(tmp_path / 'words.txt', documents=200)}"
    splits = token_splits(corpus, tokenizer, calibration_sequences=2, calibration_length=64, eval_tokens=2048)
    train = training_split(corpus, tokenizer, skip_docs=splits.n_docs_cal, rows=16, length=64)

    def grams(rows: torch.Tensor) -> set[tuple[int, ...]]:
        return {tuple(r[i : i + 8].tolist()) for r in rows for i in range(len(r) - 8)}

    trained = grams(train.rows[:, 1:])  # BOS aside
    assert len(trained) > 500
    assert not trained & grams(splits.calibration[:, 1:]) and not trained & grams(splits.evaluation[:, 1:])
    assert train.first_doc == splits.n_docs_cal and train.described.endswith("1,024 tokens")
    with pytest.raises(ValueError, match=r"lower recovery\.steps, batch or sequence_length"):
        training_split(corpus, tokenizer, skip_docs=splits.n_docs_cal, rows=4096, length=64)


def test_the_same_seed_gives_bit_identical_recovery(session: tuple[ModelSession, list]) -> None:
    prepared, configs = session
    first, second = measure(prepared, configs[1]), measure(prepared, configs[1])
    assert first.metrics.keys() == second.metrics.keys()
    timings = {k for k in first.metrics if k.startswith("time_")}
    assert {k: v for k, v in first.metrics.items() if k not in timings} == {
        k: v for k, v in second.metrics.items() if k not in timings
    }
    assert first.curves == second.curves and len(first.curves["lora_train_loss"]) == 3
    for name in ("lora_nll", "lora_kld", "lora16_nll"):
        np.testing.assert_array_equal(first.per_token[name], second.per_token[name])


def test_checkpointing_recomputes_each_block_and_changes_no_number_nor_the_hash(
    session: tuple[ModelSession, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Activation checkpointing trades memory for time only: the dropout masks are replayed in the recompute,
    so the losses, the adapters' evaluation and every metric of the config equal a training that keeps its
    activations (the 16-bit target's come from the first training, cached under the same key)."""
    prepared, configs = session
    config = configs[1]
    assert config.recovery is not None and config.recovery.dropout > 0  # the masks must be replayed
    recomputing = replace(config, recovery=config.recovery.model_copy(update={"checkpointing": True}))
    assert recomputing.hash == config.hash
    calls: list[int] = []
    checkpoint = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(
        transformers.modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    )
    kept, recomputed = measure(prepared, config), measure(prepared, recomputing)
    assert calls  # the blocks ran through torch's checkpoint
    same = {k for k in kept.metrics if not k.startswith("time_")}
    assert {k: kept.metrics[k] for k in same} == {k: recomputed.metrics[k] for k in same}
    assert kept.curves == recomputed.curves
    np.testing.assert_array_equal(kept.per_token["lora_nll"], recomputed.per_token["lora_nll"])
    model = prepared.loaded.model
    assert not model._require_grads_hooks  # and no block is left checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize(
    "make",
    [tiny_llama, partial(tiny_gemma3, final_logit_softcapping=3.0)],
    ids=["llama", "gemma3-softcapped"],
)
def test_the_chunked_loss_is_transformers_loss_bit_for_bit(
    make: Callable[[], torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss a chunk of logits at a time (seven chunks here, of 36 or 37 tokens): its value and every
    adapter's gradient equal those of transformers' own ``labels`` loss on the whole forward, in bf16 with
    dropout (the same seed draws the same masks)."""
    monkeypatch.setattr(lora, "HEAD_CHUNK", 37 * 256)
    model = make().to(torch.bfloat16)
    rows_per_call: list[int] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows_per_call.append(args[0].shape[:-1].numel())
    )
    (expected, expected_grads), (value, grads) = losses_both_ways(model)
    assert rows_per_call == [256, 37, 37, 37, 37, 36, 36, 36]  # the whole forward's, then the chunks'
    assert value == expected and grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


def test_a_mixture_of_experts_that_adds_its_router_loss_is_refused_in_one_line() -> None:
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, output_router_logits=True,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config)
    with pytest.raises(RecoveryError) as caught:
        target_layers(model, RecoverySettings(), [info.name for info in discover_layers(model)])
    assert (
        str(caught.value)
        == "recovery: MixtralForCausalLM adds a router loss (output_router_logits), which is left out"
    )


def test_a_model_that_scales_its_logits_after_the_head_is_refused_in_one_line() -> None:
    """Cohere and Granite scale the head's logits in their forward: the loss from decoder and head would not
    be theirs, and the head's check on the model's own forward says so before any training."""
    model = scaled_llama()
    rows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    names = [info.name for info in discover_layers(model)]
    recipe = RecoverySettings(rank=4, steps=1, batch=2)
    with (
        pytest.warns(UserWarning),
        pytest.raises(RecoveryError) as caught,
        adapted(model, names, rows, recipe),
    ):
        pass
    message = "recovery: ScaledLlama's decoder and output head do not reproduce its forward"
    assert str(caught.value) == message


def test_recovery_fraction_is_the_share_of_the_gap_closed() -> None:
    rng = np.random.default_rng(0)
    reference = rng.uniform(1.0, 3.0, 4096)
    before, after = reference + 0.2, reference + 0.05
    value, low, high = recovery(before, after, reference)
    expected = (np.exp(before.mean()) - np.exp(after.mean())) / (
        np.exp(before.mean()) - np.exp(reference.mean())
    )
    assert value == pytest.approx(expected) and low <= value <= high
    assert recovery(before, before, reference)[0] == 0.0 and recovery(before, reference, reference)[0] == 1.0
    same = recovery_difference((before, after), (before, after), reference)
    assert same.mean == 0.0 and not same.resolved
    better = recovery_difference((before, reference + 0.01), (before, after), reference)
    assert better.mean == pytest.approx(recovery(before, reference + 0.01, reference)[0] - value)
    assert better.resolved and better.ci_low > 0


def test_a_sweep_logs_before_and_after_and_a_failed_training_leaves_no_finished_run(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config whose training dies is FAILED, with no curve, and the next sweep redoes it from scratch (the
    16-bit target it is measured against comes from the cache): no FINISHED run holds a partial curve."""
    from mlflow import MlflowClient

    from harness.sweep import SweepOptions, run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # no 16-bit target cached by another test
    steps = {"n": 0}
    step = torch.optim.AdamW.step

    def dies_on_the_eighth(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        steps["n"] += 1
        if steps["n"] == 8:  # 3 for the 16-bit target, 3 for int4, then nf4's second
            raise RuntimeError("killed mid-training")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies_on_the_eighth)
    summary = run_sweep(load_experiment(str(tiny)), SweepOptions(tracking_uri=uri, progress=False))
    assert sorted(summary.finished) == ["baseline-fp32-lora", "int4-b64-fp32-lora"]
    assert [label for label, _ in summary.failed] == ["nf4-b64-fp32-lora"]
    runs = stored_runs(uri, "recovery").set_index("tags.mlflow.runName")
    client = MlflowClient(uri)
    failed = runs.loc["nf4-b64-fp32-lora"]
    assert failed["status"] == "FAILED" and not client.get_metric_history(failed["run_id"], "lora_train_loss")
    steps["n"] = -1000  # counting, no longer dying
    again = run_sweep(load_experiment(str(tiny)), SweepOptions(tracking_uri=uri, progress=False))
    assert again.finished == ["nf4-b64-fp32-lora"]
    assert steps["n"] == -1000 + 3  # nf4's 3 steps: the 16-bit target came from the cache
    runs = stored_runs(uri, "recovery")
    for _, run in runs[(runs["status"] == "FINISHED") & runs["params.format"].notna()].iterrows():
        history = client.get_metric_history(run["run_id"], "lora_train_loss")
        assert [m.step for m in history] == [0, 1, 2], run["tags.mlflow.runName"]
    from harness.report import write_report

    written = {p.name for p in write_report("recovery", uri, out_dir=tmp_path / "out").paths}
    assert {"recovery.md", "recovery.tex", "recovery_ppl.png", "recovery_loss.png"} <= written
    table = (tmp_path / "out" / "recovery.md").read_text()
    assert "Recovered vs base" in table and "| unquantized |" in table and "rank 4 trained 3 steps" in table
    assert "for PPL, PPL after LoRA, Recovered vs base, Recovered vs lora16, KLD" in table  # paired tests
    done = runs[runs["status"] == "FINISHED"].set_index("tags.mlflow.runName")
    assert np.isfinite(done.loc["int4-b64-fp32-lora", "metrics.recovery_vs_base"])
    assert (
        done["metrics.lora16_ppl"].nunique() == 1
    )  # trained in the first sweep, read from the cache in the second
    assert (
        done.loc["baseline-fp32-lora", "metrics.lora_ppl"]
        == done.loc["int4-b64-fp32-lora", "metrics.lora16_ppl"]
    )
    from harness.report import compare

    lines = compare("recovery", "nf4-b64-fp32-lora", "int4-b64-fp32-lora", uri).splitlines()
    for name, metric in [
        ("recovered vs base (%)", "recovery_vs_base"),
        ("recovered vs lora16 (%)", "recovery_vs_lora16"),
    ]:
        line = next(line for line in lines if line.startswith(name))
        logged = done[f"metrics.{metric}"]
        expected = 100 * (logged["nf4-b64-fp32-lora"] - logged["int4-b64-fp32-lora"])
        assert float(line[len(name) :].split()[0]) == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert any(line.startswith("PPL after LoRA") for line in lines)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("recovery.steps=0", "recovery.steps: expected an integer >= 1, got 0"),
        ("recovery.rank=65", "recovery.rank 65 exceeds model.layers.0.self_attn.q_proj's smaller side (64)"),
        ("recovery.target_modules=['*.nowhere']", "recovery.target_modules ['*.nowhere'] matches no Linear"),
        (
            "recovery.target_modules=['lm_head']",
            "recovery: lm_head is the output head, which takes no adapter",
        ),
        ("eval.kld=false", "recovery: needs eval.kld: true"),
    ],
)
def test_a_recipe_the_model_cannot_take_is_one_line_before_any_work(
    tiny: Path, override: str, message: str
) -> None:
    with pytest.raises(ExperimentError) as caught:
        check(load_experiment(str(tiny), [override]), fetch=False)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_checkpointing_is_turned_off_again_when_the_training_fails() -> None:
    model = tiny_llama()
    with pytest.raises(KeyError), checkpointed(model, True):
        assert model.is_activation_checkpointing and model._require_grads_hooks
        raise KeyError("a failed step")
    assert not model.is_activation_checkpointing and not model._require_grads_hooks


def test_checkpointing_a_model_that_cannot_recompute_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_llama()
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    names = [info.name for info in discover_layers(model)]
    assert target_layers(model, RecoverySettings(), names) == names
    with pytest.raises(RecoveryError, match=r"^recovery.checkpointing: LlamaForCausalLM cannot recompute"):
        target_layers(model, RecoverySettings(checkpointing=True), names)


def test_recovery_on_an_encoder_only_model_is_refused_before_any_work(tiny: Path, tmp_path: Path) -> None:
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128
        )
    )
    folder = save_with_tokenizer(bert, tmp_path / "bert")
    with pytest.raises(PreflightError, match="is not a causal language model; LoRA recovery trains"):
        check(load_experiment(str(tiny), [f"model={folder}"]), fetch=False)


def test_the_recipe_is_part_of_the_config_hash_and_label(tiny: Path) -> None:
    with_recovery = load_experiment(str(tiny)).configs[0]
    without = replace(with_recovery, recovery=None)
    other = replace(with_recovery, recovery=RecoverySettings(steps=4))
    assert len({with_recovery.hash, without.hash, other.hash}) == 3
    assert with_recovery.label == "int4-b64-lora" and without.label == "int4-b64"


@pytest.mark.integration
def test_recovery_smoke_on_the_real_model(tmp_path: Path) -> None:
    """The shipped recovery-smoke experiment on smollm2-135m (a re-quantized GGUF) in bf16, cut to nf4 and 2
    steps of 2 rows, with piqa on 4 questions: every config trains on the same rows, the unquantized row's
    adapters are the 16-bit LoRA target of the others, and the task is scored again with the adapters on."""
    from harness.sweep import SweepOptions, run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cut = ["recovery.steps=2", "recovery.batch=2", "grid.format=[nf4]", "eval.tokens=256"]
    experiment = load_experiment("recovery-smoke", [*cut, "eval.tasks=[piqa]", "eval.limit=4"])
    summary = run_sweep(experiment, SweepOptions(tracking_uri=uri, progress=False))
    assert sorted(summary.finished) == ["baseline-lora", "nf4-b64-lora"], summary.describe()
    runs = stored_runs(uri, "recovery-smoke")
    runs = runs[runs["tags.harness.kind"] == "config"].set_index("tags.mlflow.runName")
    assert runs["params.lora_train_split"].nunique() == 1 and runs["params.model_dtype"].eq("bfloat16").all()
    assert runs["params.lora_train_split"].iloc[0].endswith(" 512 tokens")
    target = runs.loc["baseline-lora", "metrics.lora_ppl"]
    assert (runs["metrics.lora16_ppl"] == target).all() and np.isfinite(target)
    row = runs.loc["nf4-b64-lora"]
    assert row["metrics.ppl"] > runs.loc["baseline-lora", "metrics.ppl"]  # quantizing costs something
    assert np.isfinite(row["metrics.recovery_vs_base"]) and row["metrics.lora_kld_mean"] > 0
    assert 0 <= row["metrics.lora_acc_piqa"] <= 1 and row["metrics.lora_acc_piqa_stderr"] > 0
    assert row["metrics.lora_params"] == runs.loc["baseline-lora", "metrics.lora_params"] > 0


def test_a_recovery_sweeps_floor_counts_its_trainings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's floor multiple: each recovery config adds its training (6 × parameters × tokens) and the
    evaluation after it, at the torch.mm rate measured after the sweep."""
    from dataclasses import replace

    from harness import sweep
    from harness.floor import PassCost

    monkeypatch.setattr(sweep, "gemm_rates", lambda cost, dtype, device: {"mm": 1e12})
    config = load_experiment("recovery-smoke").configs[0].resolved("bfloat16")
    recipe = config.recovery
    assert recipe is not None
    summary = sweep.SweepSummary("recovery-smoke", "sqlite:///s.db", finished=["a", "b"], wall_s=100.0)
    cost = PassCost(10**8, 2e12, 1e12, {"mm": (1, 1, 1)})
    sweep._floor(summary, [config, replace(config, recovery=None)], {config.model: cost})
    trained = 6 * 10**8 * recipe.steps * recipe.batch * recipe.sequence_length
    assert summary.trainings == 1 and summary.floor_s == pytest.approx((3 * 3e12 + trained) / 1e12)
    assert "of its 3 evaluation passes and 1 LoRA trainings (6 × parameters × tokens" in summary.describe()
