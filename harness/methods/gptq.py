"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) on any format with absmax or affine block constants.

Columns are rounded in order (or by decreasing diag H with ``act_order``); each column's error, divided by its
diagonal of U (the upper Cholesky factor of H⁻¹), is subtracted from the columns not yet rounded, lazily in
batches of ``lazy_block`` columns (Algorithm 1). H = 2XᵀX / N from the layer's inputs, dampened by
``damp`` × mean(diag H); a column whose diagonal is 0 (an input channel never active) is set to 0 first.

Blocks are the format's: ``block_size`` contiguous columns of a row. A block's constants are fixed when its
first column is reached, from the block's weights as the earlier columns' errors have left them (GPTQ's
groups); under ``act_order`` columns of one block are reached out of order, so the constants are fixed up
front from the unquantized weights instead (GPTQ's static groups). A per-tensor block has one set of constants
for the whole weight, fixed up front. Double quantization applies to the final constants.
"""

from __future__ import annotations

import torch

from harness.methods import LayerQuantized, Method, register_method
from harness.quant.quantize import BlockGrid, QuantConfig, QuantizationError, assemble, block_grid


def quantize_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantConfig,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    lazy_block: int = 128,
    name: str = "tensor",
) -> LayerQuantized:
    """``weight`` (out × in) rounded column by column under ``hessian`` (in × in, 2XᵀX / N)."""
    rows, width = weight.shape
    block = config.resolve_block_size(tuple(weight.shape))
    per_tensor = block == rows * width
    if not per_tensor and width % block:
        raise QuantizationError(
            f"{name}: gptq needs blocks within a row; block {block} does not divide the input width {width}"
        )
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(width)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    groups = width // block if not per_tensor else 1
    grids: list[BlockGrid | None] = [None] * groups
    if act_order or per_tensor:  # static: from the unquantized weight, in its own column order
        original = weight.detach().float()
        for g in range(groups):
            part = original if per_tensor else original[:, g * block : (g + 1) * block]
            grids[g] = _tensor_grid(part, config) if per_tensor else block_grid(part, config)
    codes = torch.zeros(rows, width, dtype=torch.int64)
    columns = order.tolist()
    for start in range(0, width, lazy_block):
        end = min(start + lazy_block, width)
        # the batch transposed: a column, and the columns it updates, are contiguous rows
        chunk, errors = w[:, start:end].T.contiguous(), torch.zeros(end - start, rows)
        chunk_codes = torch.empty(end - start, rows, dtype=torch.int64)
        u_chunk = u[start:end, start:end]
        for i in range(end - start):
            column = columns[start + i]
            group = 0 if per_tensor else column // block
            if grids[group] is None:  # the block's first column, in natural order
                grids[group] = block_grid(_current(w, chunk, errors, u, start, i, block), config)
            grid = grids[group]
            assert grid is not None
            code, value = grid.round(chunk[i])
            chunk_codes[i] = code
            error = (chunk[i] - value) / u_chunk[i, i]
            chunk[i:].addr_(u_chunk[i, i:], error, alpha=-1.0)
            errors[i] = error
        codes[:, order[start:end]] = chunk_codes.T
        w[:, end:] -= errors.T @ u[start:end, end:]
    filled = [grid for grid in grids if grid is not None]
    scales = torch.stack([grid.scale for grid in filled], dim=1)
    minimums = None if filled[0].minimum is None else torch.stack([grid.minimum for grid in filled], dim=1)
    if per_tensor:
        scales, minimums = scales[:1], None if minimums is None else minimums[:1]
    return LayerQuantized(assemble(codes, scales, minimums, weight.dtype, config, block))


def _current(
    w: torch.Tensor,
    chunk: torch.Tensor,
    errors: torch.Tensor,
    u: torch.Tensor,
    start: int,
    i: int,
    block: int,
) -> torch.Tensor:
    """The block's columns (from lazy position ``start + i`` on) as the earlier columns' errors leave them,
    rows × columns: those inside the lazy batch (``chunk``, transposed) are already updated, those past it
    still owe the batch's errors so far (``errors``, transposed)."""
    batch = chunk.shape[0]
    inside = chunk[i : min(i + block, batch)].T
    past = i + block - batch
    if past <= 0:
        return inside
    later = slice(start + batch, start + batch + past)
    owed = w[:, later] - errors[:i].T @ u[start : start + i, later]
    return torch.cat([inside, owed], dim=1)


def _tensor_grid(weight: torch.Tensor, config: QuantConfig) -> BlockGrid:
    """One set of constants for the whole weight, spread over its rows."""
    grid = block_grid(weight.reshape(1, -1), config)
    rows = weight.shape[0]
    minimum = None if grid.minimum is None else grid.minimum.expand(rows)
    return BlockGrid(grid.book, grid.scale.expand(rows), minimum)


register_method(
    Method(
        "gptq",
        "GPTQ: error feedback through H⁻¹ (Frantar et al. 2022)",
        ("absmax", "affine"),
        calibrated=True,
    )
)
