"""The Triton backend's launchers of ``linear``: the GEMM core (:mod:`vitkern.ops.gemm`) with the
epilogue fused, forward and backward.

Forward: one GEMM, ``y = residual + row_scale * gamma * act(x @ W^T + b)``; with an activation
and autograd recording, the epilogue also stores the pre-activation ``x @ W^T + b`` (one extra
write of the output's size, cheaper than recomputing the GEMM in backward).

Backward, with g = dY (any strides; the residual's grad is g itself, returned without a copy):
  no activation (proj / fc2 style; gamma and row_scale are folded into the GEMMs):
    dX = row_scale * (g @ (gamma * W))                 epilogue row scale; gamma * W is (N, K)
    dW = gamma * (g^T @ (row_scale * x))               reduction-axis scale in the A load,
                                                       epilogue row scale (rows of dW are n)
    db = gamma * S,  S[n] = sum_m row_scale * g        row sums of the dW GEMM's A operand
    dgamma = rowdot(g^T @ (row_scale * x), W) + b * S  ROW_DOT in the dW epilogue: no pass
                                                       over the branch output, which is not kept
    drow_scale = rowdot(g @ (gamma * W), x) + g @ (gamma * b)   (only when it requires grad):
                                                       ROW_DOT and weighted row sums of g in
                                                       the dX GEMM, per-block fp32 partials
  with an activation: dPre = g * row_scale * gamma * act'(pre) in one elementwise pass (which
    also reduces dgamma and drow_scale as per-block partials), then dX = dPre @ W,
    dW = dPre^T @ x with db from the row sums. (The MLP fuses act' into the epilogue of its dU
    GEMM instead; see vitkern.ops.mlp.launch.)
The dW GEMMs split K (the token count) when the weight-sized output has too few tiles.
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops.activation import Activation
from vitkern.ops.gemm import Epilogue
from vitkern.ops.gemm.launch import act_bwd, gemm

__all__ = ["linear_forward", "linear_backward"]


def _gamma_bias(gamma: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``gamma * b`` in fp32 (the weights of the row-scale grad's bias term ``g @ (gamma * b)``),
    None without a bias."""
    if bias is None:
        return None
    return bias.float() * gamma.float() if gamma is not None else bias.float()


def _narrows(grad: torch.Tensor, compute: torch.dtype) -> bool:
    """A gradient wider than the 16-bit compute dtype (float32 dY of an fp32 residual stream):
    the first GEMM that reads it also writes it in the compute dtype for the next one."""
    return grad.dtype == torch.float32 and compute in (torch.float16, torch.bfloat16)


def linear_forward(x, weight, bias, residual, residual_scale, row_scale, activation: Activation,
                   pre: Optional[torch.Tensor]) -> torch.Tensor:
    """``y (M, N) = residual + row_scale * gamma * act(x @ W^T + b)``; with ``pre`` (M, N) also the
    pre-activation stored there."""
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=residual.dtype if residual is not None else x.dtype)
    gemm(x, weight, y, Epilogue(bias=bias, pre=pre, activation=activation, col_scale=residual_scale,
                                row_scale=row_scale, residual=residual))
    return y


def linear_backward(grad, x, weight, bias, residual_scale, row_scale, pre, activation: Activation,
                    need_dx=True, need_dw=True, need_db=True, need_dscale=True, need_drs=False,
                    split_k=None):
    """The gradients of ``linear``'s branch, on the GEMM core (see the module docstring).

    ``grad`` is dY ``(M, N)`` of the output's dtype (the residual's grad is ``grad`` itself).
    Returns ``(dx, dw, db, dgamma, drow_scale)``, None for those not asked for.
    """
    m, k = x.shape
    n = weight.shape[0]
    dev, cdt = x.device, x.dtype
    act = activation
    gamma = residual_scale
    dx = dw = db = dgamma = drs = None
    if act != Activation.NONE:
        a, dgamma32, drs32 = act_bwd(grad, pre, act, cdt, col_scale=gamma, row_scale=row_scale,
                                     want_dscale=need_dscale, want_drow=need_drs)
        w_eff, dx_rs, red, dw_rs = weight, None, None, None
        if need_dscale:
            dgamma = dgamma32.to(gamma.dtype)
        if need_drs:
            drs = drs32.to(row_scale.dtype)
    else:
        a = grad
        w_eff = weight if gamma is None else (weight.float() * gamma.float()[:, None]).to(cdt)
        dx_rs, red, dw_rs = row_scale, row_scale, gamma
    need_gemm_dw = need_dw or (need_dscale and act == Activation.NONE)
    if need_dx or (need_drs and act == Activation.NONE):
        dx = torch.empty((m, k), device=dev, dtype=cdt)
        # a float32 dY (the fp32 residual stream) is written in the compute dtype while the dX GEMM
        # reads it, and the dW GEMM reads that 16-bit copy
        a_copy = torch.empty((m, n), device=dev, dtype=cdt) if need_gemm_dw and _narrows(a, cdt) else None
        drs_rows = need_drs and act == Activation.NONE
        # the row-scale grad: rowdot(dX-before-scale, x) + g @ (gamma * b), both from this GEMM's
        # tiles (row dots in the epilogue, weighted row sums of A in the K loop)
        gb = _gamma_bias(gamma, bias) if drs_rows else None
        _, rsum, rdot = gemm(a, w_eff.t(), dx, Epilogue(row_scale=dx_rs, row_dot=x if drs_rows else None),
                             row_sum=gb is not None, row_sum_weight=gb, a_copy=a_copy)
        if a_copy is not None:
            a = a_copy
        if drs_rows:
            drs = (rdot if gb is None else rdot + rsum).to(row_scale.dtype)
    s = None
    if need_gemm_dw:
        dw = torch.empty((n, k), device=dev, dtype=weight.dtype)
        want_sum = need_db or (need_dscale and bias is not None and act == Activation.NONE)
        ep = Epilogue(row_scale=dw_rs, row_dot=weight if need_dscale and act == Activation.NONE else None)
        _, s, rdot = gemm(a.t(), x.t(), dw, ep, red_scale=red, row_sum=want_sum, split_k=split_k)
        if need_dscale and act == Activation.NONE:
            dg = rdot if bias is None else rdot + bias.float() * s
            dgamma = dg.to(gamma.dtype)
    elif need_db:  # a frozen weight with a trainable bias: the column sums alone
        a32 = a.float() if red is None else a.float() * red.float()[:, None]
        s = a32.sum(0)
    if need_db:
        db = (s if dw_rs is None else s * dw_rs.float()).to(bias.dtype)
    return dx if need_dx else None, dw if need_dw else None, db, dgamma, drs
