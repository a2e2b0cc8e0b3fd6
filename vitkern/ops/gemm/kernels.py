"""The GEMM core's kernels: the tiled GEMM with its composable epilogue, and the elementwise
activation backward.

The GEMM (:func:`_gemm_kernel`)::

    C[M, N] = epilogue( A'[M, K] @ B[N, K]^T )          fp32 accumulation

``A`` and ``B`` come as pointers plus strides, so every operand of the forward and backward GEMMs
is a view (``W.t()``, ``dY.t()``, ``x.t()``) and nothing is copied. ``A'`` is the A tile after an
optional scale along the reduction axis (``red_scale[k]``: drop path's row scale in the dW GEMM)
and a cast to B's dtype (a float32 gradient against bf16 weights). The epilogue runs in fp32 on the
accumulator: the steps of :mod:`vitkern.ops.gemm.epilogue`, each behind its constexpr switch
(bias, pre-activation store, row dots, activation, LayerScale, row scale, activation grad,
residual), then one cast to C's dtype, in ``EPI_SPLIT`` column slices of the tile one after the
other (:func:`_epilogue`: the accumulator halved by a register split, each slice's steps, staging
and store ``BLOCK_N / EPI_SPLIT`` columns wide: what lets a 128 x 256 tile carry the GELU and
fp32-residual epilogues without spilling or passing the shared-memory limit). Besides, ``ROW_SUM``
stores ``rowsum[s, m] = sum_k A'[m, k]`` (the bias grad; with ``ROW_SUM_WEIGHTED`` ``sum_k A'[m, k]
* w[k]``, the bias term of drop path's row-scale grad) from the pid_n == 0 tiles, and ``A_COPY``
stores A' itself, in B's dtype, from the same tiles (``acopy[m, k]``): a float32 gradient read
once, written once in the 16-bit compute dtype for the backward's next GEMM on it.

Loads: TMA tensor descriptors (``A_MODE`` / ``B_MODE`` 1: rows contiguous along K; 2: the operand
is stored transposed) where the launcher found a unit inner stride and 16-byte-aligned base and
strides (sm_90 configs only), else plain pointer loads: mode 0 with row indices clamped into range
(no row masks, fewer registers: what keeps the sm_80 configs free of spills), mode 3 with row
masks for operands contiguous along M / N (``dY^T``, ``x^T`` in the dW GEMMs), whose vectorised
loads clamping would break. Rows of 588 or 21843 bf16 elements are not 16-byte aligned and take
the plain path. The output and the residual go through descriptors too where aligned (``C_MODE``
/ ``R_MODE``): that keeps the sm_90 fc2 epilogue at ~125 registers instead of ~240.

Program order: tiles are numbered in GROUP_M-row groups (L2 reuse of B); a persistent config
launches ``num_sms`` programs that stride over the tiles (``FLATTEN`` lets Triton pipeline the
next tile's loads under the current epilogue). Split-K (grid axis 1, ``k_tiles_per_split``) writes
fp32 partial products for the backward dW GEMMs, whose outputs (weights) are small and whose
reduction (tokens) is long; the launcher sums the partials.

Hooks for other ops (patch embedding): ``A_GATHER`` replaces the A load by a ``@triton.jit``
function ``(a_ptr, offs_m, offs_k, M, K, a_args) -> [BLOCK_M, BLOCK_K] tile`` (zero outside
``M`` / ``K``; ``a_args`` is a tuple the op defines: an implicit-im2col gather of image pixels);
``ROW_MAP`` maps output rows, ``(offs_m, c_args) -> (c_rows, res_rows)``, for the C store and the
residual load (tokens written after the prefix tokens, pos_embed added as a residual indexed by
patch); with it ``COL_MAP``, ``(offs_n, c_args) -> c_cols``, maps output columns (the image
gradient scattered to pixels). ``PROLOGUE``, ``(pid, num_progs, c_ptr, stride_cm, stride_cn,
c_args, BLOCK_M, BLOCK_N)``, runs once per program before its tiles (the prefix tokens written by
the GEMM's own programs). All default to None (plain A, identity rows and columns, no prologue).

Under the interpreter, bf16 dot operands are upcast (``dot_operand``), stores round to nearest
even (``round_to``), and transposed tiles are copied row-major before the dot (numpy's matmul is
~500x slower on Fortran-ordered operands).
"""

import triton
import triton.language as tl

from vitkern.ops._config import INTERPRETING
from vitkern.ops._triton import dot_operand, register_helper, register_kernel, round_to, wgmma_expected
from vitkern.ops.gemm.epilogue_steps import (
    activation,
    activation_grad,
    add_bias,
    add_residual,
    mul_activation_grad,
    row_dot,
    scale_cols,
    scale_rows,
    store_aux,
    swiglu,
    swiglu_grad_store,
)

# The interpreter switch as a constexpr global (the compiler folds branches on it away).
_INTERPRET = tl.constexpr(INTERPRETING)


@register_helper
@triton.jit
def _interp_contiguous(x, R: tl.constexpr, C: tl.constexpr):
    """Under the interpreter, a row-major copy of a transposed tile: numpy's matmul falls off BLAS
    for Fortran-ordered operands (~500x slower). Compiled code: ``x`` unchanged."""
    if _INTERPRET:
        return tl.reshape(tl.reshape(x, [R * C]), [R, C])
    else:
        return x


@register_helper
@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order: GROUP_M row tiles sweep the column tiles together."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@register_helper
@triton.jit
def _epilogue(
    acc, off_m, off_n, part_n, offs_m, lm, r64, c_rows, r_rows,
    c_ptr, c_desc, r_desc, bias_ptr, col_scale_ptr, row_scale_ptr, res_ptr, pre_ptr, aux_ptr, dotw_ptr, dotpart_ptr,
    M, N, stride_cm, stride_cn, stride_rm, stride_rn, stride_pm, stride_pn, stride_xm, stride_xn, stride_wm, stride_wn,
    c_args,
    SLICE_N: tl.constexpr, SPLIT: tl.constexpr, C_MODE: tl.constexpr, R_MODE: tl.constexpr,
    ROW_MAP: tl.constexpr, COL_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr,
    ACT_GRAD: tl.constexpr, ROW_DOT: tl.constexpr, GLU_GRAD: tl.constexpr,
):
    """The epilogue steps on columns ``[off_n, off_n + SLICE_N)`` of a tile (``acc``: that part of
    the accumulator) in ``SPLIT`` slices, one after the other: with ``SPLIT`` > 1 the columns are
    halved (a register split in the MMA layout, no data movement) and each half runs with
    ``SPLIT // 2``, so a slice's steps and output store hold ``SLICE_N / SPLIT`` columns of
    registers (and, through TMA, of shared-memory staging) instead of the whole tile's.
    ``part_n`` numbers the row-dot partial: the column tile times the slices a tile, plus the
    slice. ``c_rows`` / ``r_rows`` are the output's and the residual's rows (``ROW_MAP``; else
    ``r64``, the int64 output rows)."""
    if SPLIT > 1:
        lo, hi = tl.split(tl.permute(tl.reshape(acc, [acc.shape[0], 2, SLICE_N // 2]), [0, 2, 1]))
        _epilogue(lo, off_m, off_n, 2 * part_n, offs_m, lm, r64, c_rows, r_rows,
                  c_ptr, c_desc, r_desc, bias_ptr, col_scale_ptr, row_scale_ptr, res_ptr, pre_ptr, aux_ptr,
                  dotw_ptr, dotpart_ptr, M, N, stride_cm, stride_cn, stride_rm, stride_rn, stride_pm, stride_pn,
                  stride_xm, stride_xn, stride_wm, stride_wn, c_args,
                  SLICE_N // 2, SPLIT // 2, C_MODE, R_MODE, ROW_MAP, COL_MAP, HAS_BIAS, ACTIVATION, HAS_COL_SCALE,
                  HAS_ROW_SCALE, HAS_RESIDUAL, STORE_PRE, ACT_GRAD, ROW_DOT, GLU_GRAD)
        _epilogue(hi, off_m, off_n + SLICE_N // 2, 2 * part_n + 1, offs_m, lm, r64, c_rows, r_rows,
                  c_ptr, c_desc, r_desc, bias_ptr, col_scale_ptr, row_scale_ptr, res_ptr, pre_ptr, aux_ptr,
                  dotw_ptr, dotpart_ptr, M, N, stride_cm, stride_cn, stride_rm, stride_rn, stride_pm, stride_pn,
                  stride_xm, stride_xn, stride_wm, stride_wn, c_args,
                  SLICE_N // 2, SPLIT // 2, C_MODE, R_MODE, ROW_MAP, COL_MAP, HAS_BIAS, ACTIVATION, HAS_COL_SCALE,
                  HAS_ROW_SCALE, HAS_RESIDUAL, STORE_PRE, ACT_GRAD, ROW_DOT, GLU_GRAD)
    else:
        offs_n = off_n + tl.arange(0, SLICE_N)
        ln = offs_n < N
        mask = lm[:, None] & ln[None, :]
        acc = add_bias(acc, bias_ptr, offs_n, ln, HAS_BIAS)
        store_aux(acc, pre_ptr, r64, offs_n, stride_pm, stride_pn, mask, STORE_PRE)
        row_dot(acc, dotw_ptr, dotpart_ptr, r64, offs_m, offs_n, stride_wm, stride_wn, mask, lm, M, part_n, ROW_DOT)
        acc = activation(acc, ACTIVATION)
        acc = scale_cols(acc, col_scale_ptr, offs_n, ln, HAS_COL_SCALE)
        acc = scale_rows(acc, row_scale_ptr, offs_m, lm, HAS_ROW_SCALE)
        acc = mul_activation_grad(acc, aux_ptr, r64, offs_n, stride_xm, stride_xn, mask, ACT_GRAD)
        if ROW_MAP is not None:
            acc = add_residual(acc, res_ptr, r_rows, offs_n, stride_rm, stride_rn, mask, HAS_RESIDUAL)
            if COL_MAP is not None:
                c_cols = COL_MAP(offs_n, c_args)
            else:
                c_cols = offs_n
            tl.store(c_ptr + c_rows.to(tl.int64)[:, None] * stride_cm + c_cols[None, :] * stride_cn,
                     round_to(acc, c_ptr.dtype.element_ty), mask=mask)
        else:
            if R_MODE == 1:  # the residual through its descriptor
                acc = acc + r_desc.load([off_m, off_n]).to(tl.float32)
            else:
                acc = add_residual(acc, res_ptr, r64, offs_n, stride_rm, stride_rn, mask, HAS_RESIDUAL)
            if GLU_GRAD:  # dH -> the packed (dg, dv) of SwiGLU's fc1 output
                swiglu_grad_store(acc, aux_ptr, c_ptr, r64, offs_n, N, stride_xm, stride_xn, stride_cm, stride_cn, mask)
            elif C_MODE == 1:
                c_desc.store([off_m, off_n], round_to(acc, c_ptr.dtype.element_ty))
            else:
                tl.store(c_ptr + r64[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                         round_to(acc, c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# The GEMM kernel
# --------------------------------------------------------------------------------------------


@register_kernel(expects_wgmma=wgmma_expected(operand="b_ptr", block_m="BLOCK_M", tf32="TF32"))
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    bias_ptr, col_scale_ptr, row_scale_ptr, red_scale_ptr, res_ptr, pre_ptr, aux_ptr,
    rowsum_ptr, rowsum_w_ptr, dotw_ptr, dotpart_ptr, acopy_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
    stride_rm, stride_rn, stride_pm, stride_pn, stride_xm, stride_xn, stride_wm, stride_wn,
    stride_qm, stride_qk,
    a_args, c_args,
    num_progs, k_tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr, R_MODE: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
    A_GATHER: tl.constexpr, ROW_MAP: tl.constexpr, COL_MAP: tl.constexpr, PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, HAS_RED_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PRE: tl.constexpr, ACT_GRAD: tl.constexpr, ROW_SUM: tl.constexpr, ROW_DOT: tl.constexpr,
    ROW_SUM_WEIGHTED: tl.constexpr, A_COPY: tl.constexpr, TF32: tl.constexpr, GLU_GRAD: tl.constexpr,
):
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_lo = 0
    k_hi = k_tiles
    a_start = a_ptr  # plain-load bases at the first K of this program's split
    b_start = b_ptr
    if SPLIT_K:
        pid_s = tl.program_id(1)
        k_lo = pid_s * k_tiles_per_split
        k_hi = min(k_hi, k_lo + k_tiles_per_split)
        a_start = a_ptr + (k_lo * BLOCK_K).to(tl.int64) * stride_ak
        b_start = b_ptr + (k_lo * BLOCK_K).to(tl.int64) * stride_bk
        c_ptr += pid_s.to(tl.int64) * stride_cs
        if ROW_SUM:
            rowsum_ptr += pid_s.to(tl.int64) * M
        if ROW_DOT:
            dotpart_ptr += pid_s.to(tl.int64) * (num_pid_n * EPI_SPLIT) * M

    if PROLOGUE is not None:
        PROLOGUE(start_pid, num_progs, c_ptr, stride_cm, stride_cn, c_args, BLOCK_M, BLOCK_N)

    if A_MODE == 1:
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
    elif A_MODE == 2:
        a_desc = tl.make_tensor_descriptor(a_ptr, [K, M], [stride_ak, 1], [BLOCK_K, BLOCK_M])
    if B_MODE == 1:
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K])
    elif B_MODE == 2:
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [stride_bk, 1], [BLOCK_K, BLOCK_N])
    # the output and residual descriptors address one epilogue slice (BLOCK_N // EPI_SPLIT columns);
    # without them the slice function gets the plain pointers in their place (never used)
    if C_MODE == 1:
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N // EPI_SPLIT])
    else:
        c_desc = c_ptr
    if R_MODE == 1:
        r_desc = tl.make_tensor_descriptor(res_ptr, [M, N], [stride_rm, 1], [BLOCK_M, BLOCK_N // EPI_SPLIT])
    else:
        r_desc = res_ptr

    for tile_id in tl.range(start_pid, num_tiles, num_progs, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        tm = tl.arange(0, BLOCK_M)
        tn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        lm = (off_m + tm) < M
        ln = (off_n + tn) < N
        # plain loads: a 64-bit scalar base walking K, 32-bit offsets inside the tile; rows
        # clamped into range (mode 0) or masked (mode 3)
        a_base = a_start + off_m.to(tl.int64) * stride_am
        b_base = b_start + off_n.to(tl.int64) * stride_bn
        if A_MODE == 3:
            a_offs = tm[:, None] * stride_am + rk[None, :] * stride_ak
            a_rmask = lm[:, None]
        else:
            a_offs = tl.minimum(tm, M - 1 - off_m)[:, None] * stride_am + rk[None, :] * stride_ak
            a_rmask = tl.full([BLOCK_M, 1], 1, tl.int1)
        if B_MODE == 3:
            b_offs = tn[None, :] * stride_bn + rk[:, None] * stride_bk
            b_rmask = ln[None, :]
        else:
            b_offs = tl.minimum(tn, N - 1 - off_n)[None, :] * stride_bn + rk[:, None] * stride_bk
            b_rmask = tl.full([1, BLOCK_N], 1, tl.int1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ROW_SUM:
            rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for ki in range(k_lo, k_hi):
            off_k = ki * BLOCK_K
            offs_k = off_k + rk
            # ---- A tile [BLOCK_M, BLOCK_K]
            if A_GATHER is not None:
                a = A_GATHER(a_ptr, off_m + tm, offs_k, M, K, a_args)
            elif A_MODE == 1:
                a = a_desc.load([off_m, off_k])
            elif A_MODE == 2:
                a = _interp_contiguous(a_desc.load([off_k, off_m]).T, BLOCK_M, BLOCK_K)
            else:
                if A_MODE == 3:
                    if EVEN_K:
                        a = tl.load(a_base + a_offs, mask=a_rmask, other=0.0)
                    else:
                        a = tl.load(a_base + a_offs, mask=a_rmask & (offs_k[None, :] < K), other=0.0)
                else:
                    if EVEN_K:
                        a = tl.load(a_base + a_offs)
                    else:
                        a = tl.load(a_base + a_offs, mask=offs_k[None, :] < K, other=0.0)
                a_base += BLOCK_K * stride_ak
            # ---- B tile [BLOCK_K, BLOCK_N]
            if B_MODE == 1:
                b = _interp_contiguous(b_desc.load([off_n, off_k]).T, BLOCK_K, BLOCK_N)
            elif B_MODE == 2:
                b = b_desc.load([off_k, off_n])
            else:
                if B_MODE == 3:
                    if EVEN_K:
                        b = tl.load(b_base + b_offs, mask=b_rmask, other=0.0)
                    else:
                        b = tl.load(b_base + b_offs, mask=b_rmask & (offs_k[:, None] < K), other=0.0)
                else:
                    if EVEN_K:
                        b = tl.load(b_base + b_offs)
                    else:
                        b = tl.load(b_base + b_offs, mask=offs_k[:, None] < K, other=0.0)
                b_base += BLOCK_K * stride_bk
            if HAS_RED_SCALE:
                s = tl.load(red_scale_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                a = a.to(tl.float32) * s[None, :]
            a = round_to(a, b.dtype)
            if ROW_SUM:
                if pid_n == 0:
                    if ROW_SUM_WEIGHTED:
                        rw = tl.load(rowsum_w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                        rsum += tl.sum(a.to(tl.float32) * rw[None, :], axis=1)
                    else:
                        rsum += tl.sum(a.to(tl.float32), axis=1)
            if A_COPY:  # A' in B's dtype, for the next GEMM of the same operand (once per row block)
                if pid_n == 0:
                    tl.store(acopy_ptr + (off_m + tm).to(tl.int64)[:, None] * stride_qm + offs_k[None, :] * stride_qk,
                             a, mask=lm[:, None] & (offs_k < K)[None, :])
            acc = tl.dot(dot_operand(a), dot_operand(b), acc, input_precision="tf32" if TF32 else "ieee")

        # ---------------- epilogue (fp32, one cast on store), in EPI_SPLIT column slices
        offs_m = off_m + tm
        r64 = offs_m.to(tl.int64)
        if ROW_MAP is not None:
            c_rows, r_rows = ROW_MAP(offs_m, c_args)
        else:
            c_rows = r64
            r_rows = r64
        _epilogue(
            acc, off_m, off_n, pid_n, offs_m, lm, r64, c_rows, r_rows,
            c_ptr, c_desc, r_desc, bias_ptr, col_scale_ptr, row_scale_ptr, res_ptr, pre_ptr, aux_ptr,
            dotw_ptr, dotpart_ptr, M, N, stride_cm, stride_cn, stride_rm, stride_rn, stride_pm, stride_pn,
            stride_xm, stride_xn, stride_wm, stride_wn, c_args,
            BLOCK_N, EPI_SPLIT, C_MODE, R_MODE, ROW_MAP, COL_MAP, HAS_BIAS, ACTIVATION, HAS_COL_SCALE,
            HAS_ROW_SCALE, HAS_RESIDUAL, STORE_PRE, ACT_GRAD, ROW_DOT, GLU_GRAD)
        if ROW_SUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + offs_m, rsum, mask=lm)


# --------------------------------------------------------------------------------------------
# Activation backward (linear with an activation; the MLP fuses this into a GEMM epilogue)
# --------------------------------------------------------------------------------------------


@register_kernel
@triton.jit
def _act_bwd_kernel(
    g_ptr, pre_ptr, out_ptr, col_scale_ptr, row_scale_ptr, part_ptr, rowpart_ptr,
    M, N,
    stride_gm, stride_gn, stride_pm, stride_pn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    WRITE_DSCALE: tl.constexpr, WRITE_DROW: tl.constexpr,
):
    """dPre = dY * row_scale[m] * col_scale[n] * act'(pre), one pass; with WRITE_DSCALE also the
    LayerScale-grad partials part[pid_m, n] = sum_m dY * row_scale * act(pre), with WRITE_DROW
    the drop-path row-scale-grad partials rowpart[pid_n, m] = sum_n dY * col_scale * act(pre)
    (both fp32, per block, summed by the launcher in a fixed order)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)
    g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(pre_ptr + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0).to(tl.float32)
    if WRITE_DSCALE or WRITE_DROW:
        z = activation(x, ACTIVATION)
    if WRITE_DROW:
        gz = scale_cols(g * z, col_scale_ptr, offs_n, mask_n, HAS_COL_SCALE)
        tl.store(rowpart_ptr + pid_n.to(tl.int64) * M + offs_m, tl.sum(gz, axis=1), mask=mask_m)
    g = scale_rows(g, row_scale_ptr, offs_m, mask_m, HAS_ROW_SCALE)
    if WRITE_DSCALE:
        part = tl.sum(g * z, axis=0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + offs_n, part, mask=mask_n)
    g = scale_cols(g, col_scale_ptr, offs_n, mask_n, HAS_COL_SCALE)
    g = g * activation_grad(x, ACTIVATION)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on, round_to(g, out_ptr.dtype.element_ty),
             mask=mask)



# --------------------------------------------------------------------------------------------
# The SwiGLU GEMM: fc1's gate and value halves in one tile, h = silu(g) * v in the epilogue
# --------------------------------------------------------------------------------------------


@register_kernel(expects_wgmma=wgmma_expected(operand="bg_ptr", block_m="BLOCK_M", tf32="TF32"))
@triton.jit
def _swiglu_gemm_kernel(
    a_ptr, bg_ptr, bv_ptr, c_ptr, bias_g_ptr, bias_v_ptr, pre_ptr,
    M, N, K,
    stride_am, stride_ak, stride_gn, stride_gk, stride_vn, stride_vk, stride_cm, stride_cn, stride_pm, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, TF32: tl.constexpr,
):
    """``h[M, N] = silu(A @ Bg^T + bg) * (A @ Bv^T + bv)``: each tile accumulates the gate rows
    ``n..n+BLOCK_N`` of ``Bg`` and the value rows ``n..n+BLOCK_N`` of ``Bv`` (two views of the
    packed ``(2N, K)`` fc1 weight, or two separate weights) against the same A tile, two fp32
    accumulators, and stores only h (one cast). With ``STORE_PRE`` the biased gate and value
    accumulators go to the packed ``(M, 2N)`` pre-activation (gate columns ``[0, N)``, value
    columns ``[N, 2N)``), rounded to its dtype, for the backward. Plain pointer loads with rows
    clamped into range (the GEMM kernel's mode 0) and grouped tile order."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    tm = tl.arange(0, BLOCK_M)
    tn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + off_m.to(tl.int64) * stride_am
    g_base = bg_ptr + off_n.to(tl.int64) * stride_gn
    v_base = bv_ptr + off_n.to(tl.int64) * stride_vn
    a_offs = tl.minimum(tm, M - 1 - off_m)[:, None] * stride_am + rk[None, :] * stride_ak
    cn = tl.minimum(tn, N - 1 - off_n)[None, :]
    g_offs = cn * stride_gn + rk[:, None] * stride_gk
    v_offs = cn * stride_vn + rk[:, None] * stride_vk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_base + a_offs)
            bg = tl.load(g_base + g_offs)
            bv = tl.load(v_base + v_offs)
        else:
            k_ok = (ki * BLOCK_K + rk) < K
            a = tl.load(a_base + a_offs, mask=k_ok[None, :], other=0.0)
            bg = tl.load(g_base + g_offs, mask=k_ok[:, None], other=0.0)
            bv = tl.load(v_base + v_offs, mask=k_ok[:, None], other=0.0)
        a = dot_operand(a)
        acc_g = tl.dot(a, dot_operand(bg), acc_g, input_precision="tf32" if TF32 else "ieee")
        acc_v = tl.dot(a, dot_operand(bv), acc_v, input_precision="tf32" if TF32 else "ieee")
        a_base += BLOCK_K * stride_ak
        g_base += BLOCK_K * stride_gk
        v_base += BLOCK_K * stride_vk

    offs_m = off_m + tm
    offs_n = off_n + tn
    ln = offs_n < N
    mask = (offs_m < M)[:, None] & ln[None, :]
    r64 = offs_m.to(tl.int64)
    acc_g = add_bias(acc_g, bias_g_ptr, offs_n, ln, HAS_BIAS)
    acc_v = add_bias(acc_v, bias_v_ptr, offs_n, ln, HAS_BIAS)
    if STORE_PRE:
        store_aux(acc_g, pre_ptr, r64, offs_n, stride_pm, stride_pn, mask, True)
        store_aux(acc_v, pre_ptr + N * stride_pn, r64, offs_n, stride_pm, stride_pn, mask, True)
    h = swiglu(acc_g, acc_v)
    tl.store(c_ptr + r64[:, None] * stride_cm + offs_n[None, :] * stride_cn, round_to(h, c_ptr.dtype.element_ty),
             mask=mask)


@register_kernel
@triton.jit
def _swiglu_bwd_kernel(
    g_ptr, pre_ptr, out_ptr,
    M, N,
    stride_gm, stride_gn, stride_pm, stride_pn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The SwiGLU gate's backward as one elementwise pass (where a norm sits between the gate and
    fc2, so no GEMM produces dH): ``dH (M, N)`` and the packed pre-activation ``(M, 2N)`` to the
    packed ``(dg, dv)`` ``(M, 2N)``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows = offs_m.to(tl.int64)
    dh = tl.load(g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    swiglu_grad_store(dh.to(tl.float32), pre_ptr, out_ptr, rows, offs_n, N, stride_pm, stride_pn, stride_om,
                      stride_on, mask)
