"""Shared fixtures: weight-like tensors (Gaussian, heavy-tailed, odd shapes) in the dtypes QLoRA meets, and
tiny random Llama and Gemma 3 models for the evaluation logic."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore", message=".*kernels.*")

WEIGHT_SHAPES = [(256, 512), (333, 77), (1000,), (4, 11, 64)]


def weight(
    kind: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """Gaussian, Student-t (3 dof) or 'real-looking' (Gaussian rows with a few large outlier columns)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        w = torch.randn(shape, generator=g)
    elif kind == "student_t":
        torch.manual_seed(seed)
        w = torch.distributions.StudentT(3.0).sample(shape)
    else:
        w = torch.randn(shape, generator=g) * 0.02
        flat = w.reshape(-1)
        flat[:: max(1, flat.numel() // 7)] *= 40  # sparse outliers, as in real LLM weights
    return w.to(dtype)


@pytest.fixture(params=["gaussian", "student_t", "real"])
def weight_kind(request: pytest.FixtureRequest) -> str:
    return request.param


TINY_BOS = 1


def tiny_llama(seed: int = 0, vocab: int = 256) -> torch.nn.Module:
    """A 2-layer random Llama, weights sharpened so that its predictions are not all log(vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=TINY_BOS,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    return model


def tiny_gemma3(**config: object) -> torch.nn.Module:
    """A 2-layer random Gemma 3 (text only), with ``config`` over the tiny defaults."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    defaults: dict[str, object] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )  # fmt: skip
    return Gemma3ForCausalLM(Gemma3TextConfig(**(defaults | config))).eval()


def scaled_llama() -> torch.nn.Module:
    """``tiny_llama``'s architecture with a forward that halves the logits after the head (as Cohere and
    Granite scale theirs): what its decoder and head compute is not what its forward returns."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    return ScaledLlama(tiny_llama().config).eval()


def save_with_tokenizer(model: torch.nn.Module, directory: Path, vocab: int = 256) -> Path:
    """``model`` saved as a transformers directory with a word-level tokenizer over the words t0..t{vocab-1}
    (so a corpus of such words tokenizes one token per word)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    model.save_pretrained(directory)
    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(directory)
    return directory


def word_corpus(path: Path, documents: int = 64, words: int = 120, seed: int = 0) -> Path:
    """A .txt corpus of ``documents`` paragraphs of random words t3..t255, one blank line apart."""
    g = torch.Generator().manual_seed(seed)
    paragraphs = [
        " ".join(f"t{int(i)}" for i in torch.randint(3, 256, (words,), generator=g)) for _ in range(documents)
    ]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def tiny_experiment(root: Path, name: str, grid: str, calibration: tuple[int, int] = (2, 64)) -> Path:
    """``root/NAME.yaml``: ``grid`` on a saved tiny Llama, with a word corpus and ``calibration`` sequences ×
    tokens, evaluated on 512 tokens in windows of 128."""
    model = save_with_tokenizer(tiny_llama(), root / "tiny")
    corpus = word_corpus(root / "words.txt")
    sequences, length = calibration
    path = root / f"{name}.yaml"
    path.write_text(
        f"model: {model}\n"
        f"data: {{corpus: 'file:{corpus}', calibration_sequences: {sequences}, "
        f"calibration_length: {length}}}\n"
        "eval: {protocol: disjoint, context_length: 128, tokens: 512}\n"
        f"grid: {grid}\n"
    )
    return path


def stored_runs(uri: str, experiment: str) -> pd.DataFrame:
    """Every run of an experiment in the store at ``uri`` as one frame (params.*, metrics.*, tags.*...)."""
    import mlflow

    found = mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
    if found is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs([found.experiment_id], max_results=100_000)


def losses_both_ways(model: torch.nn.Module) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """One LoRA backward of 4 random rows of 64 tokens through ``model`` (on its device), with dropout drawn
    from the same seed: transformers' ``labels`` loss, then the recovery's chunked loss. Each: the loss'
    value and every adapter's gradient."""
    from harness import recovery
    from harness.experiments.schema import RecoverySettings
    from harness.models import discover_layers
    from harness.models.anatomy import device_of, logit_split
    from harness.tracking.schema import LORA_ADAPTER_DTYPE

    vocab = model.get_output_embeddings().out_features
    rows = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(1)).to(device_of(model))
    names = [info.name for info in discover_layers(model)]
    split = logit_split(model)
    assert split is not None
    results = []
    for chunked in (False, True):
        with recovery.injected(model, names, RecoverySettings(rank=4, dropout=0.1)) as wrapped:
            wrapped.train()
            torch.manual_seed(2)
            if chunked:
                value = recovery._loss_backward(split, vocab, rows, 0.5)
            else:
                loss = wrapped(input_ids=rows, labels=rows).loss * 0.5
                loss.backward()
                value = loss.item()
            grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
            assert len(grads) == 2 * len(names)  # A and B of every adapter
            adapters = {p.dtype for n, p in wrapped.named_parameters() if "lora_" in n}
            assert adapters == {getattr(torch, LORA_ADAPTER_DTYPE)}  # the dtype each run logs
        results.append((value, grads))
    return results
