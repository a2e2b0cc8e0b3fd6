"""The GEMM core that linear, mlp and patch_embed share: one Triton kernel, its configs, its launcher.

    C[M, N] = epilogue( A'[M, K] @ B[N, K]^T )          fp32 accumulation

``A`` and ``B`` come as pointers plus strides, so every operand of the forward and backward GEMMs
is a view (``W.t()``, ``dY.t()``, ``x.t()``) and nothing is copied. ``A'`` is the A tile after an
optional scale along the reduction axis (``red_scale[k]``: drop path's row scale in the dW GEMM)
and a cast to B's dtype (a float32 gradient against bf16 weights). The epilogue runs in fp32 on the
accumulator, in this order, each step a constexpr switch:

    acc += bias[n]                              HAS_BIAS
    pre[m, n] = acc                             STORE_PRE   pre-activation kept for backward
    dotpart[s, pid_n, m] = sum_n acc * W[m, n]  ROW_DOT     LayerScale grad (see linear backward)
    acc = act(acc)                              ACTIVATION  0 none, 1 GELU (erf), 2 GELU (tanh)
    acc *= col_scale[n]                         HAS_COL_SCALE  LayerScale gamma
    acc *= row_scale[m]                         HAS_ROW_SCALE  drop path
    acc *= act'(aux[m, n])                      ACT_GRAD    activation backward (aux = pre)
    acc += residual[m, n]                       HAS_RESIDUAL
    C[m, n] = acc                               one cast, to C's dtype
    rowsum[s, m] = sum_k A'[m, k]               ROW_SUM     bias grad, from the pid_n == 0 tiles

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
the GEMM's own programs). All default to None (plain A, identity rows and columns, no prologue);
:func:`gemm` takes them as ``a_gather`` / ``a_args`` / ``a_shape``, ``row_map`` / ``col_map`` /
``c_args`` and ``prologue``.

Under the interpreter, bf16 dot operands are upcast (``dot_operand``), stores round to nearest
even (``round_to``), and transposed tiles are copied row-major before the dot (numpy's matmul is
~500x slower on Fortran-ordered operands).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from vitkern.ops._common import contiguous_vectors
from vitkern.ops._index import INT32_MAX, check_int32, fits_int32
from vitkern.ops._config import device_arch, INTERPRETING, KernelConfig, num_sms, TRITON_36
from vitkern.ops._triton import (
    capturing,
    dot_operand,
    ensure_scratch_allocator,
    launch,
    register_helper,
    register_kernel,
    round_to,
    wgmma_expected,
)
from vitkern.testing.compile_check import compile_cases

__all__ = [
    "ACTIVATION_IDS",
    "GemmConfig",
    "GEMM_CONFIGS",
    "GEMM_RULES",
    "select_config",
    "dot_precision",
    "gemm",
    "act_bwd",
]

# Activation ids shared by the epilogue and the launchers ("gelu" is erf GELU, "gelu_tanh" the
# tanh approximation; DESIGN.md, "Numerics").
ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
ACTIVATION_IDS = {None: ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}

# Operand load modes: plain pointer loads with rows clamped into range (no row mask: fewer
# registers; for operands contiguous along K), TMA descriptors (rows contiguous along K, or the
# operand stored transposed), plain loads with row masks (operands contiguous along M / N, where
# clamped indices would break the vectorised loads).
LOAD_PLAIN, LOAD_TMA, LOAD_TMA_T, LOAD_PLAIN_T = 0, 1, 2, 3

# The interpreter switch as a constexpr global (the compiler folds branches on it away).
_INTERPRET = tl.constexpr(INTERPRETING)


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@register_helper
@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """act(x) in fp32: 1 = erf GELU, 2 = tanh GELU (0.5 * (1 + tanh(u)) == sigmoid(2u))."""
    if ACTIVATION == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    return x


@register_helper
@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx in fp32."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        g = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        g = s + 2.0 * x * s * (1.0 - s) * du
    else:
        g = tl.full(x.shape, 1.0, tl.float32)
    return g


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


# --------------------------------------------------------------------------------------------
# The GEMM kernel
# --------------------------------------------------------------------------------------------


@register_kernel(expects_wgmma=wgmma_expected(operand="b_ptr", block_m="BLOCK_M", tf32="TF32"))
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    bias_ptr, col_scale_ptr, row_scale_ptr, red_scale_ptr, res_ptr, pre_ptr, aux_ptr,
    rowsum_ptr, dotw_ptr, dotpart_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
    stride_rm, stride_rn, stride_pm, stride_pn, stride_xm, stride_xn, stride_wm, stride_wn,
    a_args, c_args,
    num_progs, k_tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr, R_MODE: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
    A_GATHER: tl.constexpr, ROW_MAP: tl.constexpr, COL_MAP: tl.constexpr, PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, HAS_RED_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PRE: tl.constexpr, ACT_GRAD: tl.constexpr, ROW_SUM: tl.constexpr, ROW_DOT: tl.constexpr,
    TF32: tl.constexpr,
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
            dotpart_ptr += pid_s.to(tl.int64) * num_pid_n * M

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
    if C_MODE == 1:
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N])
    if R_MODE == 1:
        r_desc = tl.make_tensor_descriptor(res_ptr, [M, N], [stride_rm, 1], [BLOCK_M, BLOCK_N])

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
                    rsum += tl.sum(a.to(tl.float32), axis=1)
            acc = tl.dot(dot_operand(a), dot_operand(b), acc, input_precision="tf32" if TF32 else "ieee")

        # ---------------- epilogue (fp32, one cast on store)
        offs_m = off_m + tm
        offs_n = off_n + tn
        mask = lm[:, None] & ln[None, :]
        r64 = offs_m.to(tl.int64)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=ln, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if STORE_PRE:
            tl.store(pre_ptr + r64[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                     round_to(acc, pre_ptr.dtype.element_ty), mask=mask)
        if ROW_DOT:
            w = tl.load(dotw_ptr + r64[:, None] * stride_wm + offs_n[None, :] * stride_wn, mask=mask, other=0.0)
            part = tl.sum(acc * w.to(tl.float32), axis=1)
            tl.store(dotpart_ptr + pid_n.to(tl.int64) * M + offs_m, part, mask=lm)
        acc = _activation(acc, ACTIVATION)
        if HAS_COL_SCALE:
            cs = tl.load(col_scale_ptr + offs_n, mask=ln, other=0.0).to(tl.float32)
            acc = acc * cs[None, :]
        if HAS_ROW_SCALE:
            rs = tl.load(row_scale_ptr + offs_m, mask=lm, other=0.0).to(tl.float32)
            acc = acc * rs[:, None]
        if ACT_GRAD != 0:
            x = tl.load(aux_ptr + r64[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
            acc = acc * _activation_grad(x.to(tl.float32), ACT_GRAD)
        if ROW_MAP is not None:
            c_rows, r_rows = ROW_MAP(offs_m, c_args)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + r_rows.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                            mask=mask, other=0.0)
                acc = acc + r.to(tl.float32)
            if COL_MAP is not None:
                c_cols = COL_MAP(offs_n, c_args)
            else:
                c_cols = offs_n
            tl.store(c_ptr + c_rows.to(tl.int64)[:, None] * stride_cm + c_cols[None, :] * stride_cn,
                     round_to(acc, c_ptr.dtype.element_ty), mask=mask)
        else:
            if HAS_RESIDUAL:
                if R_MODE == 1:
                    r = r_desc.load([off_m, off_n])
                else:
                    r = tl.load(res_ptr + r64[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
                acc = acc + r.to(tl.float32)
            if C_MODE == 1:
                c_desc.store([off_m, off_n], round_to(acc, c_ptr.dtype.element_ty))
            else:
                tl.store(c_ptr + r64[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                         round_to(acc, c_ptr.dtype.element_ty), mask=mask)
        if ROW_SUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + offs_m, rsum, mask=lm)


# --------------------------------------------------------------------------------------------
# Activation backward (linear with an activation; the MLP fuses this into a GEMM epilogue)
# --------------------------------------------------------------------------------------------


@register_kernel
@triton.jit
def _act_bwd_kernel(
    g_ptr, pre_ptr, out_ptr, col_scale_ptr, row_scale_ptr, part_ptr,
    M, N,
    stride_gm, stride_gn, stride_pm, stride_pn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    WRITE_DSCALE: tl.constexpr,
):
    """dPre = dY * row_scale[m] * col_scale[n] * act'(pre), one pass; with col_scale also the
    LayerScale-grad partials part[pid_m, n] = sum_m dY * row_scale * act(pre)."""
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
    if HAS_ROW_SCALE:
        rs = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        g = g * rs[:, None]
    if WRITE_DSCALE:
        part = tl.sum(g * _activation(x, ACTIVATION), axis=0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + offs_n, part, mask=mask_n)
    if HAS_COL_SCALE:
        cs = tl.load(col_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        g = g * cs[None, :]
    g = g * _activation_grad(x, ACTIVATION)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on, round_to(g, out_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------------
# Configs (data): keyed on the arch family, the dtype class and (M, N, K) buckets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One GEMM launch configuration.

    ``persistent``: ``num_sms`` programs stride over the tiles. ``tma``: load operands (and store
    the output) through tensor descriptors where the strides allow (sm_90 family only).
    ``split_k``: the most K splits the launcher may use for split-safe epilogues (the dW GEMMs).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    persistent: bool = False
    tma: bool = False
    split_k: int = 1

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
             "GROUP_M": self.group_m, "FLATTEN": self.persistent},
            num_warps=self.num_warps, num_stages=self.num_stages,
        )

    def label(self) -> str:
        s = f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"
        return s + (" persistent" if self.persistent else "") + (" tma" if self.tma else "") + (
            f" splitk{self.split_k}" if self.split_k > 1 else "")


# Named configs. Static compile figures (Triton 3.8, ptxas from its wheel; registers / spill
# bytes / dynamic shared KB, "wg" = wgmma in the PTX) for the fc1 epilogue (bias + GELU + pre
# store), the fc2 epilogue (bias, LayerScale, row scale, fp32 residual) and the dW GEMM (split-K,
# reduction scale, row sums, row dots), from the compile cases below:
#   h100_16_large  sm_90  164/0/160 wg | 125/0/224 wg | (dW runs it unflattened: as h100_16_mid)
#   h100_16_mid    sm_90  161/0/128 wg | 122/0/160 wg | 233/0/116 wg
#   h100_16_small  sm_90  168/0/112 wg | 115/0/128 wg | 237/0/113 wg
#   h100_tf32      sm_90  163/0/160 wg | 150/0/160 wg | 232/0/80 wg
#   h100_fp32      sm_90  128/0/36     | 128/0/36     | 128/0/20      (IEEE fp32: FMA dots)
#   a100_16_large  sm_80  219/0/48     | 238/0/48     | 228/0/76      (mma.sync)
#   a100_16_small  sm_80  221/0/36     | 246/0/36     | 242/0/49
#   a100_tf32      sm_80  250/0/48     | 254/0/48     | 255/0/52
#   a100_fp32      sm_80   80/0/32     |  80/0/32     |  99/0/40
# The same sm_90 sources compiled for sm_80 spill (TMA descriptors lower to plain loads there), and
# so do 128x256 tiles on both arches with the residual epilogue; the TMA store of C and TMA load of
# the residual keep the sm_90 fc2 epilogue at ~125 registers (~240 with pointer stores).
# tl.range(..., warp_specialize=True) compiles on sm_90 with Triton 3.8 but to the same code
# (same registers and shared memory: the pass targets Blackwell), so no config uses it and the
# kernel does not pass the option (Triton 3.6 compatible). Tuning these on an H100 / A100 is
# still open: see benchmarks/setups/linear.py and mlp.py.
GEMM_CONFIGS: dict[str, GemmConfig] = {
    # sm_90 family: wgmma, TMA descriptors (plain loads where strides are not 16-byte aligned)
    "h100_16_large": GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=3, persistent=True, tma=True, split_k=8),
    "h100_16_mid": GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=3, tma=True, split_k=8),
    "h100_16_small": GemmConfig(64, 128, 64, 8, num_warps=4, num_stages=4, tma=True, split_k=8),
    "h100_tf32": GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=3, tma=True, split_k=8),
    "h100_fp32": GemmConfig(64, 64, 16, 8, num_warps=8, num_stages=3, tma=True, split_k=8),
    # sm_80 family: mma.sync, cp.async-pipelined plain loads
    "a100_16_large": GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=4, split_k=8),
    # 8 warps: with 4, the bias + tanh-GELU epilogue spilled 68 bytes under Triton 3.6 (M = 1)
    "a100_16_small": GemmConfig(64, 128, 32, 8, num_warps=8, num_stages=4, split_k=8),
    # Triton 3.6: the 128 x 128 tile's dW epilogue (row scale, row sums, row dots) spilled 4 bytes
    # (255 registers), 128 x 64 holds (206); under 3.8 128 x 64 spills 12 bytes in the fc1 epilogue
    # and 128 x 128 holds
    "a100_tf32": GemmConfig(128, 64 if TRITON_36 else 128, 16, 8, num_warps=8, num_stages=4, split_k=8),
    "a100_fp32": GemmConfig(64, 64, 32, 8, num_warps=8, num_stages=3, split_k=8),
}

# (arch family, dtype class, M bucket, N bucket, K bucket) -> config name; "*" matches anything.
# dtype class: "16" (fp16/bf16), "tf32" (fp32 with TF32 allowed), "fp32" (IEEE fp32).
# M bucket: "s" (M <= 64), "m" (M <= 2048), "l". N bucket: "s" (N <= 64), "l". K bucket: "s" (K <=
# 64), "l". The first matching rule wins.
GEMM_RULES: list[tuple[tuple[int, str, str, str, str], str]] = [
    ((90, "16", "s", "*", "*"), "h100_16_small"),
    ((90, "16", "*", "s", "*"), "h100_16_small"),
    ((90, "16", "m", "*", "*"), "h100_16_mid"),
    ((90, "16", "l", "*", "*"), "h100_16_large"),
    ((90, "tf32", "*", "*", "*"), "h100_tf32"),
    ((90, "fp32", "*", "*", "*"), "h100_fp32"),
    ((80, "16", "s", "*", "*"), "a100_16_small"),
    ((80, "16", "*", "s", "*"), "a100_16_small"),
    ((80, "16", "*", "*", "*"), "a100_16_large"),
    ((80, "tf32", "*", "*", "*"), "a100_tf32"),
    ((80, "fp32", "*", "*", "*"), "a100_fp32"),
]


def dot_precision(dtype: torch.dtype) -> str:
    """The dot precision class of ``dtype``: "16", or for fp32 torch's matmul precision
    (``torch.backends.cuda.matmul.fp32_precision``: "tf32" allows TF32, else IEEE fp32)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "fp32"


def _buckets(M: int, N: int, K: int) -> tuple[str, str, str]:
    return ("s" if M <= 64 else "m" if M <= 2048 else "l", "s" if N <= 64 else "l", "s" if K <= 64 else "l")


def select_config(M: int, N: int, K: int, dtype: torch.dtype, arch: Optional[int] = None) -> GemmConfig:
    """The config for an (M, N, K) GEMM with ``dtype`` operands on ``arch`` (default: the
    current device's family; see :func:`vitkern.ops._config.device_arch`)."""
    arch = device_arch() if arch is None else arch
    key = (arch, dot_precision(dtype), *_buckets(M, N, K))
    for rule, name in GEMM_RULES:
        if all(r == "*" or r == k for r, k in zip(rule, key)):
            return GEMM_CONFIGS[name]
    raise RuntimeError(f"no GEMM config for {key}")


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _tma_ok(t: torch.Tensor, inner: int) -> bool:
    """2-D ``t`` addressable by a TMA descriptor with ``inner`` as its unit-stride dim."""
    outer = 1 - inner
    es = t.element_size()
    return (t.stride(inner) == 1 and t.stride(outer) > 0 and t.data_ptr() % 16 == 0
            and (t.stride(outer) * es) % 16 == 0 and t.shape[inner] * es >= 16)


def _operand_mode(t: torch.Tensor, use_tma: bool) -> int:
    """Load mode of a (rows, K) operand view: TMA where addressable, else plain loads, with row
    masks when the rows are the contiguous dim."""
    if use_tma:
        if _tma_ok(t, 1):
            return LOAD_TMA
        if _tma_ok(t, 0):
            return LOAD_TMA_T
    if t.stride(0) == 1 and t.stride(1) != 1 and t.shape[0] > 1:
        return LOAD_PLAIN_T
    return LOAD_PLAIN


def _tile_int32_ok(t: torch.Tensor, block_rows: int, block_k: int) -> bool:
    """The plain-load offsets of a (rows, K) operand fit in int32: ``r * stride_r + k * stride_k``
    inside a tile, and the per-step pointer increment ``BLOCK_K * stride_k``."""
    rows, k = t.shape
    s_k = t.stride(1)
    step_ok = not (abs(s_k) <= INT32_MAX and block_k * abs(s_k) > INT32_MAX)
    return step_ok and fits_int32((min(block_rows, rows), t.stride(0)), (min(block_k, k), s_k))


def _int32_views(a, b, residual, row_dot, cfg: "GemmConfig", a_base):
    """The kernel's in-tile offsets are int32 (row bases are int64; vitkern.ops._index): a view
    whose layout would wrap them (a transposed operand past 2^31 elements) is copied to a
    contiguous one; raises where that is not enough."""
    n = b.shape[0]

    def fix(name, t, block_rows):
        if t is None or _tile_int32_ok(t, block_rows, cfg.block_k):
            return t
        for copy in (t.contiguous(), t.t().contiguous().t()):  # row-major, then column-major
            if _tile_int32_ok(copy, block_rows, cfg.block_k):
                return copy
        raise ValueError(f"gemm: operand {name} of shape {tuple(t.shape)} needs in-tile offsets past the "
                         f"kernels' int32 range (2^31 - 1) in any layout")

    a = fix("a", a, cfg.block_m)
    b = fix("b", b, cfg.block_n)
    if residual is not None and not fits_int32((n, residual.stride(1))):
        residual = residual.contiguous()
    if row_dot is not None and not fits_int32((n, row_dot.stride(1))):
        row_dot = row_dot.contiguous()
    return (a if a is not None else a_base), b, residual, row_dot


def _strides(t: Optional[torch.Tensor]) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    activation: int = ACT_NONE,
    col_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    red_scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    pre: Optional[torch.Tensor] = None,
    act_grad: int = ACT_NONE,
    aux: Optional[torch.Tensor] = None,
    row_sum: bool = False,
    row_dot: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
    config: Optional[GemmConfig] = None,
    a_gather=None,
    a_args: tuple = (0,),
    a_shape: Optional[tuple[int, int]] = None,
    row_map=None,
    col_map=None,
    c_args: tuple = (0,),
    prologue=None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``out[M, N] = epilogue(a[M, K] @ b[N, K]^T)``; see the module docstring for the epilogue.

    ``a``, ``b``, ``out``, ``residual``, ``pre``, ``aux``, ``row_dot`` are 2-D views with any
    strides. Returns ``(out, row_sums, row_dots)``: with ``row_sum`` the fp32 ``(M,)`` sums of
    ``A'`` over K, with ``row_dot`` (an ``(M, N)`` tensor W) the fp32 ``(M,)`` values
    ``sum_n acc[m, n] * W[m, n]`` of the pre-scale accumulator. ``split_k`` (None: the config
    decides, for split-safe epilogues) splits the reduction; the partials are summed here.

    Hooks (patch embedding): ``a_gather`` is a ``@triton.jit`` function ``(a_ptr, offs_m, offs_k,
    M, K, a_args) -> [BLOCK_M, BLOCK_K]`` tile (zero outside M / K) that replaces the A load; then
    ``a`` is only the base pointer's tensor and ``a_shape = (M, K)`` gives the logical shape.
    ``row_map`` is a ``@triton.jit`` function ``(offs_m, c_args) -> (c_rows, residual_rows)``:
    ``out`` (and ``residual``) are then 2-D buffers indexed by the mapped rows (any row count).
    ``col_map`` (with ``row_map``) is a ``@triton.jit`` function ``(offs_n, c_args) -> c_cols``:
    element ``(m, n)`` is stored at ``c_rows[m] * out.stride(0) + c_cols[n] * out.stride(1)``
    (``out`` then only carries the base pointer, dtype and those two strides; any shape).
    ``prologue`` is a ``@triton.jit`` function ``(pid, num_progs, c_ptr, stride_cm, stride_cn,
    c_args, BLOCK_M, BLOCK_N)`` that every program runs once before its tiles (no split-K).
    """
    M, K = a_shape if a_gather is not None else a.shape
    N = b.shape[0]
    if col_map is not None and row_map is None:
        raise ValueError("gemm: col_map needs row_map")
    if b.shape[1] != K or (row_map is None and tuple(out.shape) != (M, N)) or (
            col_map is None and out.shape[-1] != N):
        raise ValueError(f"gemm: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)} do not match")
    if (a_gather is not None or row_map is not None) and K == 0:
        raise ValueError("gemm: K = 0 with a gather / row map")
    dev = a.device
    row_sums = torch.zeros(M, device=dev, dtype=torch.float32) if row_sum else None
    row_dots = torch.zeros(M, device=dev, dtype=torch.float32) if row_dot is not None else None
    if M == 0 or N == 0:
        if row_sum and M and K and a_gather is None:  # no output columns, but A' still has rows
            a32 = a.float() if red_scale is None else a.float() * red_scale.float()[None, :]
            row_sums = a32.to(b.dtype).float().sum(1)
        return out, row_sums, row_dots
    # the epilogue reads its vectors with unit stride
    bias, col_scale, row_scale, red_scale = contiguous_vectors(bias, col_scale, row_scale, red_scale)
    if K == 0:  # an empty reduction: the epilogue of a zero accumulator
        a = torch.zeros((M, 1), device=dev, dtype=a.dtype)
        b = torch.zeros((N, 1), device=dev, dtype=b.dtype)
        K = 1
        red_scale = None  # K-indexed, empty: the zero operands need no scale
    arch = device_arch(dev if dev.type == "cuda" else None)
    cfg = config if config is not None else select_config(M, N, K, b.dtype, arch)
    use_tma = cfg.tma and arch >= 90

    num_pid_n = triton.cdiv(N, cfg.block_n)
    num_tiles = triton.cdiv(M, cfg.block_m) * num_pid_n
    k_tiles = triton.cdiv(K, cfg.block_k)
    split_safe = (bias is None and activation == ACT_NONE and residual is None and pre is None
                  and act_grad == ACT_NONE and row_map is None and prologue is None)
    if split_k is None:
        split_k = 1
        if split_safe and cfg.split_k > 1 and k_tiles >= 16:
            sms = num_sms(dev if dev.type == "cuda" else None)
            if num_tiles < sms:
                split_k = min(cfg.split_k, sms // num_tiles, k_tiles // 8)
    split_k = max(1, min(int(split_k), k_tiles))
    if split_k > 1 and not split_safe:
        raise ValueError("gemm: split-K needs a linear epilogue (no bias, activation, residual, pre or act_grad)")
    per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, per_split)

    if split_k > 1:
        c = torch.empty((split_k, M, N), device=dev, dtype=torch.float32)
        c_view, stride_cs = c[0], c.stride(0)
        rs_buf = torch.empty((split_k, M), device=dev, dtype=torch.float32) if row_sum else None
    else:
        c, c_view, stride_cs = out, out, 0
        rs_buf = row_sums
    dp_buf = (torch.empty((split_k, num_pid_n, M), device=dev, dtype=torch.float32)
              if row_dot is not None else None)

    a, b, residual, row_dot = _int32_views(a if a_gather is None else None, b, residual, row_dot, cfg, a)
    for name, t in (("out", None if col_map is not None else c_view), ("pre", pre), ("aux", aux)):
        if t is not None:
            check_int32("gemm", f"{name} (column offsets)", (N, t.stride(1)))
    a_mode = _operand_mode(a, use_tma) if a_gather is None else LOAD_PLAIN
    b_mode = _operand_mode(b, use_tma)
    mapped = row_map is not None
    c_mode = LOAD_TMA if use_tma and split_k == 1 and not mapped and _tma_ok(c_view, 1) else LOAD_PLAIN
    r_mode = LOAD_TMA if use_tma and residual is not None and not mapped and _tma_ok(residual, 1) else LOAD_PLAIN
    if LOAD_TMA in (a_mode, b_mode, c_mode, r_mode) or LOAD_TMA_T in (a_mode, b_mode):
        ensure_scratch_allocator()  # per thread: see its docstring
    # Persistent (flattened) tile loops do not compile with the in-loop row sums (Triton 3.8's
    # loop fusion fails); those GEMMs (dW) launch one program per tile.
    persistent = cfg.persistent and not row_sum
    progs = max(1, min(num_tiles, num_sms(dev if dev.type == "cuda" else None))) if persistent else num_tiles
    kcfg = cfg.kernel_config()
    if persistent != cfg.persistent:
        kcfg = KernelConfig({**kcfg.meta, "FLATTEN": persistent}, num_warps=kcfg.num_warps, num_stages=kcfg.num_stages)

    launch(
        _gemm_kernel, (progs, split_k),
        a, b, c_view,
        bias, col_scale, row_scale, red_scale, residual, pre, aux, rs_buf, row_dot, dp_buf,
        M, N, K,
        *_strides(a), *_strides(b), *_strides(c_view), stride_cs,
        *_strides(residual), *_strides(pre), *_strides(aux), *_strides(row_dot),
        tuple(a_args), tuple(c_args),
        progs, per_split,
        A_MODE=a_mode, B_MODE=b_mode, C_MODE=c_mode, R_MODE=r_mode,
        EVEN_K=K % cfg.block_k == 0, SPLIT_K=split_k > 1,
        A_GATHER=a_gather, ROW_MAP=row_map, COL_MAP=col_map, PROLOGUE=prologue,
        HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_COL_SCALE=col_scale is not None,
        HAS_ROW_SCALE=row_scale is not None, HAS_RED_SCALE=red_scale is not None,
        HAS_RESIDUAL=residual is not None, STORE_PRE=pre is not None, ACT_GRAD=act_grad,
        ROW_SUM=row_sum, ROW_DOT=row_dot is not None,
        TF32=dot_precision(b.dtype) == "tf32",
        config=kcfg,
    )
    if capturing():  # the static compile check: nothing ran
        return out, row_sums, row_dots
    if split_k > 1:
        torch.sum(c, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(c.sum(0))
        if row_sum:
            torch.sum(rs_buf, dim=0, out=row_sums)
    if row_dot is not None:
        torch.sum(dp_buf.view(split_k * num_pid_n, M), dim=0, out=row_dots)
    return out, row_sums, row_dots


_ACT_BWD_BLOCK = (64, 64)


def act_bwd(
    grad: torch.Tensor,
    pre: torch.Tensor,
    activation: int,
    out_dtype: torch.dtype,
    col_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    want_dscale: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``dPre = grad * row_scale * col_scale * act'(pre)`` (M, N) in ``out_dtype``, and with
    ``want_dscale`` the fp32 (N,) LayerScale grad ``sum_m grad * row_scale * act(pre)``."""
    M, N = grad.shape
    col_scale, row_scale = contiguous_vectors(col_scale, row_scale)
    if not fits_int32((N, grad.stride(1))):  # column offsets are int32 in the kernel
        grad = grad.contiguous()
    check_int32("act_bwd", "pre (column offsets)", (N, pre.stride(1)))
    out = torch.empty((M, N), device=grad.device, dtype=out_dtype)
    bm, bn = _ACT_BWD_BLOCK
    grid_m = triton.cdiv(M, bm)
    part = torch.empty((grid_m, N), device=grad.device, dtype=torch.float32) if want_dscale else None
    if M and N:
        launch(_act_bwd_kernel, (grid_m, triton.cdiv(N, bn)),
               grad, pre, out, col_scale, row_scale, part, M, N,
               *_strides(grad), *_strides(pre), *_strides(out),
               BLOCK_M=bm, BLOCK_N=bn, ACTIVATION=activation,
               HAS_COL_SCALE=col_scale is not None, HAS_ROW_SCALE=row_scale is not None,
               WRITE_DSCALE=want_dscale, num_warps=4, num_stages=1)
    dscale = None
    if capturing():
        return out, dscale
    if want_dscale:
        dscale = part.sum(0) if M else torch.zeros(N, device=grad.device, dtype=torch.float32)
    return out, dscale


# --------------------------------------------------------------------------------------------
# Static compile cases: every config, every epilogue variant once, the benchmark shapes
# --------------------------------------------------------------------------------------------


def _case_tensors(M, N, K, dtype, out_dtype=None):
    a = torch.empty(M, K, dtype=dtype)
    b = torch.empty(N, K, dtype=dtype)
    out = torch.empty(M, N, dtype=out_dtype or dtype)
    return a, b, out


@compile_cases
def _gemm_cases():
    bf16, f32 = torch.bfloat16, torch.float32
    arch = device_arch()
    # every config of this arch family, with the fc1 epilogue (bias + GELU + pre store)
    for name, cfg in GEMM_CONFIGS.items():
        if not name.startswith("h100" if arch >= 90 else "a100"):
            continue
        dtype = bf16 if "_16_" in name else f32
        tf32 = "tf32" in name
        prev = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            a, b, out = _case_tensors(4096, 3072, 768, dtype)
            gemm(a, b, out, bias=torch.empty(3072, dtype=dtype), activation=ACT_GELU,
                 pre=torch.empty_like(out), config=cfg)
            # the fc2 / proj epilogue: bias, LayerScale, drop path, fp32 residual
            a, b, out = _case_tensors(4096, 768, 3072, dtype, f32)
            gemm(a, b, out, bias=torch.empty(768, dtype=dtype), col_scale=torch.empty(768, dtype=dtype),
                 row_scale=torch.empty(4096, dtype=f32), residual=torch.empty(4096, 768, dtype=f32), config=cfg)
            # dW with split-K, row sums, row dots and a reduction-axis scale: A = dY^T, B = x^T
            g = torch.empty(8192, 768, dtype=f32 if dtype == bf16 else dtype)
            x = torch.empty(8192, 3072, dtype=dtype)
            gemm(g.t(), x.t(), torch.empty(768, 3072, dtype=f32), red_scale=torch.empty(8192, dtype=f32),
                 row_scale=torch.empty(768, dtype=dtype), row_sum=True, row_dot=torch.empty(768, 3072, dtype=dtype),
                 split_k=4, config=cfg)
        finally:
            torch.backends.cuda.matmul.fp32_precision = prev
    # the MLP's dU GEMM: dPre = rs * (dY @ W2g) * gelu'(pre); ragged / unaligned shapes (K = 588,
    # N = 1000 / 100 / 21843: plain loads where TMA cannot address the rows)
    for dtype in (bf16, torch.float16):
        a, b, out = _case_tensors(4096, 3072, 768, dtype)
        gemm(a, torch.empty(768, 3072, dtype=dtype).t(), out, row_scale=torch.empty(4096, dtype=f32),
             act_grad=ACT_GELU, aux=torch.empty_like(out))
    for M, N, K in ((197, 1000, 768), (8, 21843, 768), (3152, 768, 588), (197, 100, 192), (1, 1000, 768)):
        a, b, out = _case_tensors(M, N, K, bf16)
        gemm(a, b, out, bias=torch.empty(N, dtype=bf16), activation=ACT_GELU_TANH)
    a, b, out = _case_tensors(197, 192, 192, f32)
    gemm(a, b, out, bias=torch.empty(192, dtype=f32))
    for act in (ACT_GELU, ACT_GELU_TANH):
        for dtype in (bf16, f32):
            g = torch.empty(4096, 3072, dtype=dtype)
            act_bwd(g, torch.empty(4096, 3072, dtype=bf16), act, bf16, col_scale=torch.empty(3072, dtype=bf16),
                    row_scale=torch.empty(4096, dtype=f32), want_dscale=True)
    act_bwd(torch.empty(4096, 3072, dtype=bf16), torch.empty(4096, 3072, dtype=bf16), ACT_GELU, bf16)


@compile_cases(slow=True)
def _gemm_bench_cases():
    """Benchmark shapes: ViT-B / ViT-L blocks at batch 64 (M = 12608), forward and backward."""
    bf16, f32 = torch.bfloat16, torch.float32
    for D in (768, 1024):
        M, H = 197 * 64, 4 * D
        for N, K in ((3 * D, D), (D, D), (H, D), (D, H)):
            a, b, out = _case_tensors(M, N, K, bf16)
            gemm(a, b, out, bias=torch.empty(N, dtype=bf16))
            gemm(out, b.t(), torch.empty(M, K, dtype=bf16))                         # dX
            gemm(out.t(), a.t(), torch.empty(N, K, dtype=bf16), row_sum=True)       # dW
