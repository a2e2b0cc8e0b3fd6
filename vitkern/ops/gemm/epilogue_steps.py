"""The GEMM epilogue's steps as ``@triton.jit`` helpers, composed by the GEMM kernel in the order
listed in :mod:`vitkern.ops.gemm.epilogue`; each compiles to nothing when its switch is off.
``activation`` / ``activation_grad`` also serve the elementwise activation-backward kernel."""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import register_helper, round_to

@register_helper
@triton.jit
def activation(x, ACTIVATION: tl.constexpr):
    """act(x) in fp32: 1 = erf GELU, 2 = tanh GELU (0.5 * (1 + tanh(u)) == sigmoid(2u)),
    3 = QuickGELU x * sigmoid(1.702 x)."""
    if ACTIVATION == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 3:
        x = x * tl.sigmoid(1.702 * x)
    return x


@register_helper
@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx in fp32."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        g = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        g = s + 2.0 * x * s * (1.0 - s) * du
    elif ACTIVATION == 3:
        s = tl.sigmoid(1.702 * x)
        g = s + 1.702 * x * s * (1.0 - s)
    else:
        g = tl.full(x.shape, 1.0, tl.float32)
    return g


@register_helper
@triton.jit
def add_bias(acc, bias_ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr):
    """acc += bias[n]."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return acc


@register_helper
@triton.jit
def store_aux(acc, aux_ptr, rows, offs_n, stride_m, stride_n, mask, STORE: tl.constexpr):
    """aux[m, n] = acc, rounded to aux's dtype (``rows``: int64 row indices)."""
    if STORE:
        tl.store(aux_ptr + rows[:, None] * stride_m + offs_n[None, :] * stride_n,
                 round_to(acc, aux_ptr.dtype.element_ty), mask=mask)


@register_helper
@triton.jit
def row_dot(acc, w_ptr, part_ptr, rows, offs_m, offs_n, stride_wm, stride_wn, mask, mask_m, M, pid_n,
            ROW_DOT: tl.constexpr):
    """part[pid_n, m] = sum_n acc[m, n] * W[m, n] over this tile's columns (fp32 partials; the
    launcher sums them over the column tiles and splits)."""
    if ROW_DOT:
        w = tl.load(w_ptr + rows[:, None] * stride_wm + offs_n[None, :] * stride_wn, mask=mask, other=0.0)
        part = tl.sum(acc * w.to(tl.float32), axis=1)
        tl.store(part_ptr + pid_n.to(tl.int64) * M + offs_m, part, mask=mask_m)


@register_helper
@triton.jit
def scale_cols(acc, scale_ptr, offs_n, mask_n, HAS_SCALE: tl.constexpr):
    """acc *= scale[n] (LayerScale's gamma)."""
    if HAS_SCALE:
        cs = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * cs[None, :]
    return acc


@register_helper
@triton.jit
def scale_rows(acc, scale_ptr, offs_m, mask_m, HAS_SCALE: tl.constexpr):
    """acc *= scale[m] (drop path's per-sample scale)."""
    if HAS_SCALE:
        rs = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc * rs[:, None]
    return acc


@register_helper
@triton.jit
def mul_activation_grad(acc, aux_ptr, rows, offs_n, stride_m, stride_n, mask, ACT_GRAD: tl.constexpr):
    """acc *= act'(aux[m, n]): the activation's backward on the GEMM of its output gradient."""
    if ACT_GRAD != 0:
        x = tl.load(aux_ptr + rows[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask, other=0.0)
        acc = acc * activation_grad(x.to(tl.float32), ACT_GRAD)
    return acc


@register_helper
@triton.jit
def add_residual(acc, res_ptr, rows, offs_n, stride_m, stride_n, mask, HAS_RESIDUAL: tl.constexpr):
    """acc += residual[rows, n] (``rows``: the residual's row of each output row)."""
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows.to(tl.int64)[:, None] * stride_m + offs_n[None, :] * stride_n,
                    mask=mask, other=0.0)
        acc = acc + r.to(tl.float32)
    return acc


@register_helper
@triton.jit
def swiglu(g, v):
    """silu(g) * v in fp32: the SwiGLU gate on the gate and value accumulators."""
    return g * tl.sigmoid(g) * v


@register_helper
@triton.jit
def swiglu_grad_store(acc, aux_ptr, c_ptr, rows, offs_n, N, stride_xm, stride_xn, stride_cm, stride_cn, mask):
    """The SwiGLU backward on dH = acc: ``aux`` is the packed ``(M, 2N)`` pre-activation (gate
    columns ``[0, N)``, value columns ``[N, 2N)``); stores ``dg = dH * v * silu'(g)`` at C's columns
    ``n`` and ``dv = dH * silu(g)`` at ``N + n`` (C is the packed ``(M, 2N)`` gradient of fc1's
    output), with ``silu'(g) = s (1 + g (1 - s))``, ``s = sigmoid(g)``."""
    x_offs = rows[:, None] * stride_xm + offs_n[None, :] * stride_xn
    g = tl.load(aux_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(aux_ptr + N * stride_xn + x_offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    gs = g * s
    dv = acc * gs
    dg = acc * v * (s + gs * (1.0 - s))
    c_offs = rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptr + c_offs, round_to(dg, c_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + N * stride_cn + c_offs, round_to(dv, c_ptr.dtype.element_ty), mask=mask)
