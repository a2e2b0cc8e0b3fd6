"""The resampling launchers: the forward in its pass orders, the backward (a segmented kernel and a
matmul, deterministic)."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from vitkern.ops._config import KernelConfig
from vitkern.ops._triton import launch
from vitkern.ops.pos_resample.configs import _resample_config
from vitkern.ops.pos_resample.kernels import _pos_resample_bwd_kernel, _pos_resample_fwd_kernel
from vitkern.ops.pos_resample.plan import PASS_ORDERS


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


def _launch_resample(table, table_x, out, rows, dim, y_row, x_row, y_tables, x_tables, *, n_cols=0,
                     grid_rows=False):
    """One launch of the kernel over ``rows`` output rows and ``dim`` columns; ``y_tables`` /
    ``x_tables`` are ``(index, weight, count)``, or None for an axis read as the grid's own index."""
    factorized = table_x is not None
    config = _resample_config(dim)
    grid = (triton.cdiv(rows, config.meta["BLOCK_R"]), triton.cdiv(dim, config.meta["BLOCK_D"]))
    y_index, y_weight, y_count = y_tables if y_tables is not None else (y_row,) * 3
    x_index, x_weight, x_count = x_tables if x_tables is not None else (x_row,) * 3
    launch(
        _pos_resample_fwd_kernel, grid,
        table, table_x if factorized else table, out, y_row, x_row, y_index, y_weight, y_count, x_index, x_weight,
        x_count, rows, dim, n_cols, y_index.shape[-1] if y_tables is not None else 1,
        x_index.shape[-1] if x_tables is not None else 1,
        table.stride(0), table.stride(1) if not factorized else 0, table_x.stride(0) if factorized else 0,
        out.stride(0),
        FACTORIZED=factorized, Y_TAPS=y_tables is not None, X_TAPS=x_tables is not None, GRID_ROWS=grid_rows,
        config=config,
    )


def _pos_resample_fwd(table, table_x, y_row, x_row, y_index, y_weight, y_count, x_index, x_weight, x_count,
                      out_dtype: torch.dtype, pass_order: str = "joint") -> torch.Tensor:
    """``(total, D)`` in ``out_dtype``: the learned ``table`` ``(Gh, Gw, D)``, or the factorized y
    ``table`` ``(Gh, D)`` and ``table_x`` ``(Gw, D)``, resampled per row (kernels.py).

    ``pass_order`` (learned tables; :func:`vitkern.ops.pos_resample.plan.pick_pass_order`):
    "joint" gathers each row's ``ny * nx`` taps from the grid in one launch; "x_first" first
    resamples every grid row to each of the batch's distinct x weight rows, into a float32
    ``(Gh, n_x, D)`` grid, then gathers each output row's ``ny`` taps from it ("y_first" the
    other way round): ``Gh * n_x * nx + total * ny`` gathers for ``total * ny * nx``."""
    if pass_order not in PASS_ORDERS:
        raise ValueError(f"pos_resample: pass_order must be one of {PASS_ORDERS}, got {pass_order!r}")
    total, dim = y_row.shape[0], table.shape[-1]
    table, table_x = _aligned(table), _aligned(table_x)
    out = torch.empty((total, dim), dtype=out_dtype, device=table.device)
    if out.numel() == 0:
        return out
    y_tables, x_tables = (y_index, y_weight, y_count), (x_index, x_weight, x_count)
    if table_x is not None or pass_order == "joint":
        _launch_resample(table, table_x, out, total, dim, y_row, x_row, y_tables, x_tables)
        return out
    gh, gw, width = table.shape
    x_first = pass_order == "x_first"
    # the intermediate grid: every source row resampled along x (or column along y), float32
    # (the reference interpolates in float32 and casts once), rows of the aligned width
    shape = (gh, x_index.shape[0]) if x_first else (y_index.shape[0], gw)
    mid = torch.empty(shape + (width,), dtype=torch.float32, device=table.device)
    _launch_resample(table, None, mid.view(-1, width), shape[0] * shape[1], dim, y_row, x_row,
                     None if x_first else y_tables, x_tables if x_first else None, n_cols=shape[1], grid_rows=True)
    _launch_resample(mid, None, out, total, dim, y_row, x_row, y_tables if x_first else None,
                     None if x_first else x_tables)
    return out


def _pos_resample_bwd(grad, table, table_x, y_row, x_row, y_dense, x_dense, x_perm, x_seg):
    """``(d table, d table_x or None)`` in the tables' dtypes, deterministic. Learned:
    ``dG[i, j] = sum_r Wy[r, i] Wx[r, j] grad[r]`` in two halves, ``dH[xr, i] = sum over the
    rows of x weight row xr of Wy[r, i] grad[r]`` (kernels.py: one pass over ``grad``, each
    element summed by one program in a fixed order) and ``dG[i, j] = sum_xr Wx[xr, j] dH[xr, i]``
    (one float32 matmul of ``n_x`` rows); at the 128-image NaFlex batch ~0.9 + 0.2 GFLOP where
    the rows' dense outer products took 14. Factorized: ``dY = Wy^T grad``, ``dX = Wx^T grad``."""
    if table_x is not None:
        grad = grad.float()
        wy = y_dense.index_select(0, y_row.long())
        wx = x_dense.index_select(0, x_row.long())
        return (wy.t() @ grad).to(table.dtype), (wx.t() @ grad).to(table_x.dtype)
    gh, gw, dim = table.shape
    n_x = x_dense.shape[0]
    dh = torch.empty((n_x, gh, dim), dtype=torch.float32, device=grad.device)
    if n_x and dim:
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        # BLOCK_I 16 (the dot's smallest M) and BLOCK_S 16 keep the float32 accumulator and the
        # gathered Wy tile small: 48-80 registers, no spills, 6-10 blocks an SM (compile_check)
        block_d = min(128, max(16, triton.next_power_of_2(dim)))
        config = KernelConfig({"BLOCK_S": 16, "BLOCK_I": 16, "BLOCK_D": block_d}, num_warps=4, num_stages=1)
        launch(_pos_resample_bwd_kernel, (n_x, triton.cdiv(gh, 16), triton.cdiv(dim, block_d)),
               grad, y_dense, y_row, x_perm, x_seg, dh, dim, gh, grad.stride(0), y_dense.stride(0), dh.stride(0),
               dh.stride(1), config=config)
    # dG[i, j] = sum_xr Wx[xr, j] dH[xr, i]: (Gw, n_x) @ (n_x, Gh * D), then (Gh, Gw, D)
    dg = (x_dense.t() @ dh.view(n_x, gh * dim)).view(gw, gh, dim).transpose(0, 1)
    return dg.to(table.dtype).contiguous(), None
