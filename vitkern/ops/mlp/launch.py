"""The Triton backend's launchers of ``mlp``: two fused GEMMs forward, four backward, on the GEMM
core (:mod:`vitkern.ops.gemm`).

Forward: fc1 with bias + activation in the epilogue writes h = act(x @ W1^T + b1); when autograd
records, the same epilogue also writes the pre-activation p = x @ W1^T + b1 (one extra write of
h's size). fc2 runs linear's residual epilogue (bias, LayerScale, drop path, residual).

What backward keeps: x, h (fc2's input, needed for dW2 as in eager PyTorch) and p (for act').
Storing p was chosen over recomputing it: recomputing is a third (M x H x K) GEMM in backward
(+1/6 of the MLP's training FLOPs), against one extra M x H write in the fc1 epilogue (for
ViT-B at batch 64: 77 MB, ~26 us at 3 TB/s, vs ~74 us for the GEMM at 800 TFLOP/s) that
overlaps the GEMM's math. Recomputing h = act(p) inside the dW2 GEMM instead of keeping h was
rejected too: act would run once per (D / BLOCK_M) output row tiles, and an erf per element of
a 64 x 128 B tile costs more issue slots than the tile's wgmma. A GPU session measures both.

Backward, g = dY (the residual's grad is g itself):
  dP  = (row_scale * (g @ (gamma * W2))) * act'(p)   one GEMM, act' fused in its epilogue; the
                                                     row-scale grad from its tiles (ROW_DOT with h,
                                                     weighted row sums of g for the bias term)
  dW2 = gamma * (g^T @ (row_scale * h))              + row sums (db2) and ROW_DOT (dgamma)
  dX  = dP @ W1
  dW1 = dP^T @ x                                     + row sums of dP^T (db1)
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops.activation import Activation
from vitkern.ops.gemm import Epilogue
from vitkern.ops.gemm.launch import gemm
from vitkern.ops.linear.launch import _gamma_bias, _narrows

__all__ = ["mlp_forward", "mlp_backward"]


def mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, residual_scale, row_scale,
                activation: Activation, pre: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)``: the output (M, N) and fc1's activated output (M, H); with ``pre`` (M, H) also
    fc1's pre-activation stored there."""
    m, hidden, n = x.shape[0], fc1_weight.shape[0], fc2_weight.shape[0]
    dev = x.device
    h = torch.empty((m, hidden), device=dev, dtype=x.dtype)
    gemm(x, fc1_weight, h, Epilogue(bias=fc1_bias, pre=pre, activation=activation))
    y = torch.empty((m, n), device=dev, dtype=residual.dtype if residual is not None else x.dtype)
    gemm(h, fc2_weight, y, Epilogue(bias=fc2_bias, col_scale=residual_scale, row_scale=row_scale, residual=residual))
    return y, h


def mlp_backward(grad, x, fc1_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h, activation: Activation,
                 need_dx=True, need_dw1=True, need_db1=True, need_dw2=True, need_db2=True, need_dscale=True,
                 need_drs=False):
    """The gradients of ``mlp``'s branch on the GEMM core (see the module docstring).
    Returns ``(dx, dw1, db1, dw2, db2, dgamma, drow_scale)``, None for those not asked for."""
    m, k = x.shape
    hidden, n = fc1_weight.shape[0], fc2_weight.shape[0]
    dev, cdt = x.device, x.dtype
    act = activation
    gamma = residual_scale
    dx = dw1 = db1 = dw2 = db2 = dgamma = drs = None
    w2g = fc2_weight if gamma is None else (fc2_weight.float() * gamma.float()[:, None]).to(cdt)
    # dP = act'(p) * row_scale * (g @ (gamma * W2))  (+ rowdot with h for the row_scale grad)
    need_dp = need_dx or need_dw1 or need_db1
    g16 = None
    if need_dp or need_drs:
        dp = torch.empty((m, hidden), device=dev, dtype=cdt)
        ep = Epilogue(row_scale=row_scale, act_grad=act, aux=pre if act != Activation.NONE else None,
                      row_dot=h if need_drs else None)
        # a float32 dY (the fp32 residual stream): written in the compute dtype while dP reads it,
        # so dW2 reads 16 bits
        want_dw2 = need_dw2 or need_db2 or need_dscale
        g16 = torch.empty((m, n), device=dev, dtype=cdt) if want_dw2 and _narrows(grad, cdt) else None
        # the row-scale grad's bias term g @ (gamma * b2): weighted row sums of this GEMM's A tiles
        gb = _gamma_bias(gamma, fc2_bias) if need_drs else None
        _, rsum, rdot = gemm(grad, w2g.t(), dp, ep, row_sum=gb is not None, row_sum_weight=gb, a_copy=g16)
        if need_drs:
            drs = (rdot if gb is None else rdot + rsum).to(row_scale.dtype)
    if need_dw2 or need_db2 or need_dscale:
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
        gemm(dp, fc1_weight.t(), dx)
    if need_dw1 or need_db1:
        dw1 = torch.empty((hidden, k), device=dev, dtype=fc1_weight.dtype)
        _, s1, _ = gemm(dp.t(), x.t(), dw1, row_sum=need_db1)
        if need_db1:
            db1 = s1.to(cdt)
    return dx, dw1 if need_dw1 else None, db1, dw2 if need_dw2 else None, db2, dgamma, drs
