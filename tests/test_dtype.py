"""Models run in their own dtype: ``model_dtype: auto`` is the checkpoint's, a bf16 checkpoint loads and runs
in bf16 end to end, the dtype is part of the hash and of the base reference, and the unquantized row's bits
come from the dtype it ran in."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import save_with_tokenizer, stored_runs, tiny_gemma3, tiny_llama, word_corpus

from harness.data import text_counts, tokenize_corpus
from harness.experiments import load_experiment
from harness.models import declared_dtype, load_model
from harness.sweep import SweepOptions, run_sweep


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama saved in bf16, the same in fp32, a tiny Gemma 3 in bf16, and a word corpus."""
    root = tmp_path_factory.mktemp("dtype")
    return {
        "bf16": save_with_tokenizer(tiny_llama().to(torch.bfloat16), root / "llama-bf16"),
        "fp32": save_with_tokenizer(tiny_llama(), root / "llama-fp32"),
        "gemma3": save_with_tokenizer(
            tiny_gemma3(sliding_window=64).to(torch.bfloat16), root / "gemma3-bf16"
        ),
        "corpus": word_corpus(root / "words.txt"),
    }


@pytest.mark.parametrize("arch", ["bf16", "gemma3"])
def test_auto_loads_a_bf16_checkpoint_in_bf16(checkpoints: dict[str, Path], arch: str) -> None:
    declared = declared_dtype(str(checkpoints[arch]))
    assert declared is not None and declared.dtype == "bfloat16" and "torch_dtype" in declared.rule
    loaded = load_model(str(checkpoints[arch]))
    # every parameter, the norms' weights included: nothing is upcast on the way
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    upcast = {
        n for n, b in loaded.model.named_buffers() if b.is_floating_point() and b.dtype != torch.bfloat16
    }
    # the one exception is transformers' own: RoPE frequencies are computed in float32 by design
    assert upcast and all("inv_freq" in name for name in upcast), upcast
    assert set(loaded.source_precision.values()) == {"BF16"}
    fp32 = load_model(str(checkpoints[arch]), torch.float32)
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


def test_an_fp32_checkpoint_declares_fp32(checkpoints: dict[str, Path]) -> None:
    declared = declared_dtype(str(checkpoints["fp32"]))
    assert declared is not None and declared.dtype == "float32"
    assert {p.dtype for p in load_model(str(checkpoints["fp32"])).model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("file_type", "dtype", "said"),
    [
        (gguf.LlamaFileType.ALL_F32, "float32", "unquantized float32"),
        (gguf.LlamaFileType.MOSTLY_F16, "float16", "unquantized float16"),
        (gguf.LlamaFileType.MOSTLY_BF16, "bfloat16", "unquantized bfloat16"),
        (gguf.LlamaFileType.MOSTLY_Q4_K_M, "bfloat16", "quantized (general.file_type 15, MOSTLY_Q4_K_M)"),
    ],
)
def test_a_gguf_declares_its_source_dtype_by_its_file_type(
    tmp_path: Path, file_type: gguf.LlamaFileType, dtype: str, said: str
) -> None:
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(int(file_type))
    writer.add_tensor("t", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    declared = declared_dtype(str(path))
    assert declared is not None and declared.dtype == dtype and said in declared.rule


def _experiment(tmp_path: Path, checkpoints: dict[str, Path], model: str, axes: str) -> str:
    text = (
        f"model: {checkpoints[model]}\n"
        f"data: {{corpus: 'file:{checkpoints['corpus']}', calibration_sequences: 1, "
        "calibration_length: 64}\n"
        "eval: {protocol: disjoint, context_length: 128, tokens: 512}\n"
        f"grid: {{format: [nf4], {axes}}}\n"
    )
    path = tmp_path / "dtypes.yaml"
    path.write_text(text)
    return str(path)


def _configs(uri: str) -> dict[str, dict]:
    frame = stored_runs(uri, "dtypes")
    frame = frame[frame["tags.harness.kind"] == "config"]
    return {row["tags.mlflow.runName"]: row for _, row in frame.iterrows()}


def test_a_bf16_sweep_and_an_fp32_sweep_of_one_checkpoint(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    """auto and bfloat16 spelled out collapse into one config; each model dtype has its own baseline and base
    reference, against which its baseline is exactly 0; the dtypes differ in hash, bits and numbers."""
    path = _experiment(tmp_path, checkpoints, "bf16", "model_dtype: [auto, bfloat16, float32]")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(load_experiment(path), SweepOptions(tracking_uri=uri, progress=False))
    assert not summary.failed and sorted(summary.finished) == [
        "baseline", "baseline-fp32", "nf4-b64", "nf4-b64-fp32"
    ]  # fmt: skip
    runs = _configs(uri)
    for base, quantized, dtype, bits in (
        ("baseline", "nf4-b64", "bfloat16", 16.0),
        ("baseline-fp32", "nf4-b64-fp32", "float32", 32.0),
    ):
        row = runs[base]
        assert row["params.model_dtype"] == row["params.compute_dtype"] == dtype
        assert row["params.reference_dtype"] == dtype and row["params.declared_dtype"] == "bfloat16"
        assert row["metrics.kld_mean"] == 0.0 and row["metrics.delta_ppl"] == 0.0
        assert row["metrics.top1_agreement"] == 1.0 and row["metrics.bits_per_param"] == bits
        assert runs[quantized]["metrics.kld_mean"] > 0 and runs[quantized]["params.compute_dtype"] == dtype
    assert runs["nf4-b64"]["tags.harness.config_hash"] != runs["nf4-b64-fp32"]["tags.harness.config_hash"]
    assert runs["baseline"]["metrics.ppl"] != runs["baseline-fp32"]["metrics.ppl"]
    again = run_sweep(load_experiment(path, ["model_dtype=bfloat16"]), SweepOptions(tracking_uri=uri))
    assert not again.finished and len(again.skipped) == 4  # bfloat16 spelled out is the auto config


def test_kld_against_a_reference_in_another_dtype(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    """``eval.reference_dtype: float32``: a bf16 baseline's KLD is KL(fp32 base ‖ bf16 base), the floor that
    16-bit arithmetic itself sets, and every bf16 config is measured against the same fp32 base."""
    path = _experiment(tmp_path, checkpoints, "fp32", "model_dtype: [float32, bfloat16]")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["eval.reference_dtype=float32"]
    summary = run_sweep(load_experiment(path, overrides), SweepOptions(tracking_uri=uri, progress=False))
    assert not summary.failed, summary.describe()
    runs = _configs(uri)
    assert runs["baseline-fp32"]["metrics.kld_mean"] == 0.0
    floor = runs["baseline"]["metrics.kld_mean"]
    assert 0 < floor < runs["nf4-b64"]["metrics.kld_mean"]
    assert runs["baseline"]["params.reference_dtype"] == "float32"


def test_float16_runs_on_cpu(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = _experiment(tmp_path, checkpoints, "bf16", "model_dtype: [float16]")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(load_experiment(path), SweepOptions(tracking_uri=uri, progress=False))
    assert not summary.failed and sorted(summary.finished) == ["baseline-fp16", "nf4-b64-fp16"]
    runs = _configs(uri)
    assert runs["baseline-fp16"]["metrics.bits_per_param"] == 16.0
    assert np.isfinite(runs["nf4-b64-fp16"]["metrics.ppl"])


def test_a_session_without_tasks_lets_the_tokenizer_go_before_the_weights_load(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    """The tokenizer serves the splits, the text counts and BOS, and then goes: no pass reads it, and Gemma's
    holds about 0.3 GB. (A session with lm-eval tasks keeps it: the smoke sweep's piqa runs through it.)"""

    from harness.models import load_tokenizer
    from harness.session import ModelSession

    experiment = load_experiment(_experiment(tmp_path, checkpoints, "bf16", "block_size: [64]"))
    config = experiment.resolved_configs({str(checkpoints["bf16"]): "bfloat16"}, 1)[0]
    session = ModelSession.prepare(config)
    tokenizer = load_tokenizer(str(checkpoints["bf16"]))
    assert session.tokenizer is None
    assert torch.equal(session.evaluation, tokenize_corpus(config, tokenizer).splits.evaluation)
    counts = text_counts(tokenizer, session.evaluation)
    assert (session.params["text_bytes"], session.params["text_words"]) == counts and counts[0] > 0
