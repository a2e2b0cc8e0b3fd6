"""The packed position-embedding resampling kernel (see ``plan``): per packed row ``r`` with
y / x weight rows ``yr = y_row[r]``, ``xr = x_row[r]``

    learned:     out[r] = sum_a sum_c  wy[yr, a] wx[xr, c]  G[iy[yr, a], ix[xr, c]]
    factorized:  out[r] = sum_a wy[yr, a] Y[iy[yr, a]]  +  sum_c wx[xr, c] X[ix[xr, c]]

in fp32, one cast on the store. One program per (BLOCK_R rows, BLOCK_D columns); the tap loops
run to the block's widest tap count (a row's count of non-zero taps, which come first in its
table row), a shorter row's zero-weight taps masked off (no load).

The same kernel runs the two passes of the separable order (``launch._pos_resample_fwd``): an
axis without taps (``Y_TAPS`` / ``X_TAPS`` off) reads its row index as the grid's index along it,
with weight 1, and ``GRID_ROWS`` numbers the rows ``r = yr * n_cols + xr`` instead of loading
``y_row`` / ``x_row`` (the first pass writes every (y, x) pair of its intermediate grid)."""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import register_kernel


@register_kernel
@triton.jit
def _pos_resample_fwd_kernel(
    g_ptr, gx_ptr, out_ptr, y_row_ptr, x_row_ptr, y_index_ptr, y_weight_ptr, y_count_ptr, x_index_ptr,
    x_weight_ptr, x_count_ptr, total, dim, n_cols, y_taps, x_taps, stride_gy, stride_gx, stride_xx, stride_om,
    FACTORIZED: tl.constexpr, Y_TAPS: tl.constexpr, X_TAPS: tl.constexpr, GRID_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < total
    col_ok = cols < dim
    if GRID_ROWS:
        yr = rows // n_cols
        xr = rows % n_cols
    else:
        yr = tl.load(y_row_ptr + rows, mask=row_ok, other=0)
        xr = tl.load(x_row_ptr + rows, mask=row_ok, other=0)
    # the tap loops run to this block's widest row (its rows mostly share an image and its taps)
    ny = 1
    nx = 1
    if Y_TAPS:
        ny = tl.max(tl.load(y_count_ptr + yr, mask=row_ok, other=0), axis=0)
    if X_TAPS:
        nx = tl.max(tl.load(x_count_ptr + xr, mask=row_ok, other=0), axis=0)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    if FACTORIZED:
        for a in range(ny):
            iy = tl.load(y_index_ptr + yr * y_taps + a, mask=row_ok, other=0)
            wy = tl.load(y_weight_ptr + yr * y_taps + a, mask=row_ok, other=0.0)
            take = (row_ok & (wy != 0.0))[:, None] & col_ok[None, :]
            v = tl.load(g_ptr + iy[:, None] * stride_gy + cols[None, :], mask=take, other=0.0)
            acc += wy[:, None] * v.to(tl.float32)
        for c in range(nx):
            ix = tl.load(x_index_ptr + xr * x_taps + c, mask=row_ok, other=0)
            wx = tl.load(x_weight_ptr + xr * x_taps + c, mask=row_ok, other=0.0)
            take = (row_ok & (wx != 0.0))[:, None] & col_ok[None, :]
            v = tl.load(gx_ptr + ix[:, None] * stride_xx + cols[None, :], mask=take, other=0.0)
            acc += wx[:, None] * v.to(tl.float32)
    else:
        for a in range(ny):
            if Y_TAPS:
                iy = tl.load(y_index_ptr + yr * y_taps + a, mask=row_ok, other=0)
                wy = tl.load(y_weight_ptr + yr * y_taps + a, mask=row_ok, other=0.0)
            else:
                iy = yr
                wy = tl.full((BLOCK_R,), 1.0, tl.float32)
            for c in range(nx):
                if X_TAPS:
                    ix = tl.load(x_index_ptr + xr * x_taps + c, mask=row_ok, other=0)
                    wx = tl.load(x_weight_ptr + xr * x_taps + c, mask=row_ok, other=0.0)
                else:
                    ix = xr
                    wx = tl.full((BLOCK_R,), 1.0, tl.float32)
                w = wy * wx
                take = (row_ok & (w != 0.0))[:, None] & col_ok[None, :]
                offs = (iy * stride_gy + ix * stride_gx)[:, None] + cols[None, :]
                v = tl.load(g_ptr + offs, mask=take, other=0.0)
                acc += w[:, None] * v.to(tl.float32)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@register_kernel
@triton.jit
def _pos_resample_bwd_kernel(
    grad_ptr, wy_ptr, y_row_ptr, perm_ptr, seg_ptr, dh_ptr, dim, gh, stride_gm, stride_wy, stride_hx, stride_hi,
    BLOCK_S: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The learned grid's backward, first half: per x weight row ``xr``

        dH[xr, i] = sum over the packed rows r with x_row[r] = xr of  Wy[y_row[r], i] * grad[r]

    (``perm[seg[xr]:seg[xr + 1]]``: those rows, in packed order), float32. One program per (xr,
    BLOCK_I grid rows, BLOCK_D columns) sums its rows BLOCK_S at a time as an IEEE fp32 dot, in a
    fixed order: each element of dH is one program's, so the result is deterministic. The second
    half, ``dG[i, j] = sum_xr Wx[xr, j] dH[xr, i]``, is a matmul (launch.py)."""
    xr = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_d = tl.program_id(2)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    i_ok = ii < gh
    col_ok = cols < dim
    start = tl.load(seg_ptr + xr)
    end = tl.load(seg_ptr + xr + 1)
    acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    for s in range(start, end, BLOCK_S):
        offs = s + tl.arange(0, BLOCK_S)
        ok = offs < end
        r = tl.load(perm_ptr + offs, mask=ok, other=0)
        yr = tl.load(y_row_ptr + r, mask=ok, other=0)
        w = tl.load(wy_ptr + yr[None, :] * stride_wy + ii[:, None], mask=i_ok[:, None] & ok[None, :], other=0.0)
        g = tl.load(grad_ptr + r.to(tl.int64)[:, None] * stride_gm + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(w, g.to(tl.float32), acc, input_precision="ieee")
    out = dh_ptr + xr.to(tl.int64) * stride_hx + ii[:, None] * stride_hi + cols[None, :]
    tl.store(out, acc, mask=i_ok[:, None] & col_ok[None, :])
