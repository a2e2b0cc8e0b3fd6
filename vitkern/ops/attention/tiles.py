"""Device helpers shared by the attention kernels (inlined into them), and their wgmma rule.

Every kernel runs one program per row block (query block, or key block for dK / dV) of one
(batch, head) on a 1-D grid (:func:`_attn_program`; of one packed sequence and head,
:func:`_attn_seq_program`), and holds each ``(rows, D)`` tile as the two
power-of-two head-dim pieces of :func:`~vitkern.ops.attention.configs._attn_pieces` (the second of
width 0 when D pads into one tile). The tiles a program keeps (q in the forward and dQ kernels,
k / v in the dK/dV kernel) are loaded once with masks, zero past T and past D
(:func:`_attn_load_tile`). Tiles loaded inside the loops take no masks: rows past T and columns
past D repeat a valid row / column (``tl.minimum(offs, T - 1)``, :func:`_attn_cols`), and the other
operand's zero tail or the score mask cancels them (masked loads in the loops cost registers that
spilled for head dims like 72 and 104).

With TMA (sm_90, the launcher's ``TMA`` constexpr) the tiles come through tensor descriptors
built by each program for its own ``(rows, D)`` slice (:func:`_attn_descs`): the copy engine
zero-fills rows past T and columns past D and drops stores there, so neither masks nor clamped
rows are computed, and a packed sequence's descriptor ends at the sequence's last row.
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


#: Sequences per step of the packed-sequence block search (:func:`_attn_seq_program`).
SEQ_SEARCH_WIDTH = tl.constexpr(32)


@register_helper
@triton.jit
def _attn_seq_bounds(CU, s, TOTAL):
    """Rows ``[first, first + count)`` of packed sequence ``s``: ``CU[s]``, ``CU[s + 1]`` clamped to
    ``[0, TOTAL]`` (values that break the contract, which the launcher cannot check without a host
    sync, give wrong rows but never an access outside the tensor). ``first`` is int64."""
    first = tl.minimum(tl.maximum(tl.load(CU + s), 0), TOTAL)
    last = tl.minimum(tl.maximum(tl.load(CU + s + 1), first), TOTAL)
    return first.to(tl.int64), last - first


@register_helper
@triton.jit
def _attn_seq_program(CU_ROWS, CU_OTHER, NUM_SEQS, SEQ_BLOCKS, T, T_OTHER, HEADS,
                      BLOCK: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr):
    """This program's ``(base, other base, head, first row, rows, other rows)``: the row blocks of
    ``T`` rows (queries; keys for dK / dV) and the ``T_OTHER`` rows they attend to.

    VARLEN 0, a dense batch: :func:`_attn_program`; the bases are the batch index (times the
    batch strides), the row counts ``T`` and ``T_OTHER``. Packed sequences (``CU_ROWS`` /
    ``CU_OTHER``: int32 cumulative lengths of ``NUM_SEQS`` sequences, ``T`` / ``T_OTHER`` the
    totals): the bases are the sequence's first token (the launcher passes the token strides as
    the batch strides), the row counts its lengths. VARLEN 1 (the longest sequence known): a
    grid of ``SEQ_BLOCKS`` row blocks per (sequence, head). VARLEN 2 (nothing known on the host):
    a grid of ``T // BLOCK + NUM_SEQS`` row-block slots per head, sequence ``s`` owning the slots
    from ``CU_ROWS[s] // BLOCK + s`` on (strictly increasing, and each sequence's
    ``ceil(len / BLOCK)`` blocks fit before the next's), found by counting the sequences that
    start at or before the slot. A program whose block starts at or past its sequence's end has
    nothing to do: the first row it returns is >= its row count."""
    if VARLEN == 0:
        _, b, h, start = _attn_program(T, HEADS, BLOCK, REVERSE)
        base = b
        other_base = b
        rows = T
        other_rows = T_OTHER
    else:
        pid = tl.program_id(0)
        if VARLEN == 1:
            pid_sh = pid // SEQ_BLOCKS
            s = pid_sh // HEADS
            h = pid_sh % HEADS
            block = pid % SEQ_BLOCKS
            if REVERSE:
                block = SEQ_BLOCKS - 1 - block
            base, rows = _attn_seq_bounds(CU_ROWS, s, T)
        else:
            slots = T // BLOCK + NUM_SEQS
            h = pid // slots
            slot = pid % slots
            if REVERSE:
                slot = slots - 1 - slot
            count = 0
            for c in range(0, NUM_SEQS, SEQ_SEARCH_WIDTH):
                offs = c + tl.arange(0, SEQ_SEARCH_WIDTH)
                first = tl.minimum(tl.maximum(tl.load(CU_ROWS + offs, mask=offs < NUM_SEQS, other=0), 0), T)
                count += tl.sum(((first // BLOCK + offs <= slot) & (offs < NUM_SEQS)).to(tl.int32), 0)
            s = tl.maximum(count - 1, 0)
            base, rows = _attn_seq_bounds(CU_ROWS, s, T)
            block = slot - (base.to(tl.int32) // BLOCK + s)
        other_base, other_rows = _attn_seq_bounds(CU_OTHER, s, T_OTHER)
        start = tl.where(block >= 0, block * BLOCK, rows)
    return base, other_base, h, start, rows, other_rows


@register_helper
@triton.jit
def _attn_stat_layout(b, HEADS, T, VARLEN: tl.constexpr):
    """Where the per-row statistics (lse, delta) of query head ``h`` start: ``b_off + h * h_off``,
    for :func:`_attn_seq_program`'s query base ``b`` and ``T`` (the query rows of the launch).
    A dense batch: fp32 ``(B, HEADS, T)`` rows; packed sequences: ``(HEADS, T)``, ``b`` the
    sequence's first token."""
    if VARLEN == 0:
        b_off = b * HEADS * T
    else:
        b_off = b
    return b_off, T


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
def _attn_descs(base, rows, stride_t, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """TMA descriptors of the ``(rows, HEAD_DIM)`` slice at ``base`` (token stride ``stride_t``,
    unit last stride), one per head-dim piece: ``(BLOCK_R, BLOCK_DA)`` tiles at column 0 and
    ``(BLOCK_R, BLOCK_DB)`` tiles at column BLOCK_DA (without a second piece the second is the
    first, a placeholder). Loads past ``rows`` / HEAD_DIM read 0; stores there are dropped. A slice
    of no rows (a packed sequence without keys) is given one: it is never loaded from, and a
    descriptor's extents must be positive. The launcher checks the 16-byte alignment of the base
    and the strides (:func:`~vitkern.ops.attention.launch._attn_tma_ok`)."""
    rows = tl.maximum(rows, 1)
    desc_a = tl.make_tensor_descriptor(base, [rows, HEAD_DIM], [stride_t, 1], [BLOCK_R, BLOCK_DA])
    if BLOCK_DB > 0:
        desc_b = tl.make_tensor_descriptor(base, [rows, HEAD_DIM], [stride_t, 1], [BLOCK_R, BLOCK_DB])
    else:
        desc_b = desc_a
    return desc_a, desc_b


@register_helper
@triton.jit
def _attn_desc_load(desc_a, desc_b, row, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """The tile pieces starting at ``row`` of :func:`_attn_descs`' slice as dot operands (zero past
    its rows and the head dim); without a second piece the second is the first."""
    x_a = dot_operand(desc_a.load([row, 0]))
    if BLOCK_DB > 0:
        x_b = dot_operand(desc_b.load([row, BLOCK_DA]))
    else:
        x_b = x_a
    return x_a, x_b


@register_helper
@triton.jit
def _attn_desc_store(desc_a, desc_b, row, x_a, x_b, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """Store the fp32 pieces ``x_a`` / ``x_b`` rounded to the slice's dtype as the rows from
    ``row`` of :func:`_attn_descs`' slice (rows past its end and columns past the head dim are
    dropped by the copy engine)."""
    desc_a.store([row, 0], round_to(x_a, desc_a.dtype))
    if BLOCK_DB > 0:
        desc_b.store([row, BLOCK_DA], round_to(x_b, desc_b.dtype))


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
