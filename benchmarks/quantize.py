"""Quantize/dequantize speed against bitsandbytes and torchao, in one process, on the same tensors.

Measures wall time (median of --repeats runs, after one warm-up) for a 4096×4096 fp32 weight, block 64,
Gaussian and Student-t (3 dof): quantize and dequantize for nf4/fp4 with and without double quantization,
bnb's quantize_4bit/dequantize_4bit, torchao's to_nf4/get_original_weight, and our fake_quant. Prints
Mweights/s and the ratio against bnb, and checks that our output is bit-identical to bnb's.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/quantize.py`` (``make bench``). Timings on 2 cores are
noisy: compare ratios taken in the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial

import torch

warnings.filterwarnings("ignore")

import bitsandbytes.functional as bnb  # noqa: E402
from torchao.quantization import to_nf4  # noqa: E402

from harness.quant.double_quant import DoubleQuantConfig  # noqa: E402
from harness.quant.quantize import QuantConfig, dequantize, fake_quant, quantize  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: numba compile/cache load, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    n, bs, reps = args.size, args.block_size, args.repeats
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n}x{n} fp32, block {bs}, "
        f"median of {reps} runs (ms); ratio = bnb time / our time (>1: we are faster)\n"
    )
    torch.manual_seed(0)
    weights = {"gaussian": torch.randn(n, n), "student_t": torch.distributions.StudentT(3.0).sample((n, n))}
    header = f"{'dist':<10}{'case':<34}{'ms':>9}{'Mw/s':>9}{'vs bnb':>9}  bit-identical"
    print(header)
    print("-" * len(header))
    for dist, w in weights.items():
        for fmt in ("nf4", "fp4"):
            for dq in (False, True):
                tag = f"{fmt}{' +DQ' if dq else ''}"
                cfg = QuantConfig(fmt, bs, DoubleQuantConfig() if dq else None)
                packed, state = bnb.quantize_4bit(w, blocksize=bs, quant_type=fmt, compress_statistics=dq)
                ours = quantize(w, cfg)
                same_codes = torch.equal(ours.codes, packed.reshape(-1))
                same_values = torch.equal(dequantize(ours), bnb.dequantize_4bit(packed, state))
                rows = [
                    (
                        f"bnb quantize_4bit {tag}",
                        partial(bnb.quantize_4bit, w, blocksize=bs, quant_type=fmt, compress_statistics=dq),
                        None,
                    ),
                    (f"ours quantize {tag}", partial(quantize, w, cfg), same_codes),
                    (f"bnb dequantize_4bit {tag}", partial(bnb.dequantize_4bit, packed, state), None),
                    (f"ours dequantize {tag}", partial(dequantize, ours), same_values),
                ]
                timed = {name: median_ms(fn, reps) for name, fn, _ in rows}
                for name, _, same in rows:
                    ms = timed[name]
                    peer = timed[
                        name.replace("ours quantize", "bnb quantize_4bit").replace(
                            "ours dequantize", "bnb dequantize_4bit"
                        )
                    ]
                    flag = "" if same is None else ("yes" if same else "NO (DQ codes: exact vs bnb's table)")
                    print(f"{dist:<10}{name:<34}{ms:>9.1f}{n * n / ms / 1e3:>9.0f}{peer / ms:>9.2f}  {flag}")
        nf4 = to_nf4(w, block_size=bs, scaler_block_size=256)
        extra = [
            ("torchao to_nf4 (+its DQ)", partial(to_nf4, w, block_size=bs, scaler_block_size=256)),
            ("torchao get_original_weight", nf4.get_original_weight),
            ("ours fake_quant nf4", partial(fake_quant, w, QuantConfig("nf4", bs))),
        ]
        bnb_q = median_ms(partial(bnb.quantize_4bit, w, blocksize=bs, quant_type="nf4"), reps)
        for name, fn in extra:
            ms = median_ms(fn, reps)
            print(f"{dist:<10}{name:<34}{ms:>9.1f}{n * n / ms / 1e3:>9.0f}{bnb_q / ms:>9.2f}")
        print()


if __name__ == "__main__":
    main()
