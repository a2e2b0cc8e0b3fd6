"""The q / k prologue kernels: one pass over a ``(B, H, T, D)`` q or k applying the norm over the
head dim and the rotation, and its backward.

One program per (block of BLOCK_T tokens, batch * head), the whole head dim in one BLOCK_D-wide
tile (a power of two >= D; columns past D masked). The rotation pairs column ``c`` with its
partner ``p(c)`` (``c ^ 1`` interleaved, ``(c + D / 2) mod D`` half), and

    y[c] = n[c] * cos[c] + sign(c) * n[p(c)] * sin[c],   sign = -1 on the first column of a pair,

with ``n`` the normalised row. The partner values come from a second, column-permuted load of
the same rows (an L1 / L2 hit), so no register shuffle is needed and any head dim works, the
split "half" pairs of D = 80 included. Rows before ``PREFIX`` (class / register tokens) are not
rotated. Statistics in fp32; the norm's weight / bias and the tables are read as fp32.

Backward, per row: the inverse rotation ``dn[c] = dy[c] * cos[c] + sign(p(c)) * dy[p(c)] *
sin[p(c)]``, then the norm's backward; the weight / bias gradients as per-program partial sums
(a deterministic reduction on the host side) and, when asked, the tables' gradients per (batch,
head) program, summed by the launcher.

NORM: 0 none, 1 LayerNorm, 2 RMSNorm.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import register_helper, register_kernel


@register_helper
@triton.jit
def _prologue_cols(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr):
    """``(offs_d, partner, sign)``: the columns, their rotation partners and the sign of the
    partner's term (-1 on the first column of a pair)."""
    offs_d = tl.arange(0, BLOCK_D)
    if HALF:
        first = offs_d < HEAD_DIM // 2
        partner = tl.where(first, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
    else:
        first = (offs_d % 2) == 0
        partner = offs_d ^ 1
    partner = tl.minimum(partner, HEAD_DIM - 1)  # the masked columns past D stay in bounds
    sign = tl.where(first, -1.0, 1.0)
    return offs_d, partner, sign


@register_helper
@triton.jit
def _prologue_stats(x, mask_d, HEAD_DIM: tl.constexpr, NORM: tl.constexpr, eps):
    """Row ``(mean, rstd)`` of the fp32 tile ``x`` over its valid columns (mean 0 for RMSNorm)."""
    if NORM == 1:
        mean = tl.sum(x, axis=1) / HEAD_DIM
        xc = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
    else:
        mean = tl.sum(x, axis=1) * 0.0
        xc = x
    var = tl.sum(xc * xc, axis=1) / HEAD_DIM
    return mean, 1.0 / tl.sqrt(var + eps)


@register_kernel()
@triton.jit
def _qk_prologue_fwd_kernel(
    X, Y, W, BN, SIN, COS,
    stride_xb, stride_xh, stride_xt, stride_yb, stride_yh, stride_yt, stride_rh, stride_rt,
    H, T, PREFIX, eps,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d, partner, sign = _prologue_cols(HEAD_DIM, BLOCK_D, HALF)
    mask_t = offs_t < T
    mask_d = offs_d < HEAD_DIM
    mask = mask_t[:, None] & mask_d[None, :]
    x_rows = X + b * stride_xb + h * stride_xh + offs_t[:, None].to(tl.int64) * stride_xt
    x = tl.load(x_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        xp = tl.load(x_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        xp = x
    if NORM != 0:
        mean, rstd = _prologue_stats(x, mask_d, HEAD_DIM, NORM, eps)
        x = (x - mean[:, None]) * rstd[:, None]
        xp = (xp - mean[:, None]) * rstd[:, None]
        if HAS_W:
            x = x * tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            xp = xp * tl.load(W + partner, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            x = x + tl.load(BN + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            xp = xp + tl.load(BN + partner, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        r = offs_t - PREFIX
        rotated = mask_t & (r >= 0)
        t_rows = h * stride_rh + tl.maximum(r, 0)[:, None].to(tl.int64) * stride_rt
        tmask = rotated[:, None] & mask_d[None, :]
        cos = tl.load(COS + t_rows + offs_d[None, :], mask=tmask, other=1.0).to(tl.float32)
        sin = tl.load(SIN + t_rows + offs_d[None, :], mask=tmask, other=0.0).to(tl.float32)
        x = x * cos + sign[None, :] * xp * sin
    y_rows = Y + b * stride_yb + h * stride_yh + offs_t[:, None].to(tl.int64) * stride_yt
    tl.store(y_rows + offs_d[None, :], x.to(Y.dtype.element_ty), mask=mask)


@register_kernel()
@triton.jit
def _qk_prologue_bwd_kernel(
    DY, X, W, BN, SIN, COS, DX, DW_PART, DB_PART, DSIN_PART, DCOS_PART,
    stride_dyb, stride_dyh, stride_dyt, stride_xb, stride_xh, stride_xt,
    stride_dxb, stride_dxh, stride_dxt, stride_rh, stride_rt, stride_pt,
    H, T, PREFIX, eps,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DTABLES: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d, partner, sign = _prologue_cols(HEAD_DIM, BLOCK_D, HALF)
    mask_t = offs_t < T
    mask_d = offs_d < HEAD_DIM
    mask = mask_t[:, None] & mask_d[None, :]
    rows64 = offs_t[:, None].to(tl.int64)
    dy_rows = DY + b * stride_dyb + h * stride_dyh + rows64 * stride_dyt
    x_rows = X + b * stride_xb + h * stride_xh + rows64 * stride_xt
    dy = tl.load(dy_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM != 0:
        mean, rstd = _prologue_stats(x, mask_d, HEAD_DIM, NORM, eps)
        xhat = tl.where(mask_d[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
    else:
        xhat = x
    if HAS_W:
        w = tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if ROPE:
        r = offs_t - PREFIX
        rotated = mask_t & (r >= 0)
        rr = tl.maximum(r, 0)
        t_rows = h * stride_rh + rr[:, None].to(tl.int64) * stride_rt
        tmask = rotated[:, None] & mask_d[None, :]
        cos = tl.load(COS + t_rows + offs_d[None, :], mask=tmask, other=1.0).to(tl.float32)
        dyp = tl.load(dy_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        sin_p = tl.load(SIN + t_rows + partner[None, :], mask=tmask, other=0.0).to(tl.float32)
        # sign(p(c)) = -sign(c): the partner of a pair's first column is its second, and back
        dn = dy * cos - sign[None, :] * dyp * sin_p
        if NEED_DTABLES:
            # the normalised values (the rotation's input) at c and p(c)
            n = xhat
            xp = tl.load(x_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
            if NORM != 0:
                n_p = (xp - mean[:, None]) * rstd[:, None]
            else:
                n_p = xp
            if HAS_W:
                n = n * w[None, :]
                n_p = n_p * tl.load(W + partner, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                n = n + tl.load(BN + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
                n_p = n_p + tl.load(BN + partner, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            # this (batch, head)'s row of the (B * H, N, D) partials; the launcher sums them
            p_rows = pid_bh * stride_pt + rr[:, None].to(tl.int64) * HEAD_DIM
            tl.store(DCOS_PART + p_rows + offs_d[None, :], dy * n, mask=tmask)
            tl.store(DSIN_PART + p_rows + offs_d[None, :], sign[None, :] * dy * n_p, mask=tmask)
    else:
        dn = dy
    if NORM != 0:
        part_row = (pid_bh * tl.num_programs(0) + pid_t) * BLOCK_D
        if NEED_DW:
            tl.store(DW_PART + part_row + offs_d, tl.sum(dn * xhat, axis=0))
        if NEED_DB:
            tl.store(DB_PART + part_row + offs_d, tl.sum(dn, axis=0))
        if NEED_DX:
            if HAS_W:
                dn = dn * w[None, :]
            dn = tl.where(mask_d[None, :], dn, 0.0)
            c2 = tl.sum(dn * xhat, axis=1) / HEAD_DIM
            if NORM == 1:
                c1 = tl.sum(dn, axis=1) / HEAD_DIM
                dx = (dn - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            else:
                dx = (dn - xhat * c2[:, None]) * rstd[:, None]
    else:
        dx = dn
    if NEED_DX:
        dx_rows = DX + b * stride_dxb + h * stride_dxh + rows64 * stride_dxt
        tl.store(dx_rows + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask)
