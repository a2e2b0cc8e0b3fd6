"""The LayerNorm Triton kernels and their device helpers.

Forward: ``_layer_norm_fwd_kernel`` holds BLOCK_M whole rows in registers (rows up to 8192 wide;
several rows per program for narrow ones; a row as one or two power-of-two pieces, so that 768 or
1280 wide rows carry no padding lanes) and saves fp32 mean / rstd;
``_layer_norm_fwd_looped_kernel`` takes wider rows in chunks (Chan's merge of per-chunk mean and
M2, then a normalising pass). Backward: ``_layer_norm_bwd_kernel`` (register path) and
``_layer_norm_bwd_looped_kernel`` write dX in one pass (the register path's rows in the forward's
pieces) and keep dW / dB partial sums per program
over a persistent grid, which ``_layer_norm_bwd_dwdb_kernel`` reduces. The add variant is the
same kernels with HAS_RESIDUAL (forward writes ``s`` too) / HAS_DS (backward adds the gradient of
``s``); HAS_DX_LOW writes dX a second time in a 16-bit dtype in the same pass (the gradient of a
16-bit input whose sum with a float32 residual was normalised: the GEMM backward that consumes it
reads 16 bits, and no separate cast pass runs).

Rows are the flattened leading dims: row r of x starts at X + r * stride_xm. Row offsets are
int64; statistics and all arithmetic are fp32; each output is cast once, on store. Column
strides are arguments (Triton specialises a stride of 1 to a constant, so the common case keeps
its 16-byte vector loads; an expanded gradient arrives with stride 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import register_helper, register_kernel, round_to


@register_helper
@triton.jit
def _fwd_input(X, R, S, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, stride_sm,
               HAS_RESIDUAL: tl.constexpr):
    """The fp32 block the forward normalises: x, or with HAS_RESIDUAL s = x + r rounded to S's
    dtype (so that y is exactly the LayerNorm of the returned sum, the one backward reads), which
    is also written to S."""
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        s = round_to(x + r.to(tl.float32), S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_sm + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    return x


@register_helper
@triton.jit
def _fwd_store(Y, W, B, rows, cols, col_mask, mask, xc, rstd, stride_ym,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y = xc * rstd (* w + b) for the columns ``cols``, stored in Y's dtype."""
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)


@register_kernel
@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD,
    M, N,
    stride_xm, stride_xn, stride_rm, stride_rn, stride_ym, stride_sm,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    """BLOCK_M whole rows per program, N <= BLOCK_N + BLOCK_N2: the rows live in registers.

    A row is one power-of-two piece of BLOCK_N columns or, with BLOCK_N2 > 0, two pieces
    (BLOCK_N, then BLOCK_N2 from column BLOCK_N): 768 = 512 + 256, 1280 = 1024 + 256, 1152 =
    1024 + 128, 384 = 256 + 128 are held without padding lanes (one 1024-wide piece left a
    quarter of the lanes idle at 768). Two-pass statistics over the registers (mean, then the
    centred variance). With HAS_RESIDUAL the normalised row is s = x + r rounded to S's dtype,
    so y is exactly the LayerNorm of the sum that is returned (and that backward reads), and s is
    written to S.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = _fwd_input(X, R, S, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, stride_sm, HAS_RESIDUAL)
    total = tl.sum(x, axis=1)
    if BLOCK_N2 > 0:
        cols2 = BLOCK_N + tl.arange(0, BLOCK_N2)
        col_mask2 = cols2 < N
        mask2 = row_mask[:, None] & col_mask2[None, :]
        x2 = _fwd_input(X, R, S, rows, cols2, mask2, stride_xm, stride_xn, stride_rm, stride_rn, stride_sm,
                        HAS_RESIDUAL)
        total += tl.sum(x2, axis=1)
    mean = total / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    m2 = tl.sum(xc * xc, axis=1)
    if BLOCK_N2 > 0:
        xc2 = tl.where(mask2, x2 - mean[:, None], 0.0)
        m2 += tl.sum(xc2 * xc2, axis=1)
    rstd = tl.math.rsqrt(m2 / N + eps)
    _fwd_store(Y, W, B, rows, cols, col_mask, mask, xc, rstd, stride_ym, HAS_WEIGHT, HAS_BIAS)
    if BLOCK_N2 > 0:
        _fwd_store(Y, W, B, rows, cols2, col_mask2, mask2, xc2, rstd, stride_ym, HAS_WEIGHT, HAS_BIAS)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@register_kernel
@triton.jit
def _layer_norm_fwd_looped_kernel(
    X, R, W, B, Y, S, MEAN, RSTD,
    M, N,
    stride_xm, stride_xn, stride_rm, stride_rn, stride_ym, stride_sm,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M rows per program (1 on the GPU) wider than the register path: BLOCK_N chunks,
    two passes.

    Pass 1 merges per-chunk (mean, M2) pairs (Chan, Golub and LeVeque): as accurate as the
    two-pass formula with one read. Pass 2 normalises (its re-read mostly hits L2). With
    HAS_RESIDUAL pass 1 writes s = x + r and pass 2 reads s back: one load instead of two.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = _fwd_input(X, R, S, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, stride_sm,
                       HAS_RESIDUAL)
        n_b = tl.cast(tl.minimum(N - start, BLOCK_N), tl.float32)
        mean_b = tl.sum(x, axis=1) / n_b
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        n_a = tl.cast(start, tl.float32)
        delta = mean_b - mean
        frac = n_b / (n_a + n_b)
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * (n_a * frac)
    rstd = tl.math.rsqrt(m2 / N + eps)
    if HAS_RESIDUAL:
        # pass 2 reads s back: make all of this program's pass-1 stores visible to every thread
        tl.debug_barrier()
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        if HAS_RESIDUAL:
            x = tl.load(S + rows[:, None] * stride_sm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        _fwd_store(Y, W, B, rows, cols, col_mask, mask, x - mean[:, None], rstd, stride_ym, HAS_WEIGHT, HAS_BIAS)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@register_helper
@triton.jit
def _bwd_store_dx(DX, DX_LOW, DS, rows, cols, mask, xhat, wdy, c1, c2, rstd, stride_dsm, stride_dsn, stride_dxm,
                  HAS_DS: tl.constexpr, HAS_DX_LOW: tl.constexpr):
    """dx = rstd * (w*dy - xhat * c1 - c2) (c1 = mean(xhat * w*dy), c2 = mean(w*dy) over the row),
    plus with HAS_DS the gradient of the returned sum s = x + residual (add variant); stored in
    DX's dtype and, with HAS_DX_LOW, also in DX_LOW's (the 16-bit gradient stream: the same row
    stride as DX)."""
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_DS:
        ds = tl.load(DS + rows[:, None] * stride_dsm + cols[None, :] * stride_dsn, mask=mask, other=0.0)
        dx = dx + ds.to(tl.float32)
    offs = rows[:, None] * stride_dxm + cols[None, :]
    tl.store(DX + offs, round_to(dx, DX.dtype.element_ty), mask=mask)
    if HAS_DX_LOW:
        tl.store(DX_LOW + offs, round_to(dx, DX_LOW.dtype.element_ty), mask=mask)


@register_helper
@triton.jit
def _bwd_piece(DY, X, w, rows, row_mask, cols, col_mask, mean, rstd, stride_dym, stride_dyn, stride_xm, stride_xn,
               HAS_WEIGHT: tl.constexpr):
    """The register-path backward's columns ``cols`` (one power-of-two piece of the row) of its
    row block: (mask, dy, xhat, w*dy), fp32, zero outside the mask; ``w`` is the piece's weight,
    loaded once per program."""
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        wdy = dy * w[None, :]
    else:
        wdy = dy
    return mask, dy, xhat, wdy


@register_helper
@triton.jit
def _bwd_piece_state(W, cols, N, BLOCK_M: tl.constexpr, PIECE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr):
    """A piece's per-program state: (column mask, fp32 weight, dW and dB accumulators of
    (BLOCK_M, PIECE)); 0.0 placeholders, never read, where a flag is off."""
    col_mask = cols < N
    w = 0.0
    dw_acc = 0.0
    db_acc = 0.0
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if COMPUTE_DW:
        dw_acc = tl.zeros((BLOCK_M, PIECE), dtype=tl.float32)
    if COMPUTE_DB:
        db_acc = tl.zeros((BLOCK_M, PIECE), dtype=tl.float32)
    return col_mask, w, dw_acc, db_acc


@register_helper
@triton.jit
def _bwd_piece_finish(DX, DX_LOW, DS, rows, cols, mask, dy, xhat, wdy, c1, c2, rstd, dw_acc, db_acc,
                      stride_dsm, stride_dsn, stride_dxm, HAS_DS: tl.constexpr, HAS_DX_LOW: tl.constexpr,
                      COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr):
    """A piece's dX stored (:func:`_bwd_store_dx`) and its share added to the dW / dB
    accumulators, which it returns."""
    _bwd_store_dx(DX, DX_LOW, DS, rows, cols, mask, xhat, wdy, c1, c2, rstd, stride_dsm, stride_dsn, stride_dxm,
                  HAS_DS, HAS_DX_LOW)
    if COMPUTE_DW:
        dw_acc += dy * xhat
    if COMPUTE_DB:
        db_acc += dy
    return dw_acc, db_acc


@register_helper
@triton.jit
def _bwd_piece_partials(DW_PARTIAL, DB_PARTIAL, partial, cols, col_mask, dw_acc, db_acc,
                        COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr):
    """A piece's columns of this program's dW / dB partial rows (at element ``partial``)."""
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + partial + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + partial + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@register_kernel
@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DS, DX, DX_LOW, DW_PARTIAL, DB_PARTIAL,
    M, N,
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_dsm, stride_dsn, stride_dxm,
    HAS_WEIGHT: tl.constexpr, HAS_DS: tl.constexpr, HAS_DX_LOW: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """dX for BLOCK_M whole rows at a time (N <= BLOCK_N + BLOCK_N2), persistent over row blocks.

    dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)): one pass over x and dy. A row is
    one power-of-two piece or, with BLOCK_N2 > 0, two (BLOCK_N, then BLOCK_N2 from column
    BLOCK_N), as in the forward: 768 = 512 + 256 carries no padding lanes (one 1024-wide piece
    left a quarter of them idle, with their registers and shared-memory stages). Each program
    keeps its dW / dB partial sums in fp32 registers and writes one row of partials at the end
    (summed by _layer_norm_bwd_dwdb_kernel). With HAS_DS the gradient of the returned sum
    s = x + residual is added to dX (add variant). NUM_STAGES > 1 prefetches the next row block
    (cp.async on sm_80+).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask, w, dw_acc, db_acc = _bwd_piece_state(W, cols, N, BLOCK_M, BLOCK_N, HAS_WEIGHT, COMPUTE_DW, COMPUTE_DB)
    if BLOCK_N2 > 0:
        cols2 = BLOCK_N + tl.arange(0, BLOCK_N2)
        col_mask2, w2, dw_acc2, db_acc2 = _bwd_piece_state(W, cols2, N, BLOCK_M, BLOCK_N2, HAS_WEIGHT, COMPUTE_DW,
                                                           COMPUTE_DB)
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    for rb in tl.range(pid, num_row_blocks, num_programs, num_stages=NUM_STAGES):
        rows = tl.cast(rb, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        mask, dy, xhat, wdy = _bwd_piece(DY, X, w, rows, row_mask, cols, col_mask, mean, rstd,
                                         stride_dym, stride_dyn, stride_xm, stride_xn, HAS_WEIGHT)
        c1 = tl.sum(xhat * wdy, axis=1)
        c2 = tl.sum(wdy, axis=1)
        if BLOCK_N2 > 0:
            mask2, dy2, xhat2, wdy2 = _bwd_piece(DY, X, w2, rows, row_mask, cols2, col_mask2, mean, rstd,
                                                 stride_dym, stride_dyn, stride_xm, stride_xn, HAS_WEIGHT)
            c1 += tl.sum(xhat2 * wdy2, axis=1)
            c2 += tl.sum(wdy2, axis=1)
        c1 = c1 / N
        c2 = c2 / N
        dw_acc, db_acc = _bwd_piece_finish(DX, DX_LOW, DS, rows, cols, mask, dy, xhat, wdy, c1, c2, rstd, dw_acc,
                                           db_acc, stride_dsm, stride_dsn, stride_dxm, HAS_DS, HAS_DX_LOW,
                                           COMPUTE_DW, COMPUTE_DB)
        if BLOCK_N2 > 0:
            dw_acc2, db_acc2 = _bwd_piece_finish(DX, DX_LOW, DS, rows, cols2, mask2, dy2, xhat2, wdy2, c1, c2, rstd,
                                                 dw_acc2, db_acc2, stride_dsm, stride_dsn, stride_dxm, HAS_DS,
                                                 HAS_DX_LOW, COMPUTE_DW, COMPUTE_DB)
    partial = pid.to(tl.int64) * N
    _bwd_piece_partials(DW_PARTIAL, DB_PARTIAL, partial, cols, col_mask, dw_acc, db_acc, COMPUTE_DW, COMPUTE_DB)
    if BLOCK_N2 > 0:
        _bwd_piece_partials(DW_PARTIAL, DB_PARTIAL, partial, cols2, col_mask2, dw_acc2, db_acc2, COMPUTE_DW,
                            COMPUTE_DB)


@register_helper
@triton.jit
def _bwd_looped_chunk(DY, X, W, rows, row_mask, start, mean, rstd, N, stride_dym, stride_dyn, stride_xm, stride_xn,
                      HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The chunk of columns [start, start + BLOCK_N) of the looped backward's row block, read by
    both of its passes: (cols, col_mask, mask, dy, xhat, w*dy), fp32, zero outside the mask."""
    cols = start + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        wdy = dy * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        wdy = dy
    return cols, col_mask, mask, dy, xhat, wdy


@register_kernel
@triton.jit
def _layer_norm_bwd_looped_kernel(
    DY, X, W, MEAN, RSTD, DS, DX, DX_LOW, DW_PARTIAL, DB_PARTIAL,
    M, N,
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_dsm, stride_dsn, stride_dxm,
    HAS_WEIGHT: tl.constexpr, HAS_DS: tl.constexpr, HAS_DX_LOW: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dX for rows wider than the register path, BLOCK_M rows at a time (1 on the GPU),
    persistent over row blocks, two passes per row block.

    Pass 1 reduces the two row sums in BLOCK_N chunks; pass 2 writes dX and adds dy*xhat / dy into
    this program's own fp32 row of the partial buffers (no other program touches it, so no atomics;
    the row is zeroed first, so the buffers need no memset).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    partial_row = pid.to(tl.int64) * N
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + partial_row + cols, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=cols < N)
        if COMPUTE_DB:
            tl.store(DB_PARTIAL + partial_row + cols, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=cols < N)
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    for rb in range(pid, num_row_blocks, num_programs):
        rows = tl.cast(rb, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            _, _, _, _, xhat, wdy = _bwd_looped_chunk(DY, X, W, rows, row_mask, start, mean, rstd, N,
                                                      stride_dym, stride_dyn, stride_xm, stride_xn,
                                                      HAS_WEIGHT, BLOCK_N)
            acc1 += xhat * wdy
            acc2 += wdy
        c1 = tl.sum(acc1, axis=1) / N
        c2 = tl.sum(acc2, axis=1) / N
        # order the previous row block's (or the zeroing) partial stores before this one's loads
        tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            cols, col_mask, mask, dy, xhat, wdy = _bwd_looped_chunk(DY, X, W, rows, row_mask, start, mean, rstd, N,
                                                                    stride_dym, stride_dyn, stride_xm, stride_xn,
                                                                    HAS_WEIGHT, BLOCK_N)
            _bwd_store_dx(DX, DX_LOW, DS, rows, cols, mask, xhat, wdy, c1, c2, rstd, stride_dsm, stride_dsn,
                          stride_dxm, HAS_DS, HAS_DX_LOW)
            if COMPUTE_DW:
                dw_ptrs = DW_PARTIAL + partial_row + cols
                dw = tl.load(dw_ptrs, mask=col_mask, other=0.0) + tl.sum(dy * xhat, axis=0)
                tl.store(dw_ptrs, dw, mask=col_mask)
            if COMPUTE_DB:
                db_ptrs = DB_PARTIAL + partial_row + cols
                tl.store(db_ptrs, tl.load(db_ptrs, mask=col_mask, other=0.0) + tl.sum(dy, axis=0), mask=col_mask)


@register_kernel
@triton.jit
def _layer_norm_bwd_dwdb_kernel(
    DW_PARTIAL, DB_PARTIAL, DW, DB,
    G, N, rows_per_split,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Sum the (G, N) fp32 partials over G in a fixed order (deterministic); cast once on store.

    Program (c, s) sums rows [s * rows_per_split, (s + 1) * rows_per_split) of column strip c
    into row s of DW / DB: with one split DW / DB are the (N,) results; with several they are
    (splits, N) fp32 partials that a second launch (one split) sums, so a narrow layer's few
    column strips still spread over the SMs."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    pid_s = tl.program_id(1)
    g_lo = pid_s * rows_per_split
    g_hi = tl.minimum(G, g_lo + rows_per_split)
    if COMPUTE_DW:
        DW += pid_s.to(tl.int64) * N
        dw = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    if COMPUTE_DB:
        DB += pid_s.to(tl.int64) * N
        db = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in tl.range(g_lo, g_hi, BLOCK_G, num_stages=NUM_STAGES):
        g = g0 + tl.arange(0, BLOCK_G)
        offs = g[:, None].to(tl.int64) * N + cols[None, :]
        mask = (g < g_hi)[:, None] & col_mask[None, :]
        if COMPUTE_DW:
            dw += tl.load(DW_PARTIAL + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            db += tl.load(DB_PARTIAL + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(DW + cols, round_to(tl.sum(dw, axis=0), DW.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + cols, round_to(tl.sum(db, axis=0), DB.dtype.element_ty), mask=col_mask)
