"""Model loading, layer discovery, apply/restore and per-layer errors: tiny random models, real assets."""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from conftest import save_with_tokenizer
from huggingface_hub import constants as hub_constants
from torch import nn

from harness import assets
from harness.cache import cache_dir
from harness.metrics import aggregate, output_error
from harness.models import (
    LoadedModel,
    ModelError,
    apply,
    capture_inputs,
    discover_layers,
    format_layers,
    layer_table,
    load_model,
    load_tokenizer,
    quantized,
    restore,
    snapshot,
    source_bits,
    sources,
)
from harness.models.sources import converted_dir
from harness.quant.codebook import codebook
from harness.quant.quantize import QuantConfig

VOCAB = 256
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
NF4 = QuantConfig("nf4", 64)


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    )


def _gemma3() -> nn.Module:
    config = transformers.Gemma3TextConfig(
        **TINY,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        sliding_window=8,
        max_position_embeddings=64,
    )
    return transformers.Gemma3ForCausalLM(config)


def _bert() -> nn.Module:
    return transformers.BertModel(
        transformers.BertConfig(**TINY, vocab_size=VOCAB, max_position_embeddings=64)
    )


# name -> (builder, causal LM?, Linear layers per block)
ARCHS: dict[str, tuple[Callable[[], nn.Module], bool, int]] = {
    "llama": (_llama, True, 7),
    "gemma3": (_gemma3, True, 7),
    "bert": (_bert, False, 6),
}


def _save_tiny(arch: str, directory: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random tiny model plus a word-level tokenizer, saved as a transformers directory."""
    torch.manual_seed(0)
    return save_with_tokenizer(ARCHS[arch][0]().to(dtype), directory, VOCAB)


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(_save_tiny(request.param, tmp_path_factory.mktemp("models") / request.param)))


def _ids(n_seq: int = 2, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n_seq, seq_len), generator=torch.Generator().manual_seed(1))


def _forward(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = loaded.model(input_ids=ids)
    return out.logits if loaded.is_causal_lm else out.last_hidden_state


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), name


# ------------------------------------------------------------------------------------------- loading


def test_loads_local_directory_in_eval_mode_fp32(tiny: LoadedModel) -> None:
    arch = Path(tiny.source).name
    assert tiny.is_causal_lm == ARCHS[arch][1]
    assert not tiny.model.training
    assert {p.dtype for p in tiny.model.parameters()} == {torch.float32}
    assert load_tokenizer(tiny.source)("t5 t7")["input_ids"][-1] == 7
    assert set(tiny.source_precision.values()) == {"F32"}


def test_source_precision_is_the_stored_dtype(tmp_path: Path) -> None:
    loaded = load_model(str(_save_tiny("gemma3", tmp_path, torch.bfloat16)), torch.float32)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}  # loaded in fp32 as asked
    assert {info.source_precision for info in discover_layers(loaded)} == {"BF16"}
    assert loaded.source_precision["lm_head.weight"] == "BF16"  # tied to the embeddings, which are stored


@pytest.mark.parametrize(
    ("precision", "bits"),
    [("Q4_1", 4), ("Q4_K", 4), ("Q5_0", 5), ("Q6_K", 6), ("Q8_0", 8), ("IQ4_XS", 4), ("F16", 16),
     ("BF16", 16), ("F32", 32), ("torch.bfloat16", 16), ("torch.float32", 32)],
)  # fmt: skip
def test_source_bits(precision: str, bits: float) -> None:
    assert source_bits(precision) == bits


def test_source_bits_rejects_unknown() -> None:
    with pytest.raises(ModelError, match="unknown source precision"):
        source_bits("mystery")


def test_hf_id_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable at import
    with pytest.raises(ModelError) as info:
        load_model("some-org/some-model-that-is-not-here")
    message = str(info.value)
    assert "\n" not in message
    assert "hub is unreachable" in message
    assert "local model directory" in message and "smollm2-135m" in message


def test_missing_paths_and_other_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"not a \.gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="is not a transformers model"):
        load_model(str(tmp_path))


# ----------------------------------------------------------------------------------------- discovery


def test_discovers_every_linear_in_blocks_only(tiny: LoadedModel) -> None:
    per_block = ARCHS[Path(tiny.source).name][2]
    layers = discover_layers(tiny)
    linears = {name for name, m in tiny.model.named_modules() if isinstance(m, nn.Linear)}
    assert len(layers) == 2 * per_block
    assert {info.name for info in layers} <= linears
    outside = linears - {info.name for info in layers}
    assert outside == ({"lm_head"} if tiny.is_causal_lm else {"pooler.dense"})
    for info in layers:
        module = tiny.model.get_submodule(info.name)
        assert info.shape == (module.out_features, module.in_features)
        assert info.numel == module.weight.numel() and info.dtype == torch.float32
        assert ".layer" in info.name and "embed" not in info.name


def test_include_and_exclude_globs(tiny: LoadedModel) -> None:
    query = "*.query" if not tiny.is_causal_lm else "*.q_proj"
    assert [info.name.split(".")[-1] for info in discover_layers(tiny, include=[query])] == [query[2:]] * 2
    everything = discover_layers(tiny)
    kept = discover_layers(tiny, exclude=[query, "*.0.*"])
    assert len(kept) == len(everything) // 2 - 1
    if tiny.is_causal_lm:
        assert [info.name for info in discover_layers(tiny, include=["lm_head"])] == ["lm_head"]
    with pytest.raises(ModelError, match="no Linear layer matches"):
        discover_layers(tiny, include=["*.nothing"])


def test_bare_module_reports_its_dtype() -> None:
    layers = discover_layers(_llama().to(torch.bfloat16))
    assert {info.source_precision for info in layers} == {"torch.bfloat16"}


def test_format_layers_lists_shapes_and_precision(tiny: LoadedModel) -> None:
    text = format_layers(tiny, include=None, exclude=None)
    per_block = ARCHS[Path(tiny.source).name][2]
    assert f"{2 * per_block} layers" in text and "F32" in text
    assert "64x64" in text and "lm_head" not in text


# --------------------------------------------------------------------------------------- apply/restore


def test_apply_then_restore_is_bit_identical(tiny: LoadedModel) -> None:
    model = tiny.model
    before = _state(model)
    ids = _ids()
    reference = _forward(tiny, ids)
    pristine = snapshot(model, discover_layers(tiny))
    result = apply(pristine, NF4, torch.bfloat16)
    name = result.layers[0].name
    assert model.get_submodule(name).weight.dtype == torch.bfloat16
    changed = _forward(tiny, ids)
    assert changed.dtype == torch.float32  # outputs come back in the model dtype
    assert not torch.equal(changed, reference)
    assert torch.allclose(changed, reference, atol=0.5)  # only slightly
    restore(pristine)
    _assert_same_state(model, before)
    assert torch.equal(_forward(tiny, ids), reference)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _resident_bytes_of(file: Path) -> int:
    """Resident bytes of this process's mappings of ``file`` (/proc/self/smaps): libraries that load while
    a test runs do not count."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address range, ..., inode [path]
            inside = len(fields) == 6 and Path(fields[5]) == file
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_pristine_weights_leave_resident_memory_while_quantized_and_come_back_unchanged(
    tmp_path: Path,
) -> None:
    """The weights memory-mapped from the model's safetensors file are paged out once quantized (the resident
    file pages shrink by most of their size) and read back bit-identical by restore and the next apply."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    directory = save_with_tokenizer(transformers.LlamaForCausalLM(config).eval(), tmp_path / "llama", VOCAB)
    loaded = load_model(str(directory))
    layers = discover_layers(loaded)
    before = _state(loaded.model)  # also faults every weight page in
    pristine = snapshot(loaded.model, layers)
    nbytes = sum(w.numel() * w.element_size() for w in pristine.weights.values())
    weights_file = (directory / "model.safetensors").resolve()
    resident = _resident_bytes_of(weights_file)
    assert resident >= nbytes
    first = apply(pristine, NF4)
    assert resident - _resident_bytes_of(weights_file) > nbytes / 2
    quantized_once = {info.name: loaded.model.get_submodule(info.name).weight.clone() for info in layers}
    restore(pristine)
    _assert_same_state(loaded.model, before)
    second = apply(pristine, NF4)
    for info in layers:
        assert torch.equal(loaded.model.get_submodule(info.name).weight, quantized_once[info.name])
    assert [r.metrics for r in second.layers] == [r.metrics for r in first.layers]
    restore(pristine)
    _assert_same_state(loaded.model, before)


def test_restore_keeps_tied_weights_tied(tmp_path: Path) -> None:
    loaded = load_model(str(_save_tiny("gemma3", tmp_path)))
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pristine = snapshot(model, discover_layers(loaded, include=["lm_head", "*.q_proj"]))
    assert pristine.tied == {"lm_head"}  # set aside on no device: the embedding reads it
    embed = model.model.embed_tokens.weight.detach().clone()
    with quantized(pristine, NF4):
        assert torch.equal(model.model.embed_tokens.weight, embed)  # the embedding is not quantized with it
        assert not torch.equal(model.lm_head.weight, embed)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_apply_always_quantizes_the_pristine_weights(tiny: LoadedModel) -> None:
    pristine = snapshot(tiny.model, discover_layers(tiny))
    with quantized(pristine, QuantConfig("int4", 64)):
        first = _state(tiny.model)
        again = apply(pristine, QuantConfig("int4", 64))  # no restore in between
        _assert_same_state(tiny.model, first)
    assert again.layers[0].metrics["nmse"] > 0


def test_failed_apply_restores(tiny: LoadedModel) -> None:
    before = _state(tiny.model)
    pristine = snapshot(tiny.model, discover_layers(tiny))
    name = pristine.layers[-1].name
    pristine.weights[name].data[0, 0] = math.nan
    try:
        with pytest.raises(ValueError, match="NaN"):
            apply(pristine, NF4, torch.bfloat16)
        assert not any(m._forward_pre_hooks for m in tiny.model.modules())
        assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    finally:
        pristine.weights[name].data[0, 0] = before[f"{name}.weight"][0, 0]
    _assert_same_state(tiny.model, before)


def test_result_table_and_aggregate(tiny: LoadedModel) -> None:
    layers = discover_layers(tiny)
    inputs = capture_inputs(tiny.model, layers, _ids(3, 16), positions=slice(0, 40))
    pristine = snapshot(tiny.model, layers)
    with quantized(pristine, NF4, inputs=inputs) as result:
        table = layer_table(result)
    assert list(table["layer"]) == [info.name for info in layers]
    assert (table["bits_per_param"] == 4.5).all()  # every tiny dimension is a multiple of 64
    assert table["nmse"].between(1e-3, 5e-2).all()  # random-normal init: NF4 b64 gives ≈0.0085
    assert table["output_rel_err"].between(1e-3, 1).all()
    assert not table["warning"].any() and result.warnings == []
    summary = aggregate(table)
    assert summary["bits_per_param"] == 4.5
    assert summary["stored_bytes"] == table["stored_bytes"].sum()
    weighted = (table["nmse"] * table["numel"]).sum() / table["numel"].sum()
    assert summary["nmse"] == pytest.approx(weighted, rel=1e-12)
    assert summary["nmse_max"] == table["nmse"].max() and summary["max_abs"] == table["max_abs"].max()
    assert "sqnr_db" not in summary  # a whole-model quantity, not an aggregate of layers


def test_warns_when_source_is_at_or_below_target(tiny: LoadedModel) -> None:
    layers = discover_layers(tiny)
    layers[0] = dataclasses.replace(layers[0], source_precision="Q4_1")
    with (
        pytest.warns(UserWarning, match="1 of .* re-quantizes that grid"),
        quantized(snapshot(tiny.model, layers), NF4) as result,
    ):
        pass
    assert [r.warning for r in result.layers] == [True] + [False] * (len(layers) - 1)
    assert len(result.warnings) == 1


def test_tie_fraction_per_layer_and_its_warning(tiny: LoadedModel) -> None:
    pristine = snapshot(tiny.model, discover_layers(tiny))
    name = pristine.layers[0].name
    weight = pristine.weights[name].data
    original = weight.clone()
    book = codebook(QuantConfig("int4").fmt.levels)
    blocks = weight.view(-1, 64)
    blocks.copy_(book.sorted_levels[torch.arange(blocks.numel()).remainder(15).view_as(blocks)])
    blocks[:, 0], blocks[:, 1] = 1.0, book.midpoints[9]  # absmax 1 and one exact tie in every block of 64
    try:
        with pytest.warns(UserWarning, match=r"rounding boundary .* \(rounding: ties_even\) decides them"):
            result = apply(pristine, QuantConfig("int4", 64, rounding="ties_even"))
        table = layer_table(result)
        assert table["tie_fraction"].iloc[0] == 1 / 64
        assert (table["tie_fraction"].iloc[1:] < 1e-3).all()  # random weights: (almost) no exact ties
        assert len(result.warnings) == 1
        assert apply(pristine, NF4).warnings == []  # nf4's midpoints are elsewhere
    finally:
        restore(pristine)
        weight.copy_(original)


# -------------------------------------------------------------------------------------- output error


def test_capture_inputs_is_deterministic_and_bounded(tiny: LoadedModel) -> None:
    layers = discover_layers(tiny)
    ids = _ids(3, 16)
    first = capture_inputs(tiny.model, layers, ids, positions=slice(0, 20))
    second = capture_inputs(tiny.model, layers, ids, positions=slice(0, 20))
    for info in layers:
        assert first[info.name].shape == (20, info.shape[1])
        assert torch.equal(first[info.name], second[info.name])
        assert first[info.name].is_inference()  # no autograd graph kept alive by the captured rows
    everything = capture_inputs(tiny.model, layers[:1], ids, positions=slice(0, 1000))[layers[0].name]
    assert everything.shape[0] == 48  # never more rows than tokens


def test_captured_inputs_keep_the_model_dtype_and_one_copy_per_shared_input(tiny: LoadedModel) -> None:
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    layers = discover_layers(tiny)
    ids = _ids(3, 16)
    inputs = capture_inputs(model, layers, ids, positions=slice(0, 20))
    copies = {x.untyped_storage().data_ptr() for x in inputs.values()}
    assert len(copies) < len(layers)  # q/k/v (and gate/up) read one tensor
    for info in layers:
        alone = capture_inputs(model, [info], ids, positions=slice(0, 20))[info.name]
        assert inputs[info.name].dtype == torch.bfloat16
        assert torch.equal(inputs[info.name], alone)


def test_output_error_of_an_unquantized_layer_is_zero(tiny: LoadedModel) -> None:
    info = discover_layers(tiny)[0]
    x = capture_inputs(tiny.model, [info], _ids())[info.name]
    weight = tiny.model.get_submodule(info.name).weight
    assert output_error(weight, weight.clone(), x) == 0.0
    noisy = weight + 0.01 * torch.randn_like(weight)
    assert 0 < output_error(weight, noisy, x) < 1


# ------------------------------------------------------------------------------------------- real assets


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    if not assets.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched: run `harness fetch smollm2-135m`")
    return load_model("smollm2-135m")


@pytest.mark.integration
def test_smollm2_layers_and_source_precision(smollm2: LoadedModel) -> None:
    layers = discover_layers(smollm2)
    config = smollm2.model.config
    assert config.num_hidden_layers == 30
    assert len(layers) == 30 * 7 == 210  # q, k, v, o, gate, up, down in each of the 30 blocks
    assert {info.source_precision for info in layers} == {"Q4_1"}
    assert smollm2.source_precision["model.embed_tokens.weight"] == "Q8_0"
    assert smollm2.source_precision["model.norm.weight"] == "F32"
    assert smollm2.is_causal_lm and smollm2.name == "smollm2-135m"


@pytest.mark.integration
def test_smollm2_apply_restore_is_bit_identical(smollm2: LoadedModel) -> None:
    before = _state(smollm2.model)
    pristine = snapshot(smollm2.model, discover_layers(smollm2))
    with pytest.warns(UserWarning, match="210 of 210 layers"):
        apply(pristine, NF4, torch.bfloat16)
    restore(pristine)
    _assert_same_state(smollm2.model, before)


@pytest.mark.integration
def test_int4_asym_b32_reproduces_a_q4_1_layer() -> None:
    """Q4_1 stores min + d·k per 32 weights: affine int4 at block 32 finds the same grid, so ~zero error.
    In fp32, where the dequantized grid is exact (bf16 rounds it: an NMSE of ~2e-6 against that grid)."""
    if not assets.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched: run `harness fetch smollm2-135m`")
    smollm2 = load_model("smollm2-135m", torch.float32)
    layers = discover_layers(
        smollm2, include=["model.layers.3.mlp.down_proj", "model.layers.3.self_attn.q_proj"]
    )
    tokenizer = load_tokenizer("smollm2-135m", torch.float32)
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    inputs = capture_inputs(smollm2.model, layers, ids)
    with (
        pytest.warns(UserWarning, match="re-quantizes that grid"),
        quantized(snapshot(smollm2.model, layers), QuantConfig("int4_asym", 32), inputs=inputs) as result,
    ):
        table = layer_table(result)
    assert (table["nmse"] < 1e-10).all(), table[["layer", "nmse"]]
    assert (table["output_rel_err"] < 1e-5).all()
    assert table["warning"].all()
    with pytest.warns(UserWarning), quantized(snapshot(smollm2.model, layers), NF4) as nf4:
        assert all(r.metrics["nmse"] > 1e-3 for r in nf4.layers)  # while a real re-quantization is not zero


@pytest.mark.integration
def test_gguf_path_loads_from_the_conversion_cache(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = assets.asset_path("smollm2-135m")
    conversions: list[Path] = []
    monkeypatch.setattr(sources, "_convert_gguf", lambda path, *args: conversions.append(path))
    loaded = load_model(str(gguf))
    assert conversions == []  # the conversion is cached
    assert loaded.name == gguf.stem and loaded.source == str(gguf)
    assert loaded.source_precision == smollm2.source_precision
    converted = list((cache_dir() / "converted").glob(f"{gguf.stem}-*/source_precision.json"))
    assert converted
    first = next(iter(loaded.model.state_dict()))
    assert torch.equal(loaded.model.state_dict()[first], smollm2.model.state_dict()[first])


@pytest.mark.integration
def test_a_truncated_conversion_is_rebuilt_with_the_same_weights(
    smollm2: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = converted_dir(assets.asset_path("smollm2-135m"), torch.bfloat16) / "model.safetensors"
    cut = weights.with_suffix(
        ".cut"
    )  # a new file in place of the old: the loaded model's memory map stays valid
    with weights.open("rb") as source, cut.open("wb") as out:
        out.write(source.read(weights.stat().st_size - 4096))
    cut.replace(weights)
    capsys.readouterr()
    again = load_model("smollm2-135m")  # converts the GGUF again (about 35 s on 2 cores)
    warning = capsys.readouterr().err
    assert "has model.safetensors of" in warning and "building it again" in warning
    for name, tensor in smollm2.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name


MEMOIZED_GGUF = """
import sys
import gguf
import numpy as np
from harness.models.sources import _parse_gguf_once

path = sys.argv[1]
writer = gguf.GGUFWriter(path, "llama")
writer.add_block_count(2)
writer.add_tokenizer_model("gpt2")
writer.add_token_list(["a", "b", "c"])
writer.add_tensor("blk.0.attn_q.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
    write()
writer.close()
plain = gguf.GGUFReader(path)
names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
_parse_gguf_once()
read = gguf.GGUFReader(path)
assert gguf.GGUFReader(__import__("pathlib").Path(path)) is read and gguf.GGUFReader(path, "r") is read
assert list(read.fields) == list(plain.fields)
assert [f.contents() for f in read.fields.values()] == [f.contents() for f in plain.fields.values()]
assert np.array_equal(read.tensors[0].data, plain.tensors[0].data)
again = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
assert again is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) and again.mapping == names.mapping
# transformers takes both from gguf's namespace at each call, so it sees the memoized ones
from transformers import modeling_gguf_pytorch_utils as loader
assert not hasattr(loader, "GGUFReader") and not hasattr(loader, "get_tensor_name_map")
"""


@pytest.mark.integration  # a process of its own: the memoization is for the conversion's process alone
def test_the_conversions_gguf_reader_is_one_per_path_and_its_name_map_one_per_architecture(
    tmp_path: Path,
) -> None:
    """transformers opens a GGUF for the config, the weights and the tokenizer, and builds gguf's tensor-name
    map at every module; in the conversion's process a path (str or Path) gives one reader, and an
    architecture one map, with the contents the library's own give, where transformers looks them up."""
    done = subprocess.run(
        [sys.executable, "-c", MEMOIZED_GGUF, str(tmp_path / "t.gguf")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.integration
def test_a_sweeps_outline_of_an_unconverted_gguf_reads_the_converted_tokenizer(
    smollm2: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma's tokenizer read from the GGUF itself holds about 1.5 GB: a sweep's preflight (fetch) converts
    the GGUF it will load anyway and reads the converted tokenizer; ``show`` (no fetch) converts nothing."""
    import transformers

    gguf = assets.asset_path("smollm2-135m")
    ready = converted_dir(gguf, torch.bfloat16)  # the smollm2 fixture converted it
    monkeypatch.setattr(sources, "converted_dir", lambda path, dtype: tmp_path / "none")  # as if it had not
    conversions: list[tuple[Path, torch.dtype]] = []
    monkeypatch.setattr(sources, "_converted", lambda path, dtype: conversions.append((path, dtype)) or ready)
    read: list[tuple[str, str | None]] = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda folder, **kw: read.append((str(folder), kw.get("gguf_file"))) or real(folder, **kw),
    )
    assert sources.outline_model("smollm2-135m", fetch=True) is not None
    assert conversions == [(gguf, torch.bfloat16)] and read == [(str(ready), None)]
    assert sources.outline_model("smollm2-135m", fetch=False) is not None
    assert len(conversions) == 1 and read[-1] == (str(gguf.parent), gguf.name)
