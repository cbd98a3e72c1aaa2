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

from dataclasses import dataclass

import torch

from harness.methods import LayerQuantized, Method, register_method
from harness.quant import cpu_kernels
from harness.quant.quantize import (
    BlockGrid,
    QuantConfig,
    QuantizationError,
    assemble,
    block_grid,
    fused_on_cpu,
)


@dataclass(frozen=True)
class Factor:
    """What GPTQ takes from a Hessian, for every layer fed the same inputs: the column order (by decreasing
    diag H under ``act_order``), the input channels never active (diag H = 0) and U, the upper Cholesky factor
    of the dampened H⁻¹ in that order."""

    act_order: bool
    order: torch.Tensor
    dead: torch.Tensor
    u: torch.Tensor


def factorise(hessian: torch.Tensor, *, damp: float = 0.01, act_order: bool = False) -> Factor:
    """``hessian`` (in × in, 2XᵀX / N) dampened by ``damp`` × mean(diag H), ordered, and factorised."""
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(len(h))
    h = h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return Factor(act_order, order, dead, u)


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
    factor = factorise(hessian, damp=damp, act_order=act_order)
    return quantize_factored(weight, factor, config, lazy_block=lazy_block, name=name)


def quantize_factored(
    weight: torch.Tensor, factor: Factor, config: QuantConfig, *, lazy_block: int = 128, name: str = "tensor"
) -> LayerQuantized:
    """``quantize_layer`` with the Hessian already factorised: layers fed the same inputs share one."""
    rows, width = weight.shape
    block = config.resolve_block_size(tuple(weight.shape))
    per_tensor = block == rows * width
    if not per_tensor and width % block:
        raise QuantizationError(
            f"{name}: gptq needs blocks within a row; block {block} does not divide the input width {width}"
        )
    act_order, order, u = factor.act_order, factor.order, factor.u
    w = weight.detach().float().clone()
    w[:, factor.dead] = 0.0
    w = w[:, order]

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
        chunk, errors = w[:, start:end].contiguous(), torch.zeros(end - start, rows)  # rows × batch
        chunk_codes = torch.empty(end - start, rows, dtype=torch.int64)
        u_chunk = u[start:end, start:end].contiguous()
        group_of = [0 if per_tensor else column // block for column in columns[start:end]]
        i = 0
        while i < end - start:  # runs of columns whose blocks' constants are fixed
            if grids[group_of[i]] is None:  # the block's first column, in natural order
                grids[group_of[i]] = block_grid(_current(w, chunk, errors, u, start, i, block), config)
            stop = next((k for k in range(i + 1, end - start) if grids[group_of[k]] is None), end - start)
            _round_columns(chunk, errors, chunk_codes, u_chunk, range(i, stop), group_of, grids)
            i = stop
        codes[:, order[start:end]] = chunk_codes.T
        w[:, end:] -= errors.T @ u[start:end, end:]
    filled = [grid for grid in grids if grid is not None]
    scales = torch.stack([grid.scale for grid in filled], dim=1)
    minimums = None if filled[0].minimum is None else torch.stack([grid.minimum for grid in filled], dim=1)
    if per_tensor:
        scales, minimums = scales[:1], None if minimums is None else minimums[:1]
    return LayerQuantized(assemble(codes, scales, minimums, weight.dtype, config, block))


def _round_columns(
    chunk: torch.Tensor,
    errors: torch.Tensor,
    codes: torch.Tensor,
    u: torch.Tensor,
    columns: range,
    group_of: list[int],
    grids: list[BlockGrid | None],
) -> None:
    """Algorithm 1's inner loop over ``columns`` of a lazy batch (``chunk``: rows × batch), whose blocks'
    grids are all fixed: each column rounded, its error over U's diagonal kept (``errors``, ``codes``: batch ×
    rows) and subtracted from the batch's later columns. On the CPU a fused kernel: the same arithmetic,
    each update one fused multiply-add. torch's ``addr_`` (BLAS) fuses them in blocks of 16 rows and rounds
    twice on the rest, so the two agree bit for bit where the rows are a multiple of 16, as in every layer of
    a real model (tested), and to the last bit elsewhere."""
    used = sorted({group_of[i] for i in columns})
    picked = [grids[g] for g in used]
    assert all(grid is not None for grid in picked)
    book = picked[0].book  # type: ignore[union-attr]
    if fused_on_cpu(chunk, book):
        local = torch.tensor([used.index(g) if g in used else 0 for g in group_of])
        stacked = [torch.stack([getattr(grid, key) for grid in picked]) for key in ("inverse", "scale")]
        minimum = None if picked[0].minimum is None else torch.stack([grid.minimum for grid in picked])
        cpu_kernels.round_columns(chunk, errors, codes, u, columns, local, (*stacked, minimum), book)
        return
    across = chunk.T.contiguous()  # a column's rows together: addr_ on whole rows is one fused update
    for i in columns:
        grid = grids[group_of[i]]
        assert grid is not None
        codes[i], value = grid.round(across[i])
        errors[i] = (across[i] - value) / u[i, i]
        across[i:].addr_(u[i, i:], errors[i], alpha=-1.0)
    chunk.copy_(across.T)


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
    rows × columns: those inside the lazy batch (``chunk``) are already updated, those past it still owe the
    batch's errors so far (``errors``, transposed)."""
    batch = chunk.shape[1]
    inside = chunk[:, i : min(i + block, batch)]
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
