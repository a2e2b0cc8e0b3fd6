"""The GEMM core's launchers: :func:`gemm` (operand load modes, int32 offset checks, split-K,
persistent grids, the epilogue's constexprs), :func:`act_bwd`, and the SwiGLU pair:
:func:`swiglu_gemm` (fc1's gate and value halves in one GEMM, ``silu(g) * v`` stored) and
:func:`swiglu_bwd` (the gate's backward as one elementwise pass; the fused form is
``Epilogue(glu_grad=True)`` on the dH GEMM)."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from vitkern.ops._common import contiguous_vectors
from vitkern.ops._config import available_sms, device_arch, KernelConfig
from vitkern.ops._triton import capturing, ensure_scratch_allocator, launch
from vitkern.ops._index import INT32_MAX, check_int32, fits_int32
from vitkern.ops.activation import Activation
from vitkern.ops.gemm.configs import (GemmConfig, dot_precision, plan_gemm, select_config, select_swiglu_config,
                                      wide_stand_in)
from vitkern.ops.gemm.epilogue import Epilogue
from vitkern.ops.gemm.kernels import _act_bwd_kernel, _gemm_kernel, _swiglu_bwd_kernel, _swiglu_gemm_kernel

__all__ = ["gemm", "act_bwd", "swiglu_gemm", "swiglu_bwd"]

# Operand load modes: plain pointer loads with rows clamped into range (no row mask: fewer
# registers; for operands contiguous along K), TMA descriptors (rows contiguous along K, or the
# operand stored transposed), plain loads with row masks (operands contiguous along M / N, where
# clamped indices would break the vectorised loads).
LOAD_PLAIN, LOAD_TMA, LOAD_TMA_T, LOAD_PLAIN_T = 0, 1, 2, 3


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
    epilogue: Epilogue = Epilogue(),
    *,
    red_scale: Optional[torch.Tensor] = None,
    row_sum: bool = False,
    row_sum_weight: Optional[torch.Tensor] = None,
    a_copy: Optional[torch.Tensor] = None,
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
    """``out[M, N] = epilogue(A'[M, K] @ b[N, K]^T)`` (see :mod:`vitkern.ops.gemm.kernels`), with
    ``A' = a * red_scale[None, :]`` when ``red_scale`` (a ``(K,)`` vector) is given.

    ``a``, ``b``, ``out`` and the epilogue's matrices are 2-D views with any strides. Returns
    ``(out, row_sums, row_dots)``: with ``row_sum`` the fp32 ``(M,)`` sums of ``A'`` over K, with
    ``epilogue.row_dot`` (an ``(M, N)`` tensor W) the fp32 ``(M,)`` values
    ``sum_n acc[m, n] * W[m, n]`` of the pre-scale accumulator. ``row_sum_weight`` (a ``(K,)``
    vector, with ``row_sum``) weights the row sums: ``sum_k A'[m, k] * w[k]`` (one fp32 value a row,
    from the tiles the GEMM reads anyway: no pass over A). ``a_copy`` (an ``(M, K)`` tensor of
    ``b``'s dtype, any strides) receives ``A'`` as the dot reads it, rounded to ``b``'s dtype: the
    backward's float32 gradient written once in the 16-bit compute dtype while this GEMM reads it,
    so the next GEMM on the same gradient (the dW GEMM) reads half the bytes. ``split_k`` (None:
    :func:`~vitkern.ops.gemm.configs.plan_gemm` decides, for split-safe epilogues, against the
    free SMs) splits the reduction; each split
    writes an fp32 partial (and its row-sum partial) to a workspace that is summed here in a fixed
    order: deterministic, no atomics.

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
    n_out = N * epilogue.out_cols  # glu_grad: the packed (dg, dv), two output columns per column
    if col_map is not None and row_map is None:
        raise ValueError("gemm: col_map needs row_map")
    if epilogue.glu_grad and (row_map is not None or tuple(epilogue.aux.shape) != (M, n_out)):
        raise ValueError(f"gemm: glu_grad needs an ({M}, {n_out}) aux and no row map, got aux "
                         f"{tuple(epilogue.aux.shape)}")
    if b.shape[1] != K or (row_map is None and tuple(out.shape) != (M, n_out)) or (
            col_map is None and out.shape[-1] != n_out):
        raise ValueError(f"gemm: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)} do not match")
    if (a_gather is not None or row_map is not None) and K == 0:
        raise ValueError("gemm: K = 0 with a gather / row map")
    if a_copy is not None and (a_gather is not None or tuple(a_copy.shape) != (M, K) or a_copy.dtype != b.dtype):
        raise ValueError(f"gemm: a_copy must be an ({M}, {K}) tensor of b's dtype {b.dtype} (no gather), got "
                         f"{tuple(a_copy.shape)} {a_copy.dtype}")
    if row_sum_weight is not None and (not row_sum or tuple(row_sum_weight.shape) != (K,)):
        raise ValueError(f"gemm: row_sum_weight must be a ({K},) vector given with row_sum, got "
                         f"{tuple(row_sum_weight.shape)} (row_sum={row_sum})")
    dev = a.device
    row_sums = torch.zeros(M, device=dev, dtype=torch.float32) if row_sum else None
    row_dots = torch.zeros(M, device=dev, dtype=torch.float32) if epilogue.row_dot is not None else None
    if M == 0 or N == 0:
        if (row_sum or a_copy is not None) and M and K and a_gather is None:  # no output columns, but A' has rows
            a32 = a.float() if red_scale is None else a.float() * red_scale.float()[None, :]
            if row_sum:
                w32 = row_sum_weight.float()[None, :] if row_sum_weight is not None else 1.0
                row_sums = (a32.to(b.dtype).float() * w32).sum(1)
            if a_copy is not None:
                a_copy.copy_(a32)
        return out, row_sums, row_dots
    # the epilogue reads its vectors with unit stride (the views below replace the epilogue's
    # tensors; which steps run, its constexprs, stays)
    bias, col_scale, row_scale, red_scale, row_sum_weight = contiguous_vectors(
        epilogue.bias, epilogue.col_scale, epilogue.row_scale, red_scale, row_sum_weight)
    if K == 0:  # an empty reduction: the epilogue of a zero accumulator (a_copy is empty)
        a_copy = None
        a = torch.zeros((M, 1), device=dev, dtype=a.dtype)
        b = torch.zeros((N, 1), device=dev, dtype=b.dtype)
        K = 1
        red_scale = row_sum_weight = None  # K-indexed, empty: the zero operands need neither
    arch = device_arch(dev if dev.type == "cuda" else None)
    sms = available_sms(dev if dev.type == "cuda" else None)
    cfg = config if config is not None else select_config(M, N, K, b.dtype, arch, epilogue.kind, num_sms=sms)
    use_tma = cfg.tma and arch >= 90
    if config is None and wide_stand_in(cfg) is not None and not (
            a_gather is None and _operand_mode(a, use_tma) in (LOAD_TMA, LOAD_TMA_T)
            and _operand_mode(b, use_tma) in (LOAD_TMA, LOAD_TMA_T)):
        cfg = wide_stand_in(cfg)  # the 128 x 256 tile's registers hold with TMA loads only

    split_safe = epilogue.split_safe and row_map is None and prologue is None
    if split_k is not None and int(split_k) > 1 and not split_safe:
        raise ValueError("gemm: split-K needs a linear epilogue (no bias, activation, residual, pre or act_grad)")
    # the split (sized against the free SMs: VITKERN_SM_CARVEOUT), the grid, persistent or not
    plan = plan_gemm(M, N, K, cfg, sms, split_safe=split_safe,
                     row_sum=row_sum, split_k=split_k)
    num_parts_n = triton.cdiv(N, cfg.block_n) * cfg.epilogue_split  # row-dot partials: one per column slice
    split_k, per_split = plan.split_k, plan.k_tiles_per_split

    if split_k > 1:
        c = torch.empty((split_k, M, N), device=dev, dtype=torch.float32)
        c_view, stride_cs = c[0], c.stride(0)
        rs_buf = torch.empty((split_k, M), device=dev, dtype=torch.float32) if row_sum else None
    else:
        c, c_view, stride_cs = out, out, 0
        rs_buf = row_sums
    dp_buf = (torch.empty((split_k, num_parts_n, M), device=dev, dtype=torch.float32)
              if epilogue.row_dot is not None else None)

    a, b, residual, row_dot = _int32_views(a if a_gather is None else None, b, epilogue.residual,
                                           epilogue.row_dot, cfg, a)
    pre, aux = epilogue.pre, epilogue.aux
    for name, t in (("out", None if col_map is not None else c_view), ("pre", pre), ("aux", aux)):
        if t is not None:
            check_int32("gemm", f"{name} (column offsets)", (n_out if name != "pre" else N, t.stride(1)))
    if a_copy is not None:
        check_int32("gemm", "a_copy (column offsets)", (K, a_copy.stride(1)))
    a_mode = _operand_mode(a, use_tma) if a_gather is None else LOAD_PLAIN
    b_mode = _operand_mode(b, use_tma)
    mapped = row_map is not None
    c_mode = (LOAD_TMA if use_tma and split_k == 1 and not mapped and not epilogue.glu_grad and _tma_ok(c_view, 1)
              else LOAD_PLAIN)
    r_mode = LOAD_TMA if use_tma and residual is not None and not mapped and _tma_ok(residual, 1) else LOAD_PLAIN
    if LOAD_TMA in (a_mode, b_mode, c_mode, r_mode) or LOAD_TMA_T in (a_mode, b_mode):
        ensure_scratch_allocator()  # per thread: see its docstring
    persistent, progs = plan.persistent, plan.programs
    kcfg = cfg.kernel_config()
    if persistent != cfg.persistent:
        kcfg = KernelConfig({**kcfg.meta, "FLATTEN": persistent}, num_warps=kcfg.num_warps, num_stages=kcfg.num_stages)

    launch(
        _gemm_kernel, (progs, split_k),
        a, b, c_view,
        bias, col_scale, row_scale, red_scale, residual, pre, aux, rs_buf, row_sum_weight, row_dot, dp_buf, a_copy,
        M, N, K,
        *_strides(a), *_strides(b), *_strides(c_view), stride_cs,
        *_strides(residual), *_strides(pre), *_strides(aux), *_strides(row_dot), *_strides(a_copy),
        tuple(a_args), tuple(c_args),
        progs, per_split,
        A_MODE=a_mode, B_MODE=b_mode, C_MODE=c_mode, R_MODE=r_mode,
        EVEN_K=K % cfg.block_k == 0, SPLIT_K=split_k > 1,
        A_GATHER=a_gather, ROW_MAP=row_map, COL_MAP=col_map, PROLOGUE=prologue,
        HAS_RED_SCALE=red_scale is not None, ROW_SUM=row_sum, ROW_SUM_WEIGHTED=row_sum_weight is not None,
        A_COPY=a_copy is not None, **epilogue.constexprs(),
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
        torch.sum(dp_buf.view(split_k * num_parts_n, M), dim=0, out=row_dots)
    return out, row_sums, row_dots


_ACT_BWD_BLOCK = (64, 64)


def act_bwd(
    grad: torch.Tensor,
    pre: torch.Tensor,
    activation: Activation,
    out_dtype: torch.dtype,
    col_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    want_dscale: bool = False,
    want_drow: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dPre, dscale, drow)``: ``dPre = grad * row_scale * col_scale * act'(pre)`` (M, N) in
    ``out_dtype``; with ``want_dscale`` the fp32 (N,) LayerScale grad ``sum_m grad * row_scale *
    act(pre)``; with ``want_drow`` the fp32 (M,) row-scale grad ``sum_n grad * col_scale *
    act(pre)``. Both from per-block partials of the same pass, summed in a fixed order."""
    M, N = grad.shape
    col_scale, row_scale = contiguous_vectors(col_scale, row_scale)
    if not fits_int32((N, grad.stride(1))):  # column offsets are int32 in the kernel
        grad = grad.contiguous()
    check_int32("act_bwd", "pre (column offsets)", (N, pre.stride(1)))
    out = torch.empty((M, N), device=grad.device, dtype=out_dtype)
    bm, bn = _ACT_BWD_BLOCK
    grid_m = triton.cdiv(M, bm)
    grid_n = triton.cdiv(N, bn)
    part = torch.empty((grid_m, N), device=grad.device, dtype=torch.float32) if want_dscale else None
    rowpart = torch.empty((grid_n, M), device=grad.device, dtype=torch.float32) if want_drow else None
    if M and N:
        launch(_act_bwd_kernel, (grid_m, grid_n),
               grad, pre, out, col_scale, row_scale, part, rowpart, M, N,
               *_strides(grad), *_strides(pre), *_strides(out),
               BLOCK_M=bm, BLOCK_N=bn, ACTIVATION=int(activation),
               HAS_COL_SCALE=col_scale is not None, HAS_ROW_SCALE=row_scale is not None,
               WRITE_DSCALE=want_dscale, WRITE_DROW=want_drow, num_warps=4, num_stages=1)
    dscale = drow = None
    if capturing():
        return out, dscale, drow
    if want_dscale:
        dscale = part.sum(0) if M else torch.zeros(N, device=grad.device, dtype=torch.float32)
    if want_drow:
        drow = rowpart.sum(0) if N else torch.zeros(M, device=grad.device, dtype=torch.float32)
    return out, dscale, drow




def _rows_int32(name: str, t: torch.Tensor, block_rows: int, block_k: int) -> torch.Tensor:
    """``t`` (rows, K), or a copy of it, whose plain-load tile offsets fit in int32."""
    if _tile_int32_ok(t, block_rows, block_k):
        return t
    for copy in (t.contiguous(), t.t().contiguous().t()):
        if _tile_int32_ok(copy, block_rows, block_k):
            return copy
    raise ValueError(f"swiglu_gemm: operand {name} of shape {tuple(t.shape)} needs in-tile offsets past the "
                     f"kernels' int32 range (2^31 - 1) in any layout")


def swiglu_gemm(
    a: torch.Tensor,
    b_gate: torch.Tensor,
    b_value: torch.Tensor,
    out: torch.Tensor,
    bias_gate: Optional[torch.Tensor] = None,
    bias_value: Optional[torch.Tensor] = None,
    pre: Optional[torch.Tensor] = None,
    *,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """``out[M, N] = silu(a @ b_gate^T + bias_gate) * (a @ b_value^T + bias_value)`` in one GEMM
    (:func:`vitkern.ops.gemm.kernels._swiglu_gemm_kernel`): ``b_gate`` / ``b_value`` are ``(N, K)``
    views with any strides (the two row halves of a packed ``(2N, K)`` fc1 weight, or two
    weights); the biases ``(N,)`` (an absent one is zero). ``pre`` (``(M, 2N)``, any strides)
    receives the biased gate and value accumulators, gate columns first, for the backward."""
    M, K = a.shape
    N = b_gate.shape[0]
    if tuple(b_gate.shape) != (N, K) or tuple(b_value.shape) != (N, K) or tuple(out.shape) != (M, N):
        raise ValueError(f"swiglu_gemm: shapes a {tuple(a.shape)}, b_gate {tuple(b_gate.shape)}, b_value "
                         f"{tuple(b_value.shape)}, out {tuple(out.shape)} do not match")
    if pre is not None and tuple(pre.shape) != (M, 2 * N):
        raise ValueError(f"swiglu_gemm: pre must be ({M}, {2 * N}), got {tuple(pre.shape)}")
    if (bias_gate is None) != (bias_value is None):  # one switch in the kernel: the absent one is zero
        ref = bias_gate if bias_gate is not None else bias_value
        zero = torch.zeros(N, device=ref.device, dtype=ref.dtype)
        bias_gate, bias_value = (bias_gate if bias_gate is not None else zero,
                                 bias_value if bias_value is not None else zero)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty reduction: the gate of the biases alone
        zeros = torch.zeros(N, device=a.device, dtype=torch.float32)
        g = bias_gate.float() if bias_gate is not None else zeros
        v = bias_value.float() if bias_value is not None else zeros
        if pre is not None:
            pre.copy_(torch.cat((g, v)).expand(M, 2 * N))
        out.copy_((torch.nn.functional.silu(g) * v).expand(M, N))
        return out
    bias_gate, bias_value = contiguous_vectors(bias_gate, bias_value)
    dev = a.device
    arch = device_arch(dev if dev.type == "cuda" else None)
    cfg = config if config is not None else select_swiglu_config(M, N, K, b_gate.dtype, arch)
    a = _rows_int32("a", a, cfg.block_m, cfg.block_k)
    b_gate = _rows_int32("b_gate", b_gate, cfg.block_n, cfg.block_k)
    b_value = _rows_int32("b_value", b_value, cfg.block_n, cfg.block_k)
    check_int32("swiglu_gemm", "out (column offsets)", (N, out.stride(1)))
    if pre is not None:
        check_int32("swiglu_gemm", "pre (column offsets)", (2 * N, pre.stride(1)))
    grid = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    kcfg = KernelConfig({"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                         "GROUP_M": cfg.group_m}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    launch(
        _swiglu_gemm_kernel, (grid,),
        a, b_gate, b_value, out, bias_gate, bias_value, pre,
        M, N, K,
        *_strides(a), *_strides(b_gate), *_strides(b_value), *_strides(out), *_strides(pre),
        EVEN_K=K % cfg.block_k == 0, HAS_BIAS=bias_gate is not None, STORE_PRE=pre is not None,
        TF32=dot_precision(b_gate.dtype) == "tf32",
        config=kcfg,
    )
    return out


_SWIGLU_BWD_BLOCK = (64, 64)


def swiglu_bwd(grad: torch.Tensor, pre: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The packed ``(M, 2N)`` gradient ``(dg, dv)`` of SwiGLU's fc1 output from ``dH`` (``grad``,
    ``(M, N)``) and the packed pre-activation ``pre`` (``(M, 2N)``): ``dg = dH * v * silu'(g)``,
    ``dv = dH * silu(g)``, in ``out_dtype``, one elementwise pass (any strides)."""
    M, N = grad.shape
    if tuple(pre.shape) != (M, 2 * N):
        raise ValueError(f"swiglu_bwd: pre must be ({M}, {2 * N}), got {tuple(pre.shape)}")
    if not fits_int32((N, grad.stride(1))):
        grad = grad.contiguous()
    check_int32("swiglu_bwd", "pre (column offsets)", (2 * N, pre.stride(1)))
    out = torch.empty((M, 2 * N), device=grad.device, dtype=out_dtype)
    bm, bn = _SWIGLU_BWD_BLOCK
    if M and N:
        launch(_swiglu_bwd_kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
               grad, pre, out, M, N, *_strides(grad), *_strides(pre), *_strides(out),
               BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)
    return out
