"""The quantization core: formats, codebooks, blockwise quantize/dequantize, double quantization, packing
and the fused CPU kernels. It imports nothing from the rest of the harness but ``harness.errors`` (the base
error class), so it can be read, tested and reused on its own."""
