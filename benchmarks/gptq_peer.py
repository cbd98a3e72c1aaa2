"""Our GPTQ against gptqmodel's on one layer, in the same arithmetic and then each on its own grid.

gptqmodel (7.6.0 on PyPI) runs GPTQ on CPU tensors, but it does not share this project's pins (it wants
another transformers), so it runs in a venv of its own, given by ``--peer-python``; the two processes exchange
the layer through a temporary folder:

    python3 -m venv /tmp/gptqmodel && /tmp/gptqmodel/bin/pip install torch==2.13.0 gptqmodel==7.6.0
    .venv/bin/python benchmarks/gptq_peer.py --peer-python /tmp/gptqmodel/bin/python

The layer: a seeded 256 × 512 weight and 2,048 calibration rows with a few strong directions; H = 2XᵀX / N,
4-bit symmetric, group 128, damping 0.01, no act-order (nor gptqmodel's group-aware reordering). gptqmodel's
symmetric grid is 16 integers −8…7 with step absmax / 7.5; ours (bitsandbytes' int4) is −7…7 with step
absmax / 7. So the peer runs twice: with its rounding replaced, in its own process only, by our grid (then the
two differ in nothing but the implementation), and as it ships. Each group's step is taken when its first
column is reached, from the weights as the earlier columns' errors left them, in both. Printed: each output
error ‖X(W − Q)ᵀ‖ / ‖XWᵀ‖, with round to nearest on each grid beside it, and how far our weights are from the
peer's on our grid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from harness.methods import gptq
from harness.quant.quantize import QuantConfig, dequantize, quantize

PEER = r"""
import json, sys, time, torch
from gptqmodel.quantization import quantizer
from gptqmodel.quantization.config import QuantizeConfig
from gptqmodel.quantization.gptq import GPTQ
import gptqmodel

folder = sys.argv[1]
data = torch.load(f"{folder}/layer.pt")
weight, x = data["weight"], data["x"]

def run():
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    config = QuantizeConfig(  # act_group_aware: gptqmodel's own reordering of columns, not GPTQ's; off
        bits=4, group_size=128, sym=True, desc_act=False, act_group_aware=False, damp_percent=0.01
    )
    task = GPTQ(linear, config)
    task.quantizer.configure(perchannel=True)
    task.add_batch(x.unsqueeze(0), None)
    start = time.perf_counter()
    q = task.quantize(blocksize=128)[0]
    return q.float(), time.perf_counter() - start

native, native_s = run()
shipped = quantizer.quantize
def our_grid(values, scale, zero, maxq, *rest):  # its scale is 2·absmax/15: ours is absmax/7
    step = scale * 15 / 14
    return step * torch.clamp(torch.round(values / step), -7, 7)
quantizer.quantize = our_grid
ours_grid, ours_grid_s = run()
quantizer.quantize = shipped
torch.save({"native": native, "our_grid": ours_grid}, f"{folder}/peer.pt")
print(json.dumps({"version": gptqmodel.__version__, "native_s": native_s, "our_grid_s": ours_grid_s}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer-python", required=True, help="a Python with gptqmodel and torch==2.13.0")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=g)
    x = torch.randn(2048, 8, generator=g) @ torch.randn(8, 512, generator=g) * 4 + 0.3 * torch.randn(
        2048, 512, generator=g
    )
    hessian = 2 * x.T @ x / len(x)
    config = QuantConfig("int4", 128)
    gptq.quantize_layer(weight, hessian, config, damp=0.01)  # a first call sets up the codebook
    start = time.perf_counter()
    ours = gptq.quantize_layer(weight, hessian, config, damp=0.01).weight()
    ours_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"weight": weight, "x": x}, Path(folder) / "layer.pt")
        done = subprocess.run(
            [args.peer_python, "-c", PEER, folder], capture_output=True, text=True, check=True
        )
        peer = torch.load(Path(folder) / "peer.pt")
    info = json.loads(done.stdout.strip().splitlines()[-1])

    def error(approx: torch.Tensor) -> float:
        return float((x @ (weight - approx).T).norm() / (x @ weight.T).norm())

    blocks = weight.reshape(256, 4, 128)
    step = 2 * blocks.abs().amax(-1, keepdim=True) / 15
    peer_rtn = ((torch.round(blocks / step).clamp(-8, 7)) * step).reshape(256, 512)
    apart = (ours - peer["our_grid"]).abs()
    print(f"torch {torch.__version__}; gptqmodel {info['version']} (in {args.peer_python})")
    print("\n| run | grid | output error | time (s) |\n|---|---|--:|--:|")
    print(f"| ours, GPTQ | −7…7 × absmax/7 | {error(ours):.6f} | {ours_s:.3f} |")
    for label, grid, key in (
        ("on our grid", "−7…7 × absmax/7", "our_grid"),
        ("as shipped", "−8…7 × absmax/7.5", "native"),
    ):
        print(f"| gptqmodel, GPTQ {label} | {grid} | {error(peer[key]):.6f} | {info[key + '_s']:.3f} |")
    print(
        f"| ours, round to nearest | −7…7 × absmax/7 | {error(dequantize(quantize(weight, config))):.6f} | |"
    )
    print(f"| round to nearest | −8…7 × absmax/7.5 | {error(peer_rtn):.6f} | |")
    print(
        f"\nours against gptqmodel on our grid: max |Δ| {float(apart.max()):.2e}, "
        f"{int((apart > 1e-5).sum())} of {apart.numel()} entries apart by more than 1e-5"
    )


if __name__ == "__main__":
    main()
