"""The Triton backend's launchers of ``swiglu`` / ``swiglu_mlp`` on the GEMM core
(:mod:`vitkern.ops.gemm`).

Forward: one SwiGLU GEMM (:func:`vitkern.ops.gemm.launch.swiglu_gemm`) whose tile accumulates the
gate rows and the value rows of the same output columns, adds both biases and stores only
``h = silu(g) * v`` (T, H) in the compute dtype; the (T, 2H) fc1 output is never written, except
the pre-activation backward needs. fc2 runs linear's residual epilogue (bias, LayerScale, drop
path, residual).

What backward keeps: x, h (fc2's input, for dW2, as eager PyTorch keeps it) and the packed
pre-activation ``(g, v)`` (T, 2H), written by the forward's epilogue in the compute dtype when
autograd records. Stored rather than recomputed: recomputing g and v is the fc1 GEMM again
(2 * T * 2H * K FLOPs, a third of the MLP's forward FLOPs, +1/6 of its training FLOPs), against
one extra write of 2 * T * 2H bytes (16-bit) in the forward and one read in the dH epilogue. For
a ViT-g block (K = 1536, H = 4096) at batch 64 (T = 16448 rows): the write is 2 * 16448 * 8192 =
269 MB, ~90 us at 3 TB/s (H100), overlapping the GEMM's math; the recomputation is 0.41 TFLOP,
~520 us at 800 TFLOP/s. (timm's eager GluMlp keeps the same (T, 2H) fc1 output for autograd, and
silu's input and output besides: vitkern keeps less.)

Backward, grad = dY (the residual's grad is grad itself):
  dH -> (dg, dv) = one GEMM, ``dH = row_scale * (grad @ (gamma * W2))``, whose epilogue
                   (``Epilogue(glu_grad=True)``) reads g and v and writes the packed (T, 2H)
                   gradient of fc1's output: dg = dH * v * silu'(g), dv = dH * silu(g); the
                   row-scale grad from its tiles (row dots with h, weighted row sums of grad)
  dW2 = gamma * (grad^T @ (row_scale * h))     + row sums (db2) and row dots (dgamma)
  dX  = (dg, dv) @ W1                         (the packed weight; the two separate weights are
                                               concatenated for this GEMM: a (2H, K) copy)
  dW1 = (dg, dv)^T @ x                        + row sums (db1): one GEMM for the packed weight,
                                               one per weight (column halves) for two weights
Without fc2 (``swiglu``, where a norm sits between the gate and fc2) the gate's backward is one
elementwise pass (:func:`vitkern.ops.gemm.launch.swiglu_bwd`) on the dH the norm's backward gives.
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops.gemm import Epilogue
from vitkern.ops.gemm.launch import gemm, swiglu_bwd, swiglu_gemm
from vitkern.ops.linear.launch import _gamma_bias, _narrows

__all__ = ["swiglu_forward", "swiglu_backward", "split_fc1"]


def split_fc1(fc1_weight, fc1_bias, value_weight, value_bias):
    """``(w_gate, w_value, b_gate, b_value)`` views: the row halves of the packed weight (and
    bias) when ``value_weight`` is None, else the two weights as given."""
    if value_weight is not None:
        return fc1_weight, value_weight, fc1_bias, value_bias
    hidden = fc1_weight.shape[0] // 2
    bg = fc1_bias[:hidden] if fc1_bias is not None else None
    bv = fc1_bias[hidden:] if fc1_bias is not None else None
    return fc1_weight[:hidden], fc1_weight[hidden:], bg, bv


def swiglu_forward(x, fc1_weight, fc1_bias, value_weight, value_bias, fc2_weight, fc2_bias, residual,
                   residual_scale, row_scale, pre: Optional[torch.Tensor]):
    """``(y, h)``: the MLP's output (M, N) and the gate's output h (M, H); without ``fc2_weight``
    ``y`` is h itself (and ``h`` None). With ``pre`` (M, 2H) the pre-activation is stored there."""
    wg, wv, bg, bv = split_fc1(fc1_weight, fc1_bias, value_weight, value_bias)
    m, hidden = x.shape[0], wg.shape[0]
    h = torch.empty((m, hidden), device=x.device, dtype=x.dtype)
    swiglu_gemm(x, wg, wv, h, bg, bv, pre)
    if fc2_weight is None:
        return h, None
    y = torch.empty((m, fc2_weight.shape[0]), device=x.device,
                    dtype=residual.dtype if residual is not None else x.dtype)
    gemm(h, fc2_weight, y, Epilogue(bias=fc2_bias, col_scale=residual_scale, row_scale=row_scale, residual=residual))
    return y, h


def swiglu_backward(grad, x, fc1_weight, value_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h,
                    need_dx=True, need_dw1=True, need_db1=True, need_dwv=True, need_dbv=True, need_dw2=True,
                    need_db2=True, need_dscale=True, need_drs=False):
    """The gradients (see the module docstring). ``grad`` is dY, or dH without fc2. Returns
    ``(dx, dw1, db1, dwv, dbv, dw2, db2, dgamma, drow_scale)``, None for those not asked for."""
    m, k = x.shape
    packed = value_weight is None
    hidden = fc1_weight.shape[0] // 2 if packed else fc1_weight.shape[0]
    dev, cdt = x.device, x.dtype
    gamma = residual_scale
    need_dscale = need_dscale and gamma is not None  # (the defaults ask for every gradient there is)
    need_drs = need_drs and row_scale is not None
    dx = dw1 = db1 = dwv = dbv = dw2 = db2 = dgamma = drs = None
    need_dpre = need_dx or need_dw1 or need_db1 or need_dwv or need_dbv
    dpre = None
    if fc2_weight is None:
        if need_dpre:
            dpre = swiglu_bwd(grad, pre, cdt)
    else:
        n = fc2_weight.shape[0]
        w2g = fc2_weight if gamma is None else (fc2_weight.float() * gamma.float()[:, None]).to(cdt)
        g16 = None
        want_dw2 = need_dw2 or need_db2 or need_dscale
        if need_dpre or need_drs:
            dpre = torch.empty((m, 2 * hidden), device=dev, dtype=cdt)
            ep = Epilogue(row_scale=row_scale, glu_grad=True, aux=pre, row_dot=h if need_drs else None)
            g16 = torch.empty((m, n), device=dev, dtype=cdt) if want_dw2 and _narrows(grad, cdt) else None
            gb = _gamma_bias(gamma, fc2_bias) if need_drs else None
            _, rsum, rdot = gemm(grad, w2g.t(), dpre, ep, row_sum=gb is not None, row_sum_weight=gb, a_copy=g16)
            if need_drs:
                drs = (rdot if gb is None else rdot + rsum).to(row_scale.dtype)
        if want_dw2:
            dw2 = torch.empty((n, hidden), device=dev, dtype=fc2_weight.dtype)
            want_sum = need_db2 or (need_dscale and fc2_bias is not None)
            ep = Epilogue(row_scale=gamma, row_dot=fc2_weight if need_dscale else None)
            g_dw2 = g16 if g16 is not None else grad
            _, s, rdot = gemm(g_dw2.t(), h.t(), dw2, ep, red_scale=row_scale, row_sum=want_sum)
            if need_db2:
                db2 = (s if gamma is None else s * gamma.float()).to(fc2_bias.dtype)
            if need_dscale:
                dgamma = (rdot if fc2_bias is None else rdot + fc2_bias.float() * s).to(gamma.dtype)
    if need_dx:
        dx = torch.empty((m, k), device=dev, dtype=cdt)
        w_cat = fc1_weight if packed else torch.cat((fc1_weight, value_weight))
        gemm(dpre, w_cat.t(), dx)

    def dw(rows, weight, want_bias):
        out = torch.empty((rows.shape[1], k), device=dev, dtype=weight.dtype)
        _, s1, _ = gemm(rows.t(), x.t(), out, row_sum=want_bias)
        return out, (s1.to(cdt) if want_bias else None)

    if packed:
        if need_dw1 or need_db1:
            dw1, db1 = dw(dpre, fc1_weight, need_db1)
    else:
        if need_dw1 or need_db1:
            dw1, db1 = dw(dpre[:, :hidden], fc1_weight, need_db1)
        if need_dwv or need_dbv:
            dwv, dbv = dw(dpre[:, hidden:], value_weight, need_dbv)
    return (dx, dw1 if need_dw1 else None, db1, dwv if need_dwv else None, dbv, dw2 if need_dw2 else None, db2,
            dgamma, drs)
