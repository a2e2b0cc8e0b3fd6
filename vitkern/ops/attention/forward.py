"""The attention forward kernels (flash attention): ``out`` and the row logsumexp; for grids that
leave SMs idle, the split-KV pair (a kernel per query block and key split into fp32 partials,
and their merge through the partial lses).

One program per (query block, batch * head): online softmax over key blocks in fp32 in log2 units
(the row max taken on the raw scores, ``p = exp2(qk * c - m)`` one FMA per element with
c = scale * log2(e)), the row logsumexp (natural log) saved for the backward. One loop runs every
key block; the blocks on the causal diagonal and the Tk tail apply the score mask behind a
runtime test, so their K / V loads pipeline with the blocks before them. Grouped-query
attention maps query head h to kv head h // (H // Hkv). q / k / v / out are read and written
through their strides (last dim unit stride), so the packed (B, T, 3, H, D) qkv is read in place
and (B, T, H, D) written directly. VARLEN runs the same kernel over packed variable-length
sequences (one program per query block of a sequence: :func:`_attn_seq_program`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import dot_operand, register_helper, register_kernel, round_to
from vitkern.ops.attention.tiles import (
    _attn_cols,
    _attn_desc_load,
    _attn_desc_store,
    _attn_descs,
    _attn_key_range,
    _attn_load_tile,
    _attn_program,
    _attn_seq_program,
    _attn_stat_layout,
    _attn_store_tile,
    _attn_zeros,
    _wgmma_rule,
)
from vitkern.ops.attention.prologue import _attn_prologue_tile


@register_helper
@triton.jit
def _attn_fwd_inner(
    acc_a, acc_b, l_i, m_i, q_a, q_b,
    k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt, k_desc_a, k_desc_b, v_desc_a, v_desc_b,
    offs_m, cols_a, cols_b, lo, n_full, n_end, Tk, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, EMPTY_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Key blocks [lo, n_end) of the online softmax in one loop; the blocks from ``n_full`` on (the
    causal diagonal and the Tk tail) apply the score mask, a runtime test, so the pipeliner
    overlaps every block's K / V loads with the previous block's dots, the boundary included.

    Softmax in log2 units: ``m_i`` is the running row max of ``score * log2(e)``, taken on the raw
    scores and scaled once per row, and ``p = exp2(qk * qk_scale - m)`` is one FMA per element
    (qk_scale = scale * log2(e) > 0, see the launcher). With a key-padding bias the scaled score
    ``qk * qk_scale + bias * log2(e)`` is formed first (one FMA) and ``p = exp2(s - m)``.
    EMPTY_ROWS: rows may see no key of the range (a key split past a causal row), handled as
    the bias path handles fully masked rows.

    Loads take no masks: ``cols_*`` repeat the last column past the head dim (q's tail is zero,
    so those products vanish, and the output's tail columns are never stored) and rows past Tk
    repeat row Tk - 1 (their scores are masked to -inf), which keeps the loop's registers for
    the dots. TMA: K / V come through the descriptor pairs ``k_desc_*`` / ``v_desc_*``
    (:func:`_attn_descs`, zero past Tk and the head dim) and the pointers only give the dtype."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        rows = tl.minimum(offs_n, Tk - 1)
        if TMA:
            k_a, k_b = _attn_desc_load(k_desc_a, k_desc_b, start_n, BLOCK_DA, BLOCK_DB)
        else:
            k_a = tl.load(k_base + rows[:, None] * stride_kt + cols_a[None, :])
        qk = tl.dot(q_a, tl.trans(dot_operand(k_a)), input_precision=PRECISION)
        if BLOCK_DB > 0:
            if not TMA:
                k_b = tl.load(k_base + rows[:, None] * stride_kt + cols_b[None, :])
            qk = tl.dot(q_b, tl.trans(dot_operand(k_b)), qk, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_base + rows * stride_bt) * 1.4426950408889634
            qk = qk * qk_scale + bias[None, :]
        if start_n >= n_full:
            valid = offs_n[None, :] < Tk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        if HAS_BIAS:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row whose keys so far are all masked keeps m = -inf; shift by 0 so p = alpha = 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if EMPTY_ROWS:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                # every row sees key 0 in the first block (causal is top-left aligned): m is finite
                m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = dot_operand(round_to(p, k_base.dtype.element_ty))
        if TMA:
            v_a, v_b = _attn_desc_load(v_desc_a, v_desc_b, start_n, BLOCK_DA, BLOCK_DB)
        else:
            v_a = tl.load(v_base + rows[:, None] * stride_vt + cols_a[None, :])
        acc_a = tl.dot(p, dot_operand(v_a), acc_a * alpha[:, None], input_precision=PRECISION)
        if BLOCK_DB > 0:
            if not TMA:
                v_b = tl.load(v_base + rows[:, None] * stride_vt + cols_b[None, :])
            acc_b = tl.dot(p, dot_operand(v_b), acc_b * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@register_helper
@triton.jit
def _attn_fwd_prologue(
    Q, K, V, BIAS, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_kt, stride_vt, stride_bb, stride_bh, bq, bk, h, start_m, GROUP, Tq, Tk,
    QROT, store_rot, HEADS, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr,
    NORM: tl.constexpr, ROPE: tl.constexpr,
):
    """What the plain and the split-KV forward set up alike for the query block at ``start_m`` of
    query batch ``bq`` / key batch ``bk`` (equal but for VARLEN, where both are 0 and the
    sequence's offsets are in ``start_m`` and the pointers) and head ``h``: the row and column
    offsets, the kv head's K / V and the bias row's bases (query head h reads kv head
    h // GROUP), the q tile (zero past Tq and the head dim), the accumulators and row statistics,
    and the key range (:func:`_attn_key_range`). TMA: the q tile through a descriptor, and the
    K / V descriptor pairs of the kv head's (Tk, HEAD_DIM) slices (:func:`_attn_descs`; without
    TMA the pairs are placeholders).

    NORM / ROPE (:mod:`~vitkern.ops.attention.prologue`): the q tile is loaded raw through
    pointers and normalised (weight ``NW`` / bias ``NB``, None when absent) and rotated (tables
    ``SIN`` / ``COS``) in fp32, then rounded to q's dtype; where ``QROT`` is given and
    ``store_rot`` holds it is stored there too (contiguous ``(B, H, Tq, HEAD_DIM)``, for the
    backward)."""
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_da, offs_db, cols_a, cols_b = _attn_cols(HEAD_DIM, BLOCK_DA, BLOCK_DB)
    k_base = K + bk * stride_kb + hk * stride_kh
    v_base = V + bk * stride_vb + hk * stride_vh
    bias_base = BIAS + bk * stride_bb + h * stride_bh
    q_base = Q + bq * stride_qb + h * stride_qh
    if NORM != 0 or ROPE != 0:
        y_a, y_b = _attn_prologue_tile(q_base, stride_qt, offs_m, Tq, offs_da, offs_db, NW, NB, SIN, COS,
                                       stride_rh, stride_rt, h, PREFIX, norm_eps, BLOCK_M, HEAD_DIM, BLOCK_DB, NORM,
                                       ROPE)
        if QROT is not None:
            if store_rot:
                _attn_store_tile(QROT + (bq * HEADS + h) * Tq * HEAD_DIM, HEAD_DIM, y_a, y_b,
                                 offs_m, Tq, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
        q_a = dot_operand(round_to(y_a, Q.dtype.element_ty))
        q_b = dot_operand(round_to(y_b, Q.dtype.element_ty))
    elif TMA:
        q_desc_a, q_desc_b = _attn_descs(q_base, Tq, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_DA, BLOCK_DB)
        q_a, q_b = _attn_desc_load(q_desc_a, q_desc_b, start_m, BLOCK_DA, BLOCK_DB)
    else:
        q_a, q_b = _attn_load_tile(q_base, stride_qt, offs_m, Tq, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    if TMA:
        k_desc_a, k_desc_b = _attn_descs(k_base, Tk, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_DA, BLOCK_DB)
        v_desc_a, v_desc_b = _attn_descs(v_base, Tk, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_DA, BLOCK_DB)
    else:
        k_desc_a, k_desc_b, v_desc_a, v_desc_b = k_base, k_base, v_base, v_base
    acc_a, acc_b = _attn_zeros(BLOCK_M, BLOCK_DA, BLOCK_DB)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full, n_end = _attn_key_range(start_m, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    return (offs_m, offs_da, offs_db, cols_a, cols_b, k_base, v_base, bias_base, k_desc_a, k_desc_b, v_desc_a,
            v_desc_b, q_a, q_b, acc_a, acc_b, l_i, m_i, n_full, n_end)


@register_kernel(expects_wgmma=_wgmma_rule("Q", "BLOCK_M"))
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, BIAS, OUT, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_ob, stride_oh, stride_ot,
    H, GROUP, Tq, Tk, qk_scale,
    CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS,
    QROT, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    TMA: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
):
    """out, lse for one query block of one (batch, head), or of one packed sequence and head
    (VARLEN, see :func:`_attn_seq_program`: Tq / Tk are then the totals, and a sequence without
    keys gives out 0, lse -inf). qk_scale = scale * log2(e), positive. TMA: q, k, v loaded and
    out stored through tensor descriptors of the program's own slices (sm_90). NORM / ROPE: the
    q prologue (dense batches; see :func:`_attn_fwd_prologue`), q' stored into ``QROT`` unless
    it is None."""
    bq, bk, h, start_m, tq, tk = _attn_seq_program(CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS, Tq, Tk, H, BLOCK_M, CAUSAL,
                                                   VARLEN)
    lse_b, lse_h = _attn_stat_layout(bq, H, Tq, VARLEN)
    Tq, Tk = tq, tk
    if start_m >= Tq:
        return
    (offs_m, offs_da, offs_db, cols_a, cols_b, k_base, v_base, bias_base, k_desc_a, k_desc_b, v_desc_a, v_desc_b,
     q_a, q_b, acc_a, acc_b, l_i, m_i, n_full, n_end) = _attn_fwd_prologue(
        Q, K, V, BIAS, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_kt, stride_vt, stride_bb, stride_bh, bq, bk, h, start_m, GROUP, Tq, Tk,
        QROT, True, H, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DA, BLOCK_DB, CAUSAL, TMA, NORM, ROPE)
    acc_a, acc_b, l_i, m_i = _attn_fwd_inner(
        acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt,
        k_desc_a, k_desc_b, v_desc_a, v_desc_b, offs_m, cols_a, cols_b, 0, n_full, n_end, Tk, qk_scale,
        BLOCK_N, BLOCK_DA, BLOCK_DB, CAUSAL, HAS_BIAS, False, PRECISION, TMA)

    if HAS_BIAS or VARLEN != 0:
        l_div = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows, sequences without keys: out 0, lse -inf
    else:
        l_div = l_i
    inv_l = 1.0 / l_div
    out_base = OUT + bq * stride_ob + h * stride_oh
    if TMA:
        out_desc_a, out_desc_b = _attn_descs(out_base, Tq, stride_ot, HEAD_DIM, BLOCK_M, BLOCK_DA, BLOCK_DB)
        _attn_desc_store(out_desc_a, out_desc_b, start_m, acc_a * inv_l[:, None], acc_b * inv_l[:, None],
                         BLOCK_DA, BLOCK_DB)
    else:
        _attn_store_tile(out_base, stride_ot, acc_a * inv_l[:, None], acc_b * inv_l[:, None],
                         offs_m, Tq, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + lse_b + h * lse_h + offs_m, lse, mask=offs_m < Tq)


@register_kernel(expects_wgmma=_wgmma_rule("Q", "BLOCK_M"))
@triton.jit
def _attention_fwd_split_kernel(
    Q, K, V, BIAS, OUT_PART, LSE_PART,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_ps, stride_ls,
    H, GROUP, Tq, Tk, qk_scale, BLOCKS_PER_SPLIT,
    CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS,
    QROT, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    TMA: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
):
    """Split-KV forward: one query block of one (batch, head), or of one packed sequence and head
    (VARLEN, as the plain kernel), against key split ``program_id(1)`` (``BLOCKS_PER_SPLIT`` key
    blocks of its own keys). Writes the split's normalised fp32 output to ``OUT_PART[split]``,
    rows laid out as the lse's (``(B * H, Tq)``, or ``(H, total)`` packed) times HEAD_DIM, and its
    natural-log lse to ``LSE_PART[split]`` alike; a split no key of which a row sees (past a causal
    row, past a short sequence's keys) gives out 0, lse -inf. TMA: q, k, v through descriptors,
    as the plain kernel. NORM / ROPE: the q prologue, as the plain kernel's (every split applies
    it; the first stores q' into ``QROT`` unless it is None)."""
    bq, bk, h, start_m, tq, tk = _attn_seq_program(CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS, Tq, Tk, H, BLOCK_M, CAUSAL,
                                                   VARLEN)
    lse_b, lse_h = _attn_stat_layout(bq, H, Tq, VARLEN)
    Tq, Tk = tq, tk
    if start_m >= Tq:
        return
    (offs_m, offs_da, offs_db, cols_a, cols_b, k_base, v_base, bias_base, k_desc_a, k_desc_b, v_desc_a, v_desc_b,
     q_a, q_b, acc_a, acc_b, l_i, m_i, n_full, n_end) = _attn_fwd_prologue(
        Q, K, V, BIAS, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_kt, stride_vt, stride_bb, stride_bh, bq, bk, h, start_m, GROUP, Tq, Tk,
        QROT, tl.program_id(1) == 0, H, NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DA, BLOCK_DB, CAUSAL, TMA, NORM, ROPE)
    split = tl.program_id(1).to(tl.int64)
    lo = tl.program_id(1) * BLOCKS_PER_SPLIT * BLOCK_N
    hi = tl.minimum(lo + BLOCKS_PER_SPLIT * BLOCK_N, n_end)
    acc_a, acc_b, l_i, m_i = _attn_fwd_inner(
        acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt,
        k_desc_a, k_desc_b, v_desc_a, v_desc_b, offs_m, cols_a, cols_b, lo, n_full, hi, Tk, qk_scale,
        BLOCK_N, BLOCK_DA, BLOCK_DB, CAUSAL, HAS_BIAS, True, PRECISION, TMA)

    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    row0 = lse_b + h * lse_h
    _attn_store_tile(OUT_PART + split * stride_ps + row0 * HEAD_DIM, HEAD_DIM,
                     acc_a * inv_l[:, None], acc_b * inv_l[:, None],
                     offs_m, Tq, offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE_PART + split * stride_ls + row0 + offs_m, lse, mask=offs_m < Tq)


@register_kernel
@triton.jit
def _attention_fwd_merge_kernel(
    OUT_PART, LSE_PART, OUT, LSE,
    stride_ps, stride_ls,
    stride_ob, stride_oh, stride_ot,
    H, Tq, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The split-KV forward's merge: ``lse = log(sum_s exp(lse_s))`` and ``out = sum_s
    exp(lse_s - lse) * out_s`` per row, in fp32; rows no split saw give out 0, lse -inf. A packed
    launch merges as one batch of ``Tq`` = total rows (its partials' and lse's ``(H, total)``
    layout)."""
    pid_bh, b, h, start_m = _attn_program(Tq, H, BLOCK_M, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < Tq
    lse_base = LSE_PART + pid_bh * Tq
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(lse_base + s * stride_ls + offs_m, mask=row_mask, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    part_ptrs = OUT_PART + pid_bh * Tq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tile_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    for s in range(0, SPLITS):
        lse_s = tl.load(lse_base + s * stride_ls + offs_m, mask=row_mask, other=float("-inf"))
        w = tl.math.exp2((lse_s - m_use) * 1.4426950408889634)
        o_s = tl.load(part_ptrs, mask=tile_mask, other=0.0)
        part_ptrs += stride_ps
        acc += w[:, None] * o_s
        den += w
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    out_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(out_ptrs, round_to(out, OUT.dtype.element_ty), mask=tile_mask)
    tl.store(LSE + pid_bh * Tq + offs_m, m_use + tl.log(den), mask=row_mask)
