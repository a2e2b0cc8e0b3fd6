"""The attention backward kernels: delta, dK / dV, the deterministic dQ, and the fused short-sequence
backward.

delta = rowsum(dO * O) (a small kernel); dK / dV per key block of a kv head, looping over query
blocks and over the query heads of its group (GQA gradients summed in registers, no atomics),
one key block's work being :func:`_attn_bwd_key_block`; dQ either by a separate kernel per query
block (bit-reproducible), accumulated by the dK/dV kernel with fp32 atomics (for head dims
without a masked tail), or, in the fused kernel, by each program in its own fp32 scratch in a
fixed order (bit-reproducible, no atomics, no dQ buffer the size of dQ: see
:func:`~vitkern.ops.attention.configs._attn_bwd_plan` for which runs where). With VARLEN the
dK/dV and dQ kernels run over packed variable-length sequences (:func:`_attn_seq_program`);
delta runs on the packed tokens as one sequence.

Every query-block or key-block loop is one loop: the blocks that need the score mask (the causal
diagonal, the Tq or Tk tail) apply it behind a runtime test, so their loads pipeline with the
blocks before them, as in the forward. The tile math both orientations share (P from the raw
scores and the mask) is :func:`_attn_bwd_p_tile`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import dot_operand, register_helper, register_kernel, round_to
from vitkern.ops.attention.tiles import (
    _attn_cols,
    _attn_key_range,
    _attn_load,
    _attn_load_tile,
    _attn_program,
    _attn_seq_program,
    _attn_stat_layout,
    _attn_store,
    _attn_store_tile,
    _attn_zeros,
    _wgmma_rule,
)
from vitkern.ops.attention.prologue import _attn_prologue_grad

#: How the dK/dV step forms dQ (the DQ_MODE constexpr): not at all (the separate dQ kernel runs),
#: fp32 atomics into a zeroed buffer, or the fused kernel's per-program scratch.
DQ_NONE, DQ_ATOMIC, DQ_SCRATCH = 0, 1, 2


@register_kernel
@triton.jit
def _attention_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O), fp32 (B, H, Tq)."""
    pid_bh, b, h, start_m = _attn_program(Tq, H, BLOCK_M, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _attn_load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                   offs_m, Tq, offs_d, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    do = _attn_load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    offs_m, Tq, offs_d, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * Tq + offs_m, delta, mask=offs_m < Tq)


@register_helper
@triton.jit
def _attn_bwd_p(qk, lse, bias, bias2, sm_scale, qk_scale, USE_BIAS: tl.constexpr, FP32: tl.constexpr):
    """P = exp(sm_scale * qk (+ bias) - lse) from the raw scores; ``lse`` / ``bias`` broadcast
    against ``qk`` (``bias2`` = bias * log2(e), computed once per key block or tile).

    16-bit inputs: ``exp2(qk * c - lse * log2(e))``, one FMA per element (c = qk_scale =
    sm_scale * log2(e); ``lse * log2(e)`` is per row), the tutorial's form: its rounding scales
    with |s| + |lse|, far below the 8 / 11 bits P is rounded to for the next dots. fp32 inputs
    keep ``exp2((s - lse) * log2(e))``, whose rounding scales with s - lse, small where P
    matters (the FMA form missed the flash rule for dV at fp32, D = 64, Tq = 50, Tk = 257)."""
    if FP32:
        if USE_BIAS:
            p = tl.math.exp2((qk * sm_scale + bias - lse) * 1.4426950408889634)
        else:
            p = tl.math.exp2((qk * sm_scale - lse) * 1.4426950408889634)
    else:
        lse2 = lse * 1.4426950408889634
        if USE_BIAS:
            p = tl.math.exp2(qk * qk_scale + (bias2 - lse2))
        else:
            p = tl.math.exp2(qk * qk_scale - lse2)
    return p


@register_helper
@triton.jit
def _attn_bwd_p_tile(qk, lse, bias, bias2, q_idx, k_idx, masked, Tq, Tk, sm_scale, qk_scale,
                     CAUSAL: tl.constexpr, QUERY_TAIL: tl.constexpr, USE_BIAS: tl.constexpr, FP32: tl.constexpr):
    """P of one tile (fp32) from its raw scores, in either orientation: ``lse`` (per query),
    ``bias`` / ``bias2`` (per key, see :func:`_attn_bwd_p`) and the query / key indices ``q_idx``
    / ``k_idx`` come broadcastable against the tile (``[None, :]`` / ``[:, None]`` for the
    transposed S^T of the dK/dV step). ``masked`` (a runtime flag: the causal diagonal or the
    tail) zeroes P past the tail (queries >= Tq where QUERY_TAIL, the dK/dV step's, else keys
    >= Tk, the dQ kernel's; the other side's tail is never stored or carries a -inf bias) and,
    causal, where key > query."""
    p = _attn_bwd_p(qk, lse, bias, bias2, sm_scale, qk_scale, USE_BIAS, FP32)
    if masked:
        if QUERY_TAIL:
            valid = q_idx < Tq
        else:
            valid = k_idx < Tk
        if CAUSAL:
            valid = valid & (k_idx <= q_idx)
        p = tl.where(valid, p, 0.0)
    return p


@register_helper
@triton.jit
def _attn_bwd_dq_piece(dq, scratch_ptrs, out_ptrs, offs_m, Tq, offs_c, sm_scale, accumulate, last,
                       HEAD_DIM: tl.constexpr, MASK_C: tl.constexpr):
    """The fused kernel's dQ of one query block and head-dim piece: this key block's ``dq`` (fp32,
    unscaled) plus the earlier key blocks' sum in the scratch where ``accumulate`` (not the first key block), stored
    back to the scratch, or for the ``last`` key block the query block sees, times the scale
    into dQ in its dtype. The scratch rows are padded to whole query blocks: no masks."""
    if accumulate:
        dq += tl.load(scratch_ptrs)
    if last:
        _attn_store(out_ptrs, dq * sm_scale, offs_m, Tq, offs_c, HEAD_DIM, MASK_C)
    else:
        tl.store(scratch_ptrs, dq)


@register_helper
@triton.jit
def _attn_bwd_store_dx(DX, stride_dxt, dx_a, dx_b, offs_t, n_t, offs_da, offs_db, h, pid_bh, t_rot,
                       XRAW, stride_xt, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
                       DW_PART, DB_PART, DSIN_PART, DCOS_PART,
                       ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                       NORM: tl.constexpr, ROPE: tl.constexpr):
    """Store the kept tile's gradient (fp32 pieces, scaled) into ``DX`` (the slice of its (batch,
    head)), through the prologue's inverse first when NORM / ROPE ask for one
    (:func:`~vitkern.ops.attention.prologue._attn_prologue_grad`; ``XRAW`` the raw slice, the
    norm's partial row this program's, the tables' rows those of slice ``pid_bh`` of ``t_rot``
    rotated tokens)."""
    if NORM != 0 or ROPE != 0:
        dx_a, dx_b = _attn_prologue_grad(
            dx_a, dx_b, XRAW, stride_xt, offs_t, n_t, offs_da, offs_db, NW, NB, SIN, COS, stride_rh, stride_rt, h,
            PREFIX, norm_eps, DW_PART, DB_PART, tl.program_id(0) * (BLOCK_DA + BLOCK_DB), DSIN_PART, DCOS_PART,
            pid_bh * t_rot * HEAD_DIM, ROWS, HEAD_DIM, BLOCK_DA, BLOCK_DB, NORM, ROPE)
    _attn_store_tile(DX, stride_dxt, dx_a, dx_b, offs_t, n_t, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)


@register_helper
@triton.jit
def _attn_bwd_key_block(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ, SCRATCH,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    bq, bk, hk, start_n, stat_b, stat_h, GROUP, Tq, Tk, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DQ_MODE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV (fp32, dK unscaled) of the key block at ``start_n`` of kv head ``hk``, summed over
    the query heads of its group (queries, dO, dQ at query base ``bq``, keys, values, bias at key
    base ``bk``, lse / delta of head h at ``stat_b + h * stat_h``: :func:`_attn_seq_program`,
    :func:`_attn_stat_layout`), in the transposed orientation (S^T = K Q^T); and dQ's share
    per DQ_MODE: none, fp32 atomics into ``DQ`` (times the scale), or the fused kernel's
    ``SCRATCH`` ((GROUP, query blocks x BLOCK_M, BLOCK_DA + BLOCK_DB) fp32, this program's),
    with dQ itself written at each query block's last key block (:func:`_attn_bwd_dq_piece`).

    One loop over the query blocks the key block reaches, ``[m_lo, tq_ceil)``; the causal
    diagonal ``[m_lo, m_diag)`` and the Tq tail ``[m_full, tq_ceil)`` apply the mask behind a
    runtime test. Mask-free loads as in the forward: rows past Tq repeat row Tq - 1 (their P is
    masked to 0), columns past the head dim repeat the last one (k's and v's tails are zero;
    the tails of dK and dV are never stored)."""
    in_dtype = Q.dtype.element_ty
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_da, offs_db, cols_a, cols_b = _attn_cols(HEAD_DIM, BLOCK_DA, BLOCK_DB)
    k_a, k_b = _attn_load_tile(K + bk * stride_kb + hk * stride_kh, stride_kt, offs_n, Tk, offs_da, offs_db,
                               HEAD_DIM, BLOCK_DA, BLOCK_DB)
    v_a, v_b = _attn_load_tile(V + bk * stride_vb + hk * stride_vh, stride_vt, offs_n, Tk, offs_da, offs_db,
                               HEAD_DIM, BLOCK_DA, BLOCK_DB)
    dk_a, dk_b = _attn_zeros(BLOCK_N, BLOCK_DA, BLOCK_DB)
    dv_a, dv_b = _attn_zeros(BLOCK_N, BLOCK_DA, BLOCK_DB)

    tq_ceil = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        m_lo = start_n // BLOCK_M * BLOCK_M
        m_diag = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, tq_ceil)
    else:
        m_lo = 0
        m_diag = 0
    m_full = tl.maximum(Tq // BLOCK_M * BLOCK_M, m_diag)
    qk_scale = sm_scale * 1.4426950408889634
    if HAS_BIAS:
        bias_n = tl.zeros([BLOCK_N], dtype=tl.float32)  # loaded per query head below
    elif DQ_MODE != 0:
        bias_n = tl.where(offs_n < Tk, 0.0, float("-inf"))  # keys past Tk must not reach dQ
    else:
        bias_n = tl.zeros([BLOCK_N], dtype=tl.float32)  # rows of keys past Tk are never stored

    for g in range(0, GROUP):
        h = hk * GROUP + g
        if HAS_BIAS:
            bias_n = tl.load(BIAS + bk * stride_bb + h * stride_bh + offs_n * stride_bt, mask=offs_n < Tk,
                             other=float("-inf"))
        bias2_n = bias_n * 1.4426950408889634
        q_base = Q + bq * stride_qb + h * stride_qh
        do_base = DO + bq * stride_dob + h * stride_doh
        dq_base = DQ + bq * stride_dqb + h * stride_dqh
        scratch_base = SCRATCH + g * tq_ceil * (BLOCK_DA + BLOCK_DB)
        lse_base = LSE + stat_b + h * stat_h
        delta_base = DELTA + stat_b + h * stat_h
        for start_m in range(m_lo, tq_ceil, BLOCK_M):
            offs_m = start_m + offs_m0
            rows = tl.minimum(offs_m, Tq - 1)
            q_a = dot_operand(tl.load(q_base + rows[:, None] * stride_qt + cols_a[None, :]))
            do_a = dot_operand(tl.load(do_base + rows[:, None] * stride_dot + cols_a[None, :]))
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
            if HAS_BIAS:
                lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: p = 0
            qkT = tl.dot(k_a, tl.trans(q_a), input_precision=PRECISION)
            if BLOCK_DB > 0:
                q_b = dot_operand(tl.load(q_base + rows[:, None] * stride_qt + cols_b[None, :]))
                do_b = dot_operand(tl.load(do_base + rows[:, None] * stride_dot + cols_b[None, :]))
                qkT = tl.dot(k_b, tl.trans(q_b), qkT, input_precision=PRECISION)
            masked = (start_m < m_diag) | (start_m >= m_full)
            pT = _attn_bwd_p_tile(qkT, lse[None, :], bias_n[:, None], bias2_n[:, None], offs_m[None, :],
                                  offs_n[:, None], masked, Tq, Tk, sm_scale, qk_scale, CAUSAL, True,
                                  HAS_BIAS or DQ_MODE != 0, in_dtype == tl.float32)
            # dV's dots before dP^T's: the fp32 dP^T tile is not live across them
            pT_in = dot_operand(round_to(pT, in_dtype))
            dv_a = tl.dot(pT_in, do_a, dv_a, input_precision=PRECISION)
            dpT = tl.dot(v_a, tl.trans(do_a), input_precision=PRECISION)
            if BLOCK_DB > 0:
                dv_b = tl.dot(pT_in, do_b, dv_b, input_precision=PRECISION)
                dpT = tl.dot(v_b, tl.trans(do_b), dpT, input_precision=PRECISION)
            dsT_in = dot_operand(round_to(pT * (dpT - delta[None, :]), in_dtype))
            dk_a = tl.dot(dsT_in, q_a, dk_a, input_precision=PRECISION)
            if BLOCK_DB > 0:
                dk_b = tl.dot(dsT_in, q_b, dk_b, input_precision=PRECISION)
            if DQ_MODE == 1:
                ds = tl.trans(dsT_in)
                dq_a = tl.dot(ds, k_a, input_precision=PRECISION) * sm_scale
                tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_da[None, :], dq_a,
                              mask=(offs_m[:, None] < Tq) & (offs_da[None, :] < HEAD_DIM), sem="relaxed")
                if BLOCK_DB > 0:
                    dq_b = tl.dot(ds, k_b, input_precision=PRECISION) * sm_scale
                    tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_db[None, :], dq_b,
                                  mask=(offs_m[:, None] < Tq) & (offs_db[None, :] < HEAD_DIM), sem="relaxed")
            elif DQ_MODE == 2:
                ds = tl.trans(dsT_in)
                # the last key block this query block sees (the causal diagonal's, or Tk's last)
                if CAUSAL:
                    n_last = (tl.minimum(start_m + BLOCK_M, Tk) - 1) // BLOCK_N * BLOCK_N
                else:
                    n_last = (Tk - 1) // BLOCK_N * BLOCK_N
                scratch_rows = scratch_base + offs_m[:, None] * (BLOCK_DA + BLOCK_DB)
                _attn_bwd_dq_piece(tl.dot(ds, k_a, input_precision=PRECISION), scratch_rows + offs_da[None, :],
                                   dq_base + offs_m[:, None] * stride_dqt + offs_da[None, :], offs_m, Tq, offs_da,
                                   sm_scale, start_n > 0, start_n == n_last, HEAD_DIM, BLOCK_DA > HEAD_DIM)
                if BLOCK_DB > 0:
                    _attn_bwd_dq_piece(tl.dot(ds, k_b, input_precision=PRECISION), scratch_rows + offs_db[None, :],
                                       dq_base + offs_m[:, None] * stride_dqt + offs_db[None, :], offs_m, Tq,
                                       offs_db, sm_scale, start_n > 0, start_n == n_last, HEAD_DIM,
                                       BLOCK_DA + BLOCK_DB > HEAD_DIM)
    if DQ_MODE == 2:
        # the next key block reads back what this one stored (another thread's elements)
        tl.debug_barrier()
    return dk_a, dk_b, dv_a, dv_b


@register_kernel(expects_wgmma=_wgmma_rule("K", "BLOCK_N"))
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_dqb, stride_dqh, stride_dqt,
    H, HKV, GROUP, Tq, Tk, sm_scale,
    CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS,
    XRAW, stride_xb, stride_xh, stride_xt, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
    DW_PART, DB_PART, DSIN_PART, DCOS_PART,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DQ_MODE: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the query heads of its group. With
    DQ_MODE 1 (atomic) it also adds this block's share of dQ (times the scale) into the fp32 buffer DQ.
    VARLEN: a key block of one packed sequence (see :func:`_attn_seq_program`). NORM / ROPE
    (dense batches): K is the prologue's output k', and dK goes through the prologue's inverse on
    the raw keys ``XRAW`` (:func:`_attn_bwd_store_dx`)."""
    bk, bq, hk, start_n, tk, tq = _attn_seq_program(CU_K, CU_Q, NUM_SEQS, SEQ_BLOCKS, Tk, Tq, HKV, BLOCK_N, False,
                                                    VARLEN)
    stat_b, stat_h = _attn_stat_layout(bq, H, Tq, VARLEN)
    Tq, Tk = tq, tk
    if start_n >= Tk:
        return
    dk_a, dk_b, dv_a, dv_b = _attn_bwd_key_block(
        Q, K, V, BIAS, DO, LSE, DELTA, DQ, DQ,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_bb, stride_bh, stride_bt, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
        bq, bk, hk, start_n, stat_b, stat_h, GROUP, Tq, Tk, sm_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DA, BLOCK_DB, CAUSAL, HAS_BIAS, DQ_MODE, PRECISION)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_da, offs_db, _, _ = _attn_cols(HEAD_DIM, BLOCK_DA, BLOCK_DB)
    _attn_store_tile(DV + bk * stride_dvb + hk * stride_dvh, stride_dvt, dv_a, dv_b,
                     offs_n, Tk, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    _attn_bwd_store_dx(DK + bk * stride_dkb + hk * stride_dkh, stride_dkt, dk_a * sm_scale, dk_b * sm_scale,
                       offs_n, Tk, offs_da, offs_db, hk, bk * HKV + hk, Tk - PREFIX,
                       XRAW + bk * stride_xb + hk * stride_xh, stride_xt, NW, NB, SIN, COS, stride_rh, stride_rt,
                       PREFIX, norm_eps, DW_PART, DB_PART, DSIN_PART, DCOS_PART,
                       BLOCK_N, HEAD_DIM, BLOCK_DA, BLOCK_DB, NORM, ROPE)


@register_kernel(expects_wgmma=_wgmma_rule("K", "BLOCK_N"))
@triton.jit
def _attention_bwd_fused_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, DQ, SCRATCH,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_dqb, stride_dqh, stride_dqt,
    H, HKV, GROUP, Tq, Tk, sm_scale, PAIRS, stride_scratch,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ, dK and dV in one kernel, deterministic and without atomics (short sequences): a
    persistent grid over the (batch, kv head) pairs; each program walks its pair's key blocks
    in order, writes dK / dV per key block from registers and sums dQ of every query row of the
    group in its own fp32 scratch (``SCRATCH + program * stride_scratch``, L2-resident at ViT
    lengths), writing dQ in its dtype at each query block's last key block."""
    pid = tl.program_id(0)
    scratch = SCRATCH + pid.to(tl.int64) * stride_scratch
    offs_da, offs_db, _, _ = _attn_cols(HEAD_DIM, BLOCK_DA, BLOCK_DB)
    for pair in range(pid, PAIRS, tl.num_programs(0)):
        b = (pair // HKV).to(tl.int64)
        hk = (pair % HKV).to(tl.int64)
        stat_b, stat_h = _attn_stat_layout(b, H, Tq, 0)
        for start_n in range(0, Tk, BLOCK_N):
            dk_a, dk_b, dv_a, dv_b = _attn_bwd_key_block(
                Q, K, V, BIAS, DO, LSE, DELTA, DQ, scratch,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                stride_bb, stride_bh, stride_bt, stride_dob, stride_doh, stride_dot,
                stride_dqb, stride_dqh, stride_dqt,
                b, b, hk, start_n, stat_b, stat_h, GROUP, Tq, Tk, sm_scale,
                HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DA, BLOCK_DB, CAUSAL, HAS_BIAS, 2, PRECISION)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            _attn_store_tile(DK + b * stride_dkb + hk * stride_dkh, stride_dkt, dk_a * sm_scale, dk_b * sm_scale,
                             offs_n, Tk, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
            _attn_store_tile(DV + b * stride_dvb + hk * stride_dvh, stride_dvt, dv_a, dv_b,
                             offs_n, Tk, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)


@register_helper
@triton.jit
def _attn_bwd_dq_inner(
    dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta,
    k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt,
    offs_m, cols_a, cols_b, n_full, n_end, Tq, Tk, sm_scale, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Key blocks [0, n_end) for one query block's dQ in one loop, the blocks from ``n_full`` on
    (the causal diagonal, the Tk tail) masked behind a runtime test (mask-free loads as in the
    forward); P by :func:`_attn_bwd_p_tile`, qk_scale = sm_scale * log2(e)."""
    in_dtype = k_base.dtype.element_ty
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        rows = tl.minimum(offs_n, Tk - 1)
        k_a = dot_operand(tl.load(k_base + rows[:, None] * stride_kt + cols_a[None, :]))
        v_a = dot_operand(tl.load(v_base + rows[:, None] * stride_vt + cols_a[None, :]))
        qk = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=PRECISION)
        if BLOCK_DB > 0:
            k_b = dot_operand(tl.load(k_base + rows[:, None] * stride_kt + cols_b[None, :]))
            v_b = dot_operand(tl.load(v_base + rows[:, None] * stride_vt + cols_b[None, :]))
            qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=PRECISION)
            dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_base + rows * stride_bt)[None, :]
            bias2 = bias * 1.4426950408889634
        else:
            bias = 0.0
            bias2 = 0.0
        p = _attn_bwd_p_tile(qk, lse[:, None], bias, bias2, offs_m[:, None], offs_n[None, :], start_n >= n_full,
                             Tq, Tk, sm_scale, qk_scale, CAUSAL, False, HAS_BIAS, in_dtype == tl.float32)
        ds = dot_operand(round_to(p * (dp - delta[:, None]), in_dtype))
        dq_a = tl.dot(ds, k_a, dq_a, input_precision=PRECISION)
        if BLOCK_DB > 0:
            dq_b = tl.dot(ds, k_b, dq_b, input_precision=PRECISION)
    return dq_a, dq_b


@register_kernel(expects_wgmma=_wgmma_rule("Q", "BLOCK_M"))
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, GROUP, Tq, Tk, sm_scale,
    CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS,
    XRAW, stride_xb, stride_xh, stride_xt, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
    DW_PART, DB_PART, DSIN_PART, DCOS_PART,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    NORM: tl.constexpr, ROPE: tl.constexpr,
):
    """dQ of one query block of one head (VARLEN: of one packed sequence), without atomics
    (bit-reproducible). NORM / ROPE (dense batches): Q and K are the prologue's outputs q' / k',
    and dQ goes through the prologue's inverse on the raw queries ``XRAW``
    (:func:`_attn_bwd_store_dx`)."""
    bq, bk, h, start_m, tq, tk = _attn_seq_program(CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS, Tq, Tk, H, BLOCK_M, CAUSAL,
                                                   VARLEN)
    stat_b, stat_h = _attn_stat_layout(bq, H, Tq, VARLEN)
    Tq, Tk = tq, tk
    if start_m >= Tq:
        return
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_da, offs_db, cols_a, cols_b = _attn_cols(HEAD_DIM, BLOCK_DA, BLOCK_DB)

    q_a, q_b = _attn_load_tile(Q + bq * stride_qb + h * stride_qh, stride_qt, offs_m, Tq, offs_da, offs_db,
                               HEAD_DIM, BLOCK_DA, BLOCK_DB)
    do_a, do_b = _attn_load_tile(DO + bq * stride_dob + h * stride_doh, stride_dot, offs_m, Tq, offs_da, offs_db,
                                 HEAD_DIM, BLOCK_DA, BLOCK_DB)
    dq_a, dq_b = _attn_zeros(BLOCK_M, BLOCK_DA, BLOCK_DB)
    lse = tl.load(LSE + stat_b + h * stat_h + offs_m, mask=offs_m < Tq, other=0.0)
    if HAS_BIAS:
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: p = 0
    qk_scale = sm_scale * 1.4426950408889634
    delta = tl.load(DELTA + stat_b + h * stat_h + offs_m, mask=offs_m < Tq, other=0.0)

    n_full, n_end = _attn_key_range(start_m, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    dq_a, dq_b = _attn_bwd_dq_inner(
        dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, K + bk * stride_kb + hk * stride_kh,
        V + bk * stride_vb + hk * stride_vh, BIAS + bk * stride_bb + h * stride_bh, stride_kt, stride_vt, stride_bt,
        offs_m, cols_a, cols_b, n_full, n_end, Tq, Tk, sm_scale, qk_scale,
        BLOCK_N, BLOCK_DB, CAUSAL, HAS_BIAS, PRECISION)

    _attn_bwd_store_dx(DQ + bq * stride_dqb + h * stride_dqh, stride_dqt, dq_a * sm_scale, dq_b * sm_scale,
                       offs_m, Tq, offs_da, offs_db, h, bq * H + h, Tq - PREFIX,
                       XRAW + bq * stride_xb + h * stride_xh, stride_xt, NW, NB, SIN, COS, stride_rh, stride_rt,
                       PREFIX, norm_eps, DW_PART, DB_PART, DSIN_PART, DCOS_PART,
                       BLOCK_M, HEAD_DIM, BLOCK_DA, BLOCK_DB, NORM, ROPE)
