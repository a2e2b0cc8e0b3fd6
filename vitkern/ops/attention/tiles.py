"""Device helpers shared by the attention kernels (inlined into them), and their wgmma rule.

Every kernel runs one program per row block (query block, or key block for dK / dV) of one
(batch, head) on a 1-D grid (:func:`_attn_program`), and holds each ``(rows, D)`` tile as the two
power-of-two head-dim pieces of :func:`~vitkern.ops.attention.configs._attn_pieces` (the second of
width 0 when D pads into one tile). The tiles a program keeps (q in the forward and dQ kernels,
k / v in the dK/dV kernel) are loaded once with masks, zero past T and past D
(:func:`_attn_load_tile`). Tiles loaded inside the loops take no masks: rows past T and columns
past D repeat a valid row / column (``tl.minimum(offs, T - 1)``, :func:`_attn_cols`), and the other
operand's zero tail or the score mask cancels them (masked loads in the loops cost registers that
spilled for head dims like 72 and 104).
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import dot_operand, register_helper, round_to


def _wgmma_rule(operand: str, block: str):
    """wgmma expected on sm_90: 16-bit operands (or fp32 with TF32), ``block`` (the M of the main
    dots) >= 64 and num_warps a multiple of 4."""

    def rule(spec) -> bool:
        ty = str(spec.get(operand, ""))
        tensor_core = ty in ("*bf16", "*fp16") or (ty == "*fp32" and spec.get("PRECISION") == "tf32")
        return tensor_core and int(spec.get(block, 0)) >= 64 and spec["num_warps"] % 4 == 0

    return rule


@register_helper
@triton.jit
def _attn_program(T, HEADS, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """This program's ``(batch * HEADS + head, batch, head, first row)`` on a grid of
    ``cdiv(T, BLOCK)`` row blocks per (batch, head).

    1-D grid (no 65535 limit on B * H); the row blocks of one head are adjacent (the other
    operand's rows stay in L2). REVERSE runs the last row blocks first: causal query blocks, the
    last being the longest. The (batch, head) index is int64 so that batch and head offsets do
    not wrap."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(T, BLOCK)
    pid_bh = (pid // num_blocks).to(tl.int64)
    pid_t = pid % num_blocks
    if REVERSE:
        pid_t = num_blocks - 1 - pid_t
    return pid_bh, pid_bh // HEADS, pid_bh % HEADS, pid_t * BLOCK


@register_helper
@triton.jit
def _attn_cols(HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """Column offsets of the two head-dim pieces, ``(offs_da, offs_db, cols_a, cols_b)``.

    ``cols_*`` are for mask-free loads: columns past the head dim repeat the last one. Without a
    second piece (BLOCK_DB = 0) ``offs_db`` / ``cols_b`` repeat the first one's (placeholders,
    never used)."""
    offs_da = tl.arange(0, BLOCK_DA)
    if BLOCK_DB > 0:
        offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    else:
        offs_db = offs_da
    if BLOCK_DA > HEAD_DIM:
        cols_a = tl.minimum(offs_da, HEAD_DIM - 1)
    else:
        cols_a = offs_da
    if BLOCK_DA + BLOCK_DB > HEAD_DIM:
        cols_b = tl.minimum(offs_db, HEAD_DIM - 1)
    else:
        cols_b = offs_db
    return offs_da, offs_db, cols_a, cols_b


@register_helper
@triton.jit
def _attn_load(ptrs, offs_r, n_r, offs_c, n_c, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """A 2-D tile; rows >= n_r / columns >= n_c read as 0 where the flags ask for a mask."""
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@register_helper
@triton.jit
def _attn_store(ptrs, x, offs_r, n_r, offs_c, n_c, MASK_C: tl.constexpr):
    if MASK_C:
        tl.store(ptrs, round_to(x, ptrs.dtype.element_ty), mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c))
    else:
        tl.store(ptrs, round_to(x, ptrs.dtype.element_ty), mask=offs_r[:, None] < n_r)


@register_helper
@triton.jit
def _attn_load_tile(base, stride_t, offs_t, n_t, offs_da, offs_db,
                    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """Rows ``offs_t`` of a ``(T, HEAD_DIM)`` slice at ``base`` as dot operands, one per head-dim
    piece; rows >= n_t and columns past the head dim read as 0. Without a second piece the second
    operand is the first (a placeholder, never used)."""
    x_a = dot_operand(_attn_load(base + offs_t[:, None] * stride_t + offs_da[None, :], offs_t, n_t,
                                 offs_da, HEAD_DIM, True, BLOCK_DA > HEAD_DIM))
    if BLOCK_DB > 0:
        x_b = dot_operand(_attn_load(base + offs_t[:, None] * stride_t + offs_db[None, :], offs_t, n_t,
                                     offs_db, HEAD_DIM, True, BLOCK_DA + BLOCK_DB > HEAD_DIM))
    else:
        x_b = x_a
    return x_a, x_b


@register_helper
@triton.jit
def _attn_store_tile(base, stride_t, x_a, x_b, offs_t, n_t, offs_da, offs_db,
                     HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """Store the pieces ``x_a`` / ``x_b`` as rows ``offs_t`` (those < n_t) of a ``(T, HEAD_DIM)``
    slice at ``base``, rounded to its dtype; columns past the head dim are not stored."""
    _attn_store(base + offs_t[:, None] * stride_t + offs_da[None, :], x_a,
                offs_t, n_t, offs_da, HEAD_DIM, BLOCK_DA > HEAD_DIM)
    if BLOCK_DB > 0:
        _attn_store(base + offs_t[:, None] * stride_t + offs_db[None, :], x_b,
                    offs_t, n_t, offs_db, HEAD_DIM, BLOCK_DA + BLOCK_DB > HEAD_DIM)


@register_helper
@triton.jit
def _attn_zeros(ROWS: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """fp32 accumulators of ``ROWS`` rows for the two head-dim pieces (the second a placeholder,
    never used, without a second piece)."""
    acc_a = tl.zeros([ROWS, BLOCK_DA], dtype=tl.float32)
    if BLOCK_DB > 0:
        acc_b = tl.zeros([ROWS, BLOCK_DB], dtype=tl.float32)
    else:
        acc_b = acc_a
    return acc_a, acc_b


@register_helper
@triton.jit
def _attn_key_range(start_m, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """``(n_full, n_end)`` for the query block starting at row ``start_m``: key blocks
    ``[0, n_full)`` are seen by every row of it (no masks), ``[n_full, n_end)`` are the causal
    diagonal and the Tk tail (masked)."""
    if CAUSAL:
        n_end = tl.minimum(start_m + BLOCK_M, Tk)
        n_full = tl.minimum(start_m, Tk) // BLOCK_N * BLOCK_N
    else:
        n_end = Tk
        n_full = Tk // BLOCK_N * BLOCK_N
    return n_full, n_end
