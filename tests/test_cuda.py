"""The quantization core on a CUDA device: the same codes and constants as on the CPU and as bitsandbytes'
CUDA kernels, and the CPU-only fused kernels never reached. Skipped where torch sees no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import losses_both_ways, tiny_llama, weight

from harness import recovery
from harness.quant import cpu_kernels
from harness.quant import quantize as quantize_module
from harness.quant.double_quant import DoubleQuantConfig
from harness.quant.quantize import QuantConfig, dequantize, quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
FORMATS = ["nf4", "fp4", "int4", "af4"]


@pytest.fixture(autouse=True)
def no_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of a fused CPU kernel on this device fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a CPU fused kernel was called for a CUDA tensor")

    monkeypatch.setattr(cpu_kernels, "quantize_pack4", refuse)
    monkeypatch.setattr(cpu_kernels, "unpack4_scale", refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_cpu_bit_for_bit(
    weight_kind: str, dtype: torch.dtype, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Absmax, scaling and nearest-level search are exact elementwise operations: the same bits anywhere."""
    w = weight(weight_kind, (1024, 768), dtype)
    on_gpu = quantize(w.cuda(), QuantConfig(fmt, 64))
    monkeypatch.setattr(quantize_module, "_CPU_KERNELS_ENABLED", False)  # the plain torch path on the CPU
    on_cpu = quantize(w, QuantConfig(fmt, 64))
    assert torch.equal(on_gpu.codes.cpu(), on_cpu.codes) and torch.equal(on_gpu.scales.cpu(), on_cpu.scales)
    restored = dequantize(on_gpu)
    assert restored.device.type == "cuda" and restored.dtype == dtype
    assert torch.equal(restored.cpu(), dequantize(on_cpu))


def test_double_quant_on_cuda_agrees_with_cpu(weight_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4-bit codes are exact; the second level's offset is a mean, summed in another order on the GPU,
    so its constants may move by an ulp and a code on a level boundary with them."""
    w = weight(weight_kind, (2048, 1024), torch.bfloat16)
    config = QuantConfig("nf4", 64, DoubleQuantConfig())
    on_gpu = quantize(w.cuda(), config)
    monkeypatch.setattr(quantize_module, "_CPU_KERNELS_ENABLED", False)
    on_cpu = quantize(w, config)
    assert torch.equal(on_gpu.codes.cpu(), on_cpu.codes)
    gpu, cpu = on_gpu.scales, on_cpu.scales
    torch.testing.assert_close(gpu.offset.cpu(), cpu.offset, rtol=1e-6, atol=0)
    torch.testing.assert_close(gpu.absmax.cpu(), cpu.absmax, rtol=1e-6, atol=0)
    assert float((gpu.codes.cpu() == cpu.codes).float().mean()) >= 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [64, 128, 256, 512, 1024, 2048, 4096])
def test_cuda_matches_bitsandbytes_cuda(
    weight_kind: str, dtype: torch.dtype, fmt: str, block_size: int
) -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = weight(weight_kind, (2048, 1024), dtype).cuda()
    packed, state = bnb.quantize_4bit(w, blocksize=block_size, quant_type=fmt)
    ours = quantize(w, QuantConfig(fmt, block_size))
    assert torch.equal(ours.codes, packed.reshape(-1))
    assert torch.equal(ours.scales, state.absmax)
    assert torch.equal(dequantize(ours), bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_double_quant_on_cuda_against_bitsandbytes_cuda(weight_kind: str, fmt: str) -> None:
    """The 4-bit codes and the second level's offset and absmax as bnb's; its second-level codes come from
    an approximate table where ours are the exact nearest (as on the CPU: test_peers)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = weight(weight_kind, (2048, 1024), torch.bfloat16).cuda()
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=True)
    ours = quantize(w, QuantConfig(fmt, 64, DoubleQuantConfig()))
    assert torch.equal(ours.codes, packed.reshape(-1))
    torch.testing.assert_close(ours.scales.offset, state.offset, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.scales.absmax, state.state2.absmax, rtol=1e-6, atol=0)
    assert float((ours.scales.codes == state.absmax).float().mean()) >= 0.99


def test_a_tiny_models_ppl_and_kld_on_cuda_agree_with_the_cpu() -> None:
    """The same quantized tiny model evaluated against its base reference on each device: PPL and mean KLD
    within 1e-3 relative (the kernels differ, the protocol and tokens do not)."""
    from harness.evaluate.divergence import evaluate_against
    from harness.evaluate.reference import BaseReference
    from harness.evaluate.windows import PerplexityProtocol
    from harness.models import discover_layers, quantized, snapshot

    tokens = torch.randint(3, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    protocol = PerplexityProtocol("disjoint", 128)
    found = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama().to(device)
        reference = BaseReference.build(
            model, tokens, protocol, None, "tiny", text_bytes=4096, text_words=512, progress=False
        )
        with quantized(snapshot(model, discover_layers(model)), QuantConfig("nf4", 64)):
            ppl, divergence = evaluate_against(model, reference, progress=False)
        found[device] = (ppl.ppl, divergence.kld_mean)
    assert found["cuda"] == pytest.approx(found["cpu"], rel=1e-3)


FIRST_HALF = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0}


@pytest.mark.parametrize(
    ("modules", "gpus"),
    [
        ({**FIRST_HALF, "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}, 1),  # offloaded
        ({**FIRST_HALF, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}, 2),  # over two GPUs
    ],
)
def test_a_model_spread_by_a_device_map_gives_one_gpus_numbers(
    modules: dict[str, int | str], gpus: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PPL, mean KLD and the layers' output errors (inputs captured on the GPU, offloaded weights on the
    host) of a quantized tiny model placed by a device map equal those on one GPU."""
    from conftest import save_with_tokenizer

    from harness.devices import DeviceMap
    from harness.evaluate.divergence import evaluate_against
    from harness.evaluate.reference import BaseReference
    from harness.evaluate.windows import PerplexityProtocol
    from harness.models import capture_inputs, discover_layers, load_model, quantized, snapshot

    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA devices")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    directory = save_with_tokenizer(tiny_llama(), tmp_path / "tiny")
    tokens = torch.randint(3, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    protocol = PerplexityProtocol("disjoint", 128)
    found = []
    for device_map in (None, DeviceMap(modules)):
        model = load_model(str(directory), torch.float32, "cuda", device_map).model
        reference = BaseReference.build(
            model, tokens, protocol, None, "tiny", text_bytes=4096, text_words=512, progress=False
        )
        layers = discover_layers(model)
        inputs = capture_inputs(model, layers, tokens[:, :256].view(2, 128))
        with quantized(snapshot(model, layers), QuantConfig("nf4", 64), inputs=inputs) as applied:
            ppl, divergence = evaluate_against(model, reference, progress=False)
        found.append((ppl.ppl, divergence.kld_mean, *(r.output_rel_err for r in applied.layers)))
    assert found[1] == pytest.approx(found[0], rel=1e-6)


def test_a_quantized_gpu_model_holds_its_pristine_weights_in_host_memory() -> None:
    """While a config is applied, the device holds the quantized copies and not the pristine weights, which
    wait in host memory; restore brings them back, bit for bit."""
    from harness.models import discover_layers, restore, snapshot
    from harness.models.layers import apply

    model = tiny_llama().to(torch.bfloat16).cuda()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in most small models
    before = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    pristine = snapshot(model, discover_layers(model, include=["*proj", "lm_head"]))
    allocated = torch.cuda.memory_allocated()
    apply(pristine, QuantConfig("nf4", 64), torch.bfloat16)
    assert pristine.tied == {"lm_head"} and pristine.weights["lm_head"].device.type == "cuda"  # embedding
    assert all(pristine.weights[name].device.type == "cpu" for name in pristine.weights if name != "lm_head")
    head = model.lm_head.weight.nbytes  # the head's quantized copy is the only one beside its original
    assert torch.cuda.memory_allocated() <= allocated + head + 64 * 1024
    model(torch.randint(3, 256, (1, 16), device="cuda"))  # the embedding still on the device
    restore(pristine)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(torch.equal(before[name], p.detach().cpu()) for name, p in model.named_parameters())


def test_the_recovery_loss_a_chunk_at_a_time_is_transformers_loss_bit_for_bit_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As on the CPU: the head's logits a chunk of rows at a time change neither the loss nor a gradient."""
    monkeypatch.setattr(recovery, "HEAD_CHUNK", 37 * 256)
    (expected, expected_grads), (value, grads) = losses_both_ways(tiny_llama().to("cuda", torch.bfloat16))
    assert value == expected
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name
