"""The resampling launcher and the backward (dense weight rows, deterministic matmuls)."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from vitkern.ops._triton import launch
from vitkern.ops.pos_resample.configs import _resample_config
from vitkern.ops.pos_resample.kernels import _pos_resample_fwd_kernel

#: Rows of the backward's (rows, Gh * Gw) float32 weight block per matmul: bounds its scratch
#: (64 MiB at a 16 x 16 grid), summed chunk after chunk in a fixed order.
BWD_SCRATCH_ELEMENTS = 1 << 24


def _aligned(table: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``table`` with rows of a multiple of 16 elements (a zero-padded copy where they are not:
    the grid is small), so that the gathers' offsets are provably aligned: with D = 40 rows the
    kernel compiled to 146-255 registers or spilled, with padded rows to ~40."""
    if table is None:
        return None
    dim = table.shape[-1]
    if dim % 16 == 0:
        return table.contiguous()
    padded = table.new_zeros(table.shape[:-1] + (-(-dim // 16) * 16,))
    padded[..., :dim] = table
    return padded


def _pos_resample_fwd(table, table_x, y_row, x_row, y_index, y_weight, y_count, x_index, x_weight, x_count,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """``(total, D)`` in ``out_dtype``: the learned ``table`` ``(Gh, Gw, D)``, or the factorized y
    ``table`` ``(Gh, D)`` and ``table_x`` ``(Gw, D)``, resampled per row (kernels.py)."""
    total, dim = y_row.shape[0], table.shape[-1]
    table, table_x = _aligned(table), _aligned(table_x)
    out = torch.empty((total, dim), dtype=out_dtype, device=table.device)
    if out.numel() == 0:
        return out
    factorized = table_x is not None
    config = _resample_config(dim)
    grid = (triton.cdiv(total, config.meta["BLOCK_R"]), triton.cdiv(dim, config.meta["BLOCK_D"]))
    launch(
        _pos_resample_fwd_kernel, grid,
        table, table_x if factorized else table, out, y_row, x_row, y_index, y_weight, y_count, x_index, x_weight,
        x_count, total, dim, y_index.shape[1], x_index.shape[1],
        table.stride(0), table.stride(1) if not factorized else 0, table_x.stride(0) if factorized else 0,
        out.stride(0),
        FACTORIZED=factorized, config=config,
    )
    return out


def _pos_resample_bwd(grad, table, table_x, y_row, x_row, y_dense, x_dense):
    """``(d table, d table_x or None)`` in the tables' dtypes: ``dG[i, j] = sum_r Wy[r, i] Wx[r, j]
    grad[r]`` as float32 matmuls of the rows' dense weights (chunked; a fixed summation order, so
    deterministic), ``dY = Wy^T grad`` / ``dX = Wx^T grad`` when factorized."""
    grad = grad.float()
    wy = y_dense.index_select(0, y_row.long())
    wx = x_dense.index_select(0, x_row.long())
    if table_x is not None:
        return (wy.t() @ grad).to(table.dtype), (wx.t() @ grad).to(table_x.dtype)
    gh, gw, dim = table.shape
    dg = torch.zeros((gh * gw, dim), dtype=torch.float32, device=grad.device)
    step = max(1, BWD_SCRATCH_ELEMENTS // (gh * gw))
    for start in range(0, grad.shape[0], step):
        stop = start + step
        a = (wy[start:stop, :, None] * wx[start:stop, None, :]).reshape(-1, gh * gw)
        dg.addmm_(a.t(), grad[start:stop])
    return dg.view(gh, gw, dim).to(table.dtype), None

