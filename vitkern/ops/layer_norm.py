"""LayerNorm over the last dimension, and the fused residual add + LayerNorm.

Public functions (re-exported as ``vitkern.layer_norm`` / ``vitkern.add_layer_norm``):

- ``layer_norm(x, weight=None, bias=None, eps=1e-5)``: ``F.layer_norm(x, (x.shape[-1],), ...)``.
- ``add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5) -> (y, s)``: ``s = x + residual``
  and ``y = layer_norm(s)``, for models whose residual add is not already fused into a GEMM
  epilogue (vitkern's own ViT puts it in the proj / fc2 epilogues instead).

Backends are registered at the bottom of the module (``register_impl``). Every implementation is
called with the public function's arguments after its argument checks and autocast casts:
``impl(x, weight, bias, eps)`` and ``impl(x, residual, weight, bias, eps)``.

Numerics: statistics (mean, variance) in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs of
the references), biased variance, ``rstd = 1 / sqrt(var + eps)``, one cast on output. The add
variant rounds ``s`` to its dtype before normalising, so ``y`` is exactly the LayerNorm of the
returned ``s``.

The Triton backend, in the five layers every op follows:

1. Kernels. Forward: ``_layer_norm_fwd_kernel`` holds BLOCK_M whole rows in registers (rows up to
   8192 wide; several rows per program for narrow ones) and saves fp32 mean / rstd;
   ``_layer_norm_fwd_looped_kernel`` takes wider rows in chunks (Chan's merge of per-chunk mean
   and M2, then a normalising pass). Backward: ``_layer_norm_bwd_kernel`` (register path) and
   ``_layer_norm_bwd_looped_kernel`` write dX in one pass and keep dW / dB partial sums per
   program over a persistent grid (SM count x programs per SM on the GPU, a fixed count under the
   interpreter), which ``_layer_norm_bwd_dwdb_kernel`` reduces. The add variant is the same
   kernels with HAS_RESIDUAL (forward writes ``s`` too) / HAS_DS (backward adds the gradient of
   ``s``).
2. Launchers ``_layer_norm_fwd`` / ``_layer_norm_bwd``: any leading shape and strides (rows are
   flattened without a copy whenever the leading dims collapse to one stride; expanded gradients
   are read with stride 0), outputs contiguous.
3. Registered ops ``vitkern::layer_norm_fwd``, ``vitkern::add_layer_norm_fwd`` and
   ``vitkern::layer_norm_bwd`` (custom ops with fakes).
4. Autograd: the forward ops save (x or s, weight, mean, rstd); backward is the registered
   ``vitkern::layer_norm_bwd``.
5. The public functions below, backend "triton".

Cost per row of width N, element size e bytes (minimum HBM traffic; all far below 1 FLOP/byte,
so memory bound: the floor is bytes / copy bandwidth):

- forward: read N*e, write N*e, + 8 bytes (mean, rstd); ~8 FLOP per element;
- add forward: read 2*N*e (x, residual), write 2*N*e (y, s), + 8 bytes;
- backward: read 2*N*e (x or s, dy) + 8 bytes, write N*e (dx); the add variant also reads the
  gradient of ``s`` (N*e); ~14 FLOP per element; plus the dW / dB partials, 2 * N * 4 bytes per
  program written once and read once by the reduction (programs = a few per SM).
The looped kernels (N > 8192) read each row twice; the second read mostly hits L2.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import (
    FLOAT_DTYPES,
    autocast_dtype,
    cast_floating,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
    kernel_op,
)
from vitkern.ops._config import device_arch, INTERPRETING, KernelConfig, num_sms
from vitkern.ops._triton import launch, register_kernel, round_to
from vitkern.testing.compile_check import compile_cases
from vitkern.ops._index import rows_int32_safe

__all__ = ["layer_norm", "add_layer_norm", "layer_norm_ref", "add_layer_norm_ref"]


# --------------------------------------------------------------------------------------------
# Reference implementations (pure PyTorch, differentiable, any device, float64 accepted)
# --------------------------------------------------------------------------------------------


def layer_norm_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Reference LayerNorm over the last dimension (no argument checks): ``F.layer_norm``."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference residual add + LayerNorm (no argument checks): ``(layer_norm(x + residual), x + residual)``.

    The sum has the promoted dtype of ``x`` and ``residual``; weight and bias are cast to it.
    """
    s = x + residual
    weight, bias = cast_floating(s.dtype, weight, bias)
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


# --------------------------------------------------------------------------------------------
# Layer 1: Triton kernels
# --------------------------------------------------------------------------------------------
# Rows are the flattened leading dims: row r of x starts at X + r * stride_xm. Row offsets are
# int64; statistics and all arithmetic are fp32; each output is cast once, on store. Column
# strides are arguments (Triton specialises a stride of 1 to a constant, so the common case keeps
# its 16-byte vector loads; an expanded gradient arrives with stride 0).

@register_kernel
@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD,
    M, N,
    stride_xm, stride_xn, stride_rm, stride_rn, stride_ym, stride_sm,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M whole rows per program, N <= BLOCK_N: the rows live in registers.

    Two-pass statistics over the registers (mean, then the centred variance). With HAS_RESIDUAL the
    normalised row is s = x + r rounded to S's dtype, so y is exactly the LayerNorm of the sum that
    is returned (and that backward reads), and s is written to S.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        s = round_to(x + r.to(tl.float32), S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_sm + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = tl.math.rsqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)
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
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
            s = round_to(x + r.to(tl.float32), S.dtype.element_ty)
            tl.store(S + rows[:, None] * stride_sm + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)
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
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@register_kernel
@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DS, DX, DW_PARTIAL, DB_PARTIAL,
    M, N,
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_dsm, stride_dsn, stride_dxm,
    HAS_WEIGHT: tl.constexpr, HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """dX for BLOCK_M whole rows at a time (N <= BLOCK_N), persistent over row blocks.

    dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)): one pass over x and dy. Each
    program keeps its dW / dB partial sums in fp32 registers and writes one row of partials at the
    end (summed by _layer_norm_bwd_dwdb_kernel). With HAS_DS the gradient of the returned sum
    s = x + residual is added to dX (add variant). NUM_STAGES > 1 prefetches the next row block
    (cp.async on sm_80+).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if COMPUTE_DW:
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if COMPUTE_DB:
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    for rb in tl.range(pid, num_row_blocks, num_programs, num_stages=NUM_STAGES):
        rows = tl.cast(rb, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            ds = tl.load(DS + rows[:, None] * stride_dsm + cols[None, :] * stride_dsn, mask=mask, other=0.0)
            dx = dx + ds.to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], round_to(dx, DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@register_kernel
@triton.jit
def _layer_norm_bwd_looped_kernel(
    DY, X, W, MEAN, RSTD, DS, DX, DW_PARTIAL, DB_PARTIAL,
    M, N,
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_dsm, stride_dsn, stride_dxm,
    HAS_WEIGHT: tl.constexpr, HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
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
            acc1 += xhat * wdy
            acc2 += wdy
        c1 = tl.sum(acc1, axis=1) / N
        c2 = tl.sum(acc2, axis=1) / N
        # order the previous row block's (or the zeroing) partial stores before this one's loads
        tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
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
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DS:
                ds = tl.load(DS + rows[:, None] * stride_dsm + cols[None, :] * stride_dsn, mask=mask, other=0.0)
                dx = dx + ds.to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], round_to(dx, DX.dtype.element_ty), mask=mask)
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
    G, N,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Sum the (G, N) fp32 partials over G in a fixed order (deterministic); cast once on store."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if COMPUTE_DW:
        dw = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    if COMPUTE_DB:
        db = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in tl.range(0, G, BLOCK_G, num_stages=NUM_STAGES):
        g = g0 + tl.arange(0, BLOCK_G)
        offs = g[:, None].to(tl.int64) * N + cols[None, :]
        mask = (g < G)[:, None] & col_mask[None, :]
        if COMPUTE_DW:
            dw += tl.load(DW_PARTIAL + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            db += tl.load(DB_PARTIAL + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(DW + cols, round_to(tl.sum(dw, axis=0), DW.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + cols, round_to(tl.sum(db, axis=0), DB.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Configs (data)
# --------------------------------------------------------------------------------------------
# Rows up to _MAX_FUSED_N wide live in registers, BLOCK_N = next power of two >= max(N, 128);
# wider rows take the looped kernels. The tables give each BLOCK_N about 16 elements per thread
# (two 16-byte vectors of 16-bit data). Next to each entry: registers per thread from ptxas,
# sm_80 / sm_90, the maximum over dtypes and flags (vitkern.testing.compile_check --full); every
# entry compiles without spills on both.

_MAX_FUSED_N = 8192
#: Widest row the Triton backend takes (the looped kernels work beyond it; this bounds the dW /
#: dB partial buffers and what the tests cover).
MAX_WIDTH = 65536

_FWD_CONFIGS: dict[int, KernelConfig] = {
    128: KernelConfig({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=1),   # 48 / 50
    256: KernelConfig({"BLOCK_M": 8, "BLOCK_N": 256}, num_warps=4, num_stages=1),    # 64 / 56
    512: KernelConfig({"BLOCK_M": 4, "BLOCK_N": 512}, num_warps=4, num_stages=1),    # 54 / 56
    1024: KernelConfig({"BLOCK_M": 2, "BLOCK_N": 1024}, num_warps=4, num_stages=1),  # 64 / 56
    2048: KernelConfig({"BLOCK_M": 1, "BLOCK_N": 2048}, num_warps=4, num_stages=1),  # 40 / 44
    4096: KernelConfig({"BLOCK_M": 1, "BLOCK_N": 4096}, num_warps=8, num_stages=1),  # 48 / 46
    8192: KernelConfig({"BLOCK_M": 1, "BLOCK_N": 8192}, num_warps=16, num_stages=1), # 64 / 64
}
_FWD_LOOPED_CONFIG = KernelConfig({"BLOCK_M": 1, "BLOCK_N": 4096}, num_warps=8, num_stages=1)  # 40 / 54

# Backward holds x, dy, w, xhat and two accumulators per element: fewer rows per program. The
# grid is programs_per_sm x SM count, no more than fit on the SMs at once (registers: the
# 4-warp configs use <= 80, so 6 would fit), so that no program starts in a second wave; fewer
# programs mean fewer partials to reduce. NUM_STAGES 2 prefetches the next row block (cp.async;
# at 4096 with 16 warps it spilled 8 bytes on sm_90 for fp32 with HAS_DS, hence 1 there).
_BWD_CONFIGS: dict[int, tuple[KernelConfig, int]] = {
    128: (KernelConfig({"BLOCK_M": 8, "BLOCK_N": 128, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 80 / 80
    256: (KernelConfig({"BLOCK_M": 4, "BLOCK_N": 256, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 80 / 80
    512: (KernelConfig({"BLOCK_M": 2, "BLOCK_N": 512, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 72 / 80
    1024: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 1024, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 79 / 80
    2048: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 2048, "NUM_STAGES": 2}, num_warps=8, num_stages=1), 2),  # 72 / 72
    4096: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 4096, "NUM_STAGES": 1}, num_warps=16, num_stages=1), 1),  # 64 / 72
    8192: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 8192, "NUM_STAGES": 1}, num_warps=16, num_stages=1), 1),  # 128 / 128
}
# The sm_90 family at 8192: 16 warps cap a thread at 128 registers, where Triton 3.6 spills 8 bytes
# (3.8 fits in 125); 8 warps compile to 254 / 255 registers (3.8 / 3.6) without spills, still one
# program per SM. On sm_80, 16 warps hold on both versions and 8 warps spill under 3.6.
_BWD_CONFIGS_SM90 = {
    8192: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 8192, "NUM_STAGES": 1}, num_warps=8, num_stages=1), 1),
}
# Wide rows: 4 rows per step, so each program's read-modify-write of its partial row (L2
# resident: 2 x programs x N x 4 bytes) is amortised over 4 rows.
_BWD_LOOPED_CONFIG = (KernelConfig({"BLOCK_M": 4, "BLOCK_N": 1024}, num_warps=8, num_stages=1), 2)  # 102 / 128
# 16 columns (64-byte segments of each partial row) per program: N / 16 programs, 48 at 768.
_DWDB_CONFIG = KernelConfig({"BLOCK_G": 64, "BLOCK_N": 16, "NUM_STAGES": 2}, num_warps=4, num_stages=1)  # 56 / 56
# Cap on the two fp32 partial buffers together (bytes): bounds the persistent grid at wide rows.
_PARTIAL_BYTES_CAP = 64 << 20


def _block_n(n: int) -> int:
    return max(128, triton.next_power_of_2(n))


# The interpreter's cost is per block operation, not per element: under it, blocks take more
# rows (same kernels, same BLOCK_N and chunking) so that the CPU tests stay fast. The tests also
# run the GPU configs unchanged, at small row counts.
_WIDE_INTERPRETER_BLOCKS = INTERPRETING
_INTERPRETER_BLOCK_ELEMENTS = 65536


def _for_interpreter(config: KernelConfig, grow: str = "BLOCK_M", other: str = "BLOCK_N") -> KernelConfig:
    """Under the interpreter, ``grow`` (a block dim) enlarged to _INTERPRETER_BLOCK_ELEMENTS / ``other``."""
    if not _WIDE_INTERPRETER_BLOCKS:
        return config
    meta = dict(config.meta)
    meta[grow] = max(meta[grow], _INTERPRETER_BLOCK_ELEMENTS // meta[other])
    return dataclasses.replace(config, meta=meta)


def _fwd_config(n: int) -> tuple[object, KernelConfig]:
    if n > _MAX_FUSED_N:
        return _layer_norm_fwd_looped_kernel, _for_interpreter(_FWD_LOOPED_CONFIG)
    return _layer_norm_fwd_kernel, _for_interpreter(_FWD_CONFIGS[_block_n(n)])


def _bwd_config(n: int, device=None) -> tuple[object, KernelConfig, int]:
    if n > _MAX_FUSED_N:
        config, per_sm = _BWD_LOOPED_CONFIG
        return _layer_norm_bwd_looped_kernel, _for_interpreter(config), per_sm
    block_n = _block_n(n)
    table = _BWD_CONFIGS_SM90 if block_n in _BWD_CONFIGS_SM90 and device_arch(device) == 90 else _BWD_CONFIGS
    config, per_sm = table[block_n]
    return _layer_norm_bwd_kernel, _for_interpreter(config), per_sm


# --------------------------------------------------------------------------------------------
# Layer 2: launchers
# --------------------------------------------------------------------------------------------


def _check_launch(x: torch.Tensor, **others: Optional[torch.Tensor]) -> int:
    """Launcher-side validation (the public functions check first; this guards direct calls)."""
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if not 1 <= n <= MAX_WIDTH:
        raise ValueError(f"layer_norm (triton): the normalised width must be in [1, {MAX_WIDTH}], got {n}")
    for name, t in (("x", x), *others.items()):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"layer_norm (triton): {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"layer_norm (triton): {name} is on {t.device} but x is on {x.device}")
    return n


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as a (rows, n) view when its leading dims collapse to one row stride, else a copy.

    Row offsets are int64 in the kernels, column offsets (``cols * stride_n``) int32: a view whose
    ``(n - 1) * stride_n`` passes 2^31 - 1 (a transposed input) is copied to unit column stride."""
    try:
        v = t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n).contiguous()
    return rows_int32_safe(v)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests fill them with NaN to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _as_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def _layer_norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward launcher: ``(y, s, mean, rstd)``; ``s = x + residual`` (None without a residual).

    ``y`` has ``s``'s dtype (``x``'s without a residual); mean / rstd are fp32 of shape
    ``x.shape[:-1]``. Outputs are contiguous; inputs may have any strides.
    """
    n = _check_launch(x, residual=residual, weight=weight, bias=bias)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    weight, bias = _as_vector(weight), _as_vector(bias)
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    if residual is not None:
        r2 = _as_rows(residual, n)
        s = _empty(x.shape, torch.promote_types(x.dtype, residual.dtype), x.device)
        s2 = s.view(m, n)
        y_dtype = s.dtype
    else:
        r2, s, s2, y_dtype = None, None, None, x.dtype
    y = _empty(x.shape, y_dtype, x.device)
    y2 = y.view(m, n)
    mean = _empty(x.shape[:-1], torch.float32, x.device)
    rstd = _empty(x.shape[:-1], torch.float32, x.device)
    if m == 0:
        return y, s, mean, rstd
    kernel, config = _fwd_config(n)
    launch(
        kernel, (triton.cdiv(m, config.meta["BLOCK_M"]),),
        x2, r2, weight, bias, y2, s2, mean, rstd,
        m, n,
        x2.stride(0), x2.stride(1),
        r2.stride(0) if r2 is not None else 0, r2.stride(1) if r2 is not None else 1,
        y2.stride(0), s2.stride(0) if s2 is not None else 0,
        eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        config=config,
    )
    return y, s, mean, rstd


def _layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ds: Optional[torch.Tensor],
    compute_dw: bool,
    db_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward launcher: ``(dx, dw, db)``.

    ``x`` is the tensor that was normalised (the sum ``s`` for the add variant) and ``dx`` has its
    dtype; ``ds`` (add variant) is the gradient of the returned sum, added to ``dx``. ``dw`` (in
    ``weight``'s dtype) is computed when ``compute_dw``; ``db`` when ``db_dtype`` is given.
    ``dy`` / ``ds`` may have any strides, including the stride 0 of an expanded gradient.
    """
    n = _check_launch(x, dy=dy, weight=weight, ds=ds)
    for name, t in (("dy", dy), ("ds", ds)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    compute_dw = bool(compute_dw) and weight is not None
    compute_db = db_dtype is not None
    weight = _as_vector(weight)
    x2 = _as_rows(x, n)
    dy2 = _as_rows(dy, n)
    ds2 = _as_rows(ds, n) if ds is not None else None
    m = x2.shape[0]
    mean, rstd = mean.reshape(m), rstd.reshape(m)
    dx = _empty(x.shape, x.dtype, x.device)
    dx2 = dx.view(m, n)
    dw = _empty((n,), weight.dtype, x.device) if compute_dw else None
    db = _empty((n,), db_dtype, x.device) if compute_db else None
    if m == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db
    kernel, config, per_sm = _bwd_config(n, x.device if x.device.type == "cuda" else None)
    programs = num_sms(x.device) * per_sm
    programs = min(programs, triton.cdiv(m, config.meta["BLOCK_M"]), max(1, _PARTIAL_BYTES_CAP // (8 * n)))
    dw_partial = _empty((programs, n), torch.float32, x.device) if compute_dw else None
    db_partial = _empty((programs, n), torch.float32, x.device) if compute_db else None
    launch(
        kernel, (programs,),
        dy2, x2, weight, mean, rstd, ds2, dx2, dw_partial, db_partial,
        m, n,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
        ds2.stride(0) if ds2 is not None else 0, ds2.stride(1) if ds2 is not None else 1,
        dx2.stride(0),
        HAS_WEIGHT=weight is not None, HAS_DS=ds is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
        config=config,
    )
    if compute_dw or compute_db:
        dwdb_config = _for_interpreter(_DWDB_CONFIG, grow="BLOCK_N", other="BLOCK_G")
        launch(
            _layer_norm_bwd_dwdb_kernel, (triton.cdiv(n, dwdb_config.meta["BLOCK_N"]),),
            dw_partial, db_partial, dw, db, programs, n,
            COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            config=dwdb_config,
        )
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Layers 3 and 4: registered ops (custom_op + fake) and their autograd
# --------------------------------------------------------------------------------------------
# Outputs never alias inputs and no output is Optional: the backward op returns empty (0,)
# tensors for the parameter gradients it was not asked for.


def _stats_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _layer_norm_fwd_fake(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), _stats_fake(x), _stats_fake(x)


def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    s = torch.empty(x.shape, dtype=dtype, device=x.device)
    return y, s, _stats_fake(x), _stats_fake(x)


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, ds, compute_dw, db_dtype):
    n = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_dtype = weight.dtype if weight is not None else x.dtype
    dw = torch.empty((n if compute_dw and weight is not None else 0,), dtype=dw_dtype, device=x.device)
    db = torch.empty((n if db_dtype is not None else 0,), dtype=db_dtype or x.dtype, device=x.device)
    return dx, dw, db


@kernel_op("vitkern::layer_norm_bwd", fake=_layer_norm_bwd_fake)
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ds: Optional[torch.Tensor],
    compute_dw: bool,
    db_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd, ds, compute_dw, db_dtype)
    if dw is None:
        dw = torch.empty((0,), dtype=(weight if weight is not None else x).dtype, device=x.device)
    if db is None:
        db = torch.empty((0,), dtype=db_dtype or x.dtype, device=x.device)
    return dx, dw, db


def _param_grads(ctx, dw: torch.Tensor, db: torch.Tensor, w_index: int):
    gw = dw if ctx.needs_input_grad[w_index] else None
    gb = db if ctx.needs_input_grad[w_index + 1] else None
    return gw, gb


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    db_dtype = ctx.bias_dtype if ctx.needs_input_grad[2] else None
    dx, dw, db = torch.ops.vitkern.layer_norm_bwd(dy, x, weight, mean, rstd, None, compute_dw, db_dtype)
    gw, gb = _param_grads(ctx, dw, db, 1)
    return (dx if ctx.needs_input_grad[0] else None), gw, gb, None


@kernel_op(
    "vitkern::layer_norm_fwd",
    fake=_layer_norm_fwd_fake,
    setup_context=_layer_norm_setup,
    backward=_layer_norm_backward,
)
def _layer_norm_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, dy, ds, dmean, drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[2]
    db_dtype = ctx.bias_dtype if ctx.needs_input_grad[3] else None
    dsum, dw, db = torch.ops.vitkern.layer_norm_bwd(dy, s, weight, mean, rstd, ds, compute_dw, db_dtype)
    gx = dsum.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    gr = dsum.to(ctx.residual_dtype) if ctx.needs_input_grad[1] else None
    gw, gb = _param_grads(ctx, dw, db, 2)
    return gx, gr, gw, gb, None


@kernel_op(
    "vitkern::add_layer_norm_fwd",
    fake=_add_layer_norm_fwd_fake,
    setup_context=_add_layer_norm_setup,
    backward=_add_layer_norm_backward,
)
def _add_layer_norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_fwd(x, residual, weight, bias, eps)


# --------------------------------------------------------------------------------------------
# The Triton backend (what register_impl gets: the public arguments after checks and autocast)
# --------------------------------------------------------------------------------------------


def _triton_supports_width(n: int) -> Optional[str]:
    if not 1 <= n <= MAX_WIDTH:
        return f"the Triton LayerNorm kernels take widths 1..{MAX_WIDTH} (x.shape[-1] = {n})"
    return None


def _layer_norm_triton_supports(x, weight=None, bias=None, eps=1e-5) -> Optional[str]:
    return _triton_supports_width(x.shape[-1])


def _add_layer_norm_triton_supports(x, residual, weight=None, bias=None, eps=1e-5) -> Optional[str]:
    return _triton_supports_width(x.shape[-1])


def _layer_norm_triton(x, weight=None, bias=None, eps=1e-5):
    return torch.ops.vitkern.layer_norm_fwd(x, weight, bias, eps)[0]


def _add_layer_norm_triton(x, residual, weight=None, bias=None, eps=1e-5):
    y, s, _, _ = torch.ops.vitkern.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return y, s


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return float(eps)


def _check_affine(x: torch.Tensor, weight, bias) -> None:
    n = x.shape[-1]
    check_optional_tensor("weight", weight, shape=(n,))
    check_optional_tensor("bias", bias, shape=(n,))


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``.

    Equals ``torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)``.

    Args:
        x: ``(..., N)`` float32 / float16 / bfloat16 tensor, any leading shape and strides.
        weight: optional ``(N,)`` scale (gamma).
        bias: optional ``(N,)`` shift (beta).
        eps: non-negative number added to the variance (default 1e-5 like torch; timm's ViT uses
            1e-6, Hugging Face's 1e-12).

    Returns:
        ``y`` with ``x``'s shape and dtype. Statistics are computed in fp32.

    Autocast: like torch's ``layer_norm`` on CUDA, the op runs in float32 under autocast (inputs are
    cast to float32 and ``y`` is float32), on every device type. Outside autocast, ``x``, ``weight``
    and ``bias`` must share one dtype.

    Raises:
        TypeError: a non-tensor argument, or an unsupported / mismatched dtype.
        ValueError: ``weight`` or ``bias`` not of shape ``(N,)``, a negative ``eps``, tensors on
            different devices.
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("x", x, min_ndim=1)
    _check_affine(x, weight, bias)
    eps = _check_eps(eps)
    device = check_same_device(x=x, weight=weight, bias=bias)
    if autocast_dtype(device) is not None:
        x, weight, bias = cast_floating(torch.float32, x, weight, bias)
    else:
        check_same_dtype(x=x, weight=weight, bias=bias)
    impl = select_impl("layer_norm", device, x, weight, bias, eps)
    return impl(x, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by LayerNorm: returns ``(layer_norm(x + residual), x + residual)``.

    Both outputs are new tensors (``residual`` is not updated in place).

    Args:
        x: ``(..., N)`` float32 / float16 / bfloat16 tensor (typically a block's branch output).
        residual: tensor of ``x``'s shape: the residual stream. It may have a higher precision than
            ``x`` (float32 with a float16 / bfloat16 ``x``); otherwise the dtypes must match.
        weight, bias: optional ``(N,)`` affine parameters, in ``x``'s dtype or the sum's dtype.
        eps: non-negative number added to the variance.

    Returns:
        ``(y, s)``: ``s = x + residual`` in the promoted dtype of ``x`` and ``residual``; ``y`` the
        LayerNorm of ``s``, in ``s``'s dtype.

    Autocast: like torch's ``layer_norm``, the op runs in float32 under autocast: all inputs are
    cast to float32 and both outputs are float32 (with timm's float32 residual stream this is
    exactly what eager timm computes).

    Raises:
        TypeError: a non-tensor argument, or an unsupported / mismatched dtype.
        ValueError: ``residual`` of another shape, ``weight`` / ``bias`` not ``(N,)``, a negative
            ``eps``, tensors on different devices.
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("residual", residual, shape=tuple(x.shape))
    _check_affine(x, weight, bias)
    eps = _check_eps(eps)
    device = check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if autocast_dtype(device) is not None:
        x, residual, weight, bias = cast_floating(torch.float32, x, residual, weight, bias)
    else:
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype != torch.float32):
            raise TypeError(
                f"residual has dtype {str(residual.dtype).replace('torch.', '')} but x has "
                f"{str(x.dtype).replace('torch.', '')}; residual must have x's dtype or float32 "
                "(a higher-precision residual stream), or run under torch.autocast"
            )
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype not in (x.dtype, residual.dtype):
                raise TypeError(
                    f"{name} has dtype {str(t.dtype).replace('torch.', '')}; it must have x's dtype "
                    f"({str(x.dtype).replace('torch.', '')}) or residual's "
                    f"({str(residual.dtype).replace('torch.', '')})"
                )
    impl = select_impl("add_layer_norm", device, x, residual, weight, bias, eps)
    return impl(x, residual, weight, bias, eps)


# --------------------------------------------------------------------------------------------
# Backend registration
# --------------------------------------------------------------------------------------------

register_impl("layer_norm", "reference", layer_norm_ref)
register_impl("add_layer_norm", "reference", add_layer_norm_ref)
register_impl("layer_norm", "triton", _layer_norm_triton, supports=_layer_norm_triton_supports)
register_impl("add_layer_norm", "triton", _add_layer_norm_triton, supports=_add_layer_norm_triton_supports)


# --------------------------------------------------------------------------------------------
# Static compile cases (vitkern.testing.compile_check): CPU tensors, nothing runs
# --------------------------------------------------------------------------------------------


def _compile_case(shape, dtype, *, affine=True, residual=False, res_dtype=None, backward=True, view=None):
    n = shape[-1]
    x = torch.empty(shape, dtype=dtype)
    if view is not None:
        x = view(x)
        n = x.shape[-1]
    w = torch.empty(n, dtype=dtype) if affine else None
    b = torch.empty(n, dtype=dtype) if affine else None
    r = torch.empty(x.shape, dtype=res_dtype or dtype) if residual else None
    y, s, mean, rstd = _layer_norm_fwd(x, r, w, b, 1e-6)
    if backward:
        src = s if residual else x
        _layer_norm_bwd(torch.empty(src.shape, dtype=src.dtype), src, w, mean, rstd,
                        torch.empty_like(src) if residual else None, affine, b.dtype if affine else None)


@compile_cases
def _layer_norm_cases():
    # the benchmark shapes (bf16, ViT-B / L / H), with and without the residual
    for rows, n in ((128 * 197, 768), (128 * 197, 1024), (64 * 257, 1280)):
        _compile_case((rows, n), torch.bfloat16)
        _compile_case((rows, n), torch.bfloat16, residual=True)
    # every kernel variant once: dtypes, no affine, an fp32 residual stream, a misaligned row
    # stride, an expanded gradient, narrow and looped widths
    _compile_case((2, 197, 192), torch.float32, affine=False)
    _compile_case((2, 197, 384), torch.float16, residual=True, res_dtype=torch.float32)
    _compile_case((197, 1001), torch.bfloat16, view=lambda t: t[:, 1:])
    x = torch.empty(197, 8192, dtype=torch.bfloat16)
    w = torch.empty(8192, dtype=torch.bfloat16)
    _, _, mean, rstd = _layer_norm_fwd(x, None, w, w, 1e-6)
    _layer_norm_bwd(torch.empty((), dtype=torch.bfloat16).expand(x.shape), x, w, mean, rstd, None, True, w.dtype)
    _compile_case((197, 16384), torch.bfloat16)
    _compile_case((197, 16384), torch.float32, affine=False, residual=True)


@compile_cases(slow=True)
def _layer_norm_all_configs():
    # every config of every kernel, each dtype, each flag combination
    widths = sorted(_FWD_CONFIGS) + [2 * _MAX_FUSED_N]
    for dtype in FLOAT_DTYPES:
        for n in widths:
            for affine in (False, True):
                for residual in (False, True):
                    _compile_case((4, n), dtype, affine=affine, residual=residual)
