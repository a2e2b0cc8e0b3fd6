"""The transformer MLP: ``fc2(act(fc1(x)))`` with the residual epilogue of ``linear`` on fc2.

Public function (re-exported as ``vitkern.mlp``)::

    h = act(x @ fc1_weight.T + fc1_bias)                  # stored in the compute dtype
    y = h @ fc2_weight.T + fc2_bias                       # no residual
    y = residual + row_scale[:, None] * residual_scale * (h @ fc2_weight.T + fc2_bias)

Backends are registered at the bottom of the module. Every implementation is called as
``impl(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation=..., residual=...,
residual_scale=..., row_scale=...)`` after the public function's checks and autocast casts
(``row_scale`` None or flattened to ``(M,)``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import (
    autocast_dtype,
    cast_floating,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
    contiguous_vectors,
)
from vitkern.ops.linear import (
    apply_activation,
    check_activation,
    check_epilogue,
    check_epilogue_dtypes,
    epilogue_ref,
)

__all__ = ["mlp", "mlp_ref"]


def mlp_ref(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference MLP (no argument checks; float64 accepted).

    fc1 in the operands' dtype, the activation in fp32 (fp64 for fp64) with the hidden activations
    stored once in the compute dtype, fc2, then :func:`vitkern.ops.linear.epilogue_ref`.
    """
    h = F.linear(x, fc1_weight, fc1_bias)
    if activation is not None:
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        h = apply_activation(h.to(acc), activation).to(x.dtype)
    y = F.linear(h, fc2_weight, fc2_bias)
    return epilogue_ref(y, None, residual, residual_scale, row_scale)


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Two-layer MLP ``fc2(act(fc1(x)))`` with ``linear``'s residual epilogue on fc2.

    Equals ``timm.layers.Mlp`` (no dropout, no norm) and, with a residual,
    ``residual + row_scale[:, None] * residual_scale * mlp(x)``.

    Args:
        x: ``(..., K)`` float32 / float16 / bfloat16 tensor, any leading shape and strides.
        fc1_weight: ``(H, K)``; fc1_bias: ``(H,)`` or None.
        fc2_weight: ``(N, H)``; fc2_bias: ``(N,)`` or None.
        activation: ``"gelu"`` (erf, default), ``"gelu_tanh"`` or None (identity).
        residual, residual_scale, row_scale: as in :func:`vitkern.linear` (output features ``N``).

    Returns:
        ``(..., N)`` tensor in the residual's dtype, else the compute dtype.

    Autocast: ``x``, the weights, the biases and ``residual_scale`` are cast to the autocast dtype;
    ``residual`` and ``row_scale`` keep theirs. Outside autocast those must share one dtype.

    Raises:
        TypeError / ValueError naming the offending argument (see :func:`vitkern.linear`);
        vitkern.BackendUnavailableError when the explicitly selected backend cannot run this call.
    """
    check_tensor("x", x, min_ndim=1)
    k = x.shape[-1]
    check_tensor("fc1_weight", fc1_weight, ndim=2)
    if fc1_weight.shape[1] != k:
        raise ValueError(
            f"fc1_weight must have shape (hidden, {k}) (nn.Linear layout, K = x.shape[-1] = {k}), "
            f"got {tuple(fc1_weight.shape)}"
        )
    hidden = fc1_weight.shape[0]
    check_optional_tensor("fc1_bias", fc1_bias, shape=(hidden,))
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    if fc2_weight.shape[1] != hidden:
        raise ValueError(
            f"fc2_weight must have shape (N, {hidden}) (its input width is fc1's output width "
            f"{hidden}), got {tuple(fc2_weight.shape)}"
        )
    n = fc2_weight.shape[0]
    check_optional_tensor("fc2_bias", fc2_bias, shape=(n,))
    activation = check_activation(activation)
    row_scale = check_epilogue(x, n, residual, residual_scale, row_scale)
    device = check_same_device(
        x=x,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
        residual=residual,
        residual_scale=residual_scale,
        row_scale=row_scale,
    )
    ac = autocast_dtype(device)
    if ac is not None:
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual_scale = cast_floating(
            ac, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual_scale
        )
    else:
        check_same_dtype(
            x=x,
            fc1_weight=fc1_weight,
            fc1_bias=fc1_bias,
            fc2_weight=fc2_weight,
            fc2_bias=fc2_bias,
            residual_scale=residual_scale,
        )
    check_epilogue_dtypes(x.dtype, residual, row_scale)
    # every backend reads the vectors as contiguous
    fc1_bias, fc2_bias, residual_scale, row_scale = contiguous_vectors(fc1_bias, fc2_bias, residual_scale, row_scale)
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    kwargs = dict(activation=activation, residual=residual, residual_scale=residual_scale, row_scale=row_scale)
    impl = select_impl("mlp", device, *args, **kwargs)
    return impl(*args, **kwargs)


register_impl("mlp", "reference", mlp_ref)


# --------------------------------------------------------------------------------------------
# Triton backend: two fused GEMMs forward, four backward (vitkern.ops._gemm)
# --------------------------------------------------------------------------------------------
#
# Forward: fc1 with bias + activation in the epilogue writes h = act(x @ W1^T + b1); when autograd
# records, the same epilogue also writes the pre-activation p = x @ W1^T + b1 (one extra write of
# h's size). fc2 runs linear's residual epilogue (bias, LayerScale, drop path, residual).
#
# What backward keeps: x, h (fc2's input, needed for dW2 as in eager PyTorch) and p (for act').
# Storing p was chosen over recomputing it: recomputing is a third (M x H x K) GEMM in backward
# (+1/6 of the MLP's training FLOPs), against one extra M x H write in the fc1 epilogue (for
# ViT-B at batch 64: 77 MB, ~26 us at 3 TB/s, vs ~74 us for the GEMM at 800 TFLOP/s) that
# overlaps the GEMM's math. Recomputing h = act(p) inside the dW2 GEMM instead of keeping h was
# rejected too: act would run once per (D / BLOCK_M) output row tiles, and an erf per element of
# a 64 x 128 B tile costs more issue slots than the tile's wgmma. A GPU session measures both.
#
# Backward, g = dY (the residual's grad is g itself):
#   dP  = (row_scale * (g @ (gamma * W2))) * act'(p)   one GEMM, act' fused in its epilogue
#   dW2 = gamma * (g^T @ (row_scale * h))              + row sums (db2) and ROW_DOT (dgamma)
#   dX  = dP @ W1
#   dW1 = dP^T @ x                                     + row sums of dP^T (db1)

from vitkern.ops import _gemm  # noqa: E402
from vitkern.ops._common import kernel_op  # noqa: E402


def _mlp_fwd_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, residual_scale, row_scale,
                  activation, save_pre):
    m, hidden, n = x.shape[0], fc1_weight.shape[0], fc2_weight.shape[0]
    y = x.new_empty((m, n), dtype=residual.dtype if residual is not None else x.dtype)
    pre = x.new_empty((m, hidden) if save_pre else (0,))
    h = x.new_empty((m, hidden))
    return y, pre, h


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, gamma, row_scale, activation, save_pre = inputs
    ctx.activation = activation
    ctx.has_residual = residual is not None
    ctx.has_b1 = b1 is not None
    _, pre, h = output
    ctx.save_for_backward(x, w1, w2, b2, gamma, row_scale, pre, h)


def _mlp_backward(ctx, grad, _grad_pre, _grad_h):
    x, w1, w2, b2, gamma, row_scale, pre, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    outs = torch.ops.vitkern.mlp_bwd(
        grad, x, w1, w2, b2, gamma, row_scale, pre, h, ctx.activation,
        need[0], need[1], bool(need[2] and ctx.has_b1), need[3], bool(need[4] and b2 is not None),
        bool(need[6] and gamma is not None), bool(need[7] and row_scale is not None),
    )
    dx, dw1, db1, dw2, db2, dgamma, drs = outs
    return (
        dx if need[0] else None,
        dw1 if need[1] else None,
        db1 if need[2] and ctx.has_b1 else None,
        dw2 if need[3] else None,
        db2 if need[4] and b2 is not None else None,
        grad if need[5] and ctx.has_residual else None,
        dgamma if need[6] and gamma is not None else None,
        drs if need[7] and row_scale is not None else None,
        None,
        None,
    )


@kernel_op("vitkern::mlp_fwd", fake=_mlp_fwd_fake, setup_context=_mlp_setup, backward=_mlp_backward)
def _mlp_fwd_op(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    activation: Optional[str],
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, hidden, n = x.shape[0], fc1_weight.shape[0], fc2_weight.shape[0]
    dev = x.device
    save_pre = save_pre and activation is not None
    h = torch.empty((m, hidden), device=dev, dtype=x.dtype)
    pre = torch.empty((m, hidden) if save_pre else (0,), device=dev, dtype=x.dtype)
    _gemm.gemm(x, fc1_weight, h, bias=fc1_bias, activation=_gemm.ACTIVATION_IDS[activation],
               pre=pre if save_pre else None)
    y = torch.empty((m, n), device=dev, dtype=residual.dtype if residual is not None else x.dtype)
    _gemm.gemm(h, fc2_weight, y, bias=fc2_bias, col_scale=residual_scale, row_scale=row_scale, residual=residual)
    return y, pre, h


def _mlp_bwd_fake(grad, x, fc1_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h, activation,
                  need_dx, need_dw1, need_db1, need_dw2, need_db2, need_dscale, need_drs):
    m, k = x.shape
    hidden, n = fc1_weight.shape[0], fc2_weight.shape[0]
    e = (0,)
    return (
        x.new_empty((m, k) if need_dx else e),
        x.new_empty((hidden, k) if need_dw1 else e),
        x.new_empty((hidden,) if need_db1 else e),
        x.new_empty((n, hidden) if need_dw2 else e),
        x.new_empty((n,) if need_db2 else e),
        x.new_empty((n,) if need_dscale else e),
        x.new_empty((m,) if need_drs else e, dtype=row_scale.dtype if row_scale is not None else x.dtype),
    )


def mlp_backward(grad, x, fc1_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h, activation,
                 need_dx=True, need_dw1=True, need_db1=True, need_dw2=True, need_db2=True, need_dscale=True,
                 need_drs=False):
    """The gradients of :func:`mlp`'s branch on the GEMM core (see the section comment).
    Returns ``(dx, dw1, db1, dw2, db2, dgamma, drow_scale)``, None for those not asked for."""
    m, k = x.shape
    hidden, n = fc1_weight.shape[0], fc2_weight.shape[0]
    dev, cdt = x.device, x.dtype
    act = _gemm.ACTIVATION_IDS[activation]
    gamma = residual_scale
    dx = dw1 = db1 = dw2 = db2 = dgamma = drs = None
    w2g = fc2_weight if gamma is None else (fc2_weight.float() * gamma.float()[:, None]).to(cdt)
    # dP = act'(p) * row_scale * (g @ (gamma * W2))  (+ rowdot with h for the row_scale grad)
    need_dp = need_dx or need_dw1 or need_db1
    if need_dp or need_drs:
        dp = torch.empty((m, hidden), device=dev, dtype=cdt)
        _, _, rdot = _gemm.gemm(grad, w2g.t(), dp, row_scale=row_scale, act_grad=act,
                                aux=pre if act != _gemm.ACT_NONE else None, row_dot=h if need_drs else None)
        if need_drs:
            if fc2_bias is not None:
                gb = fc2_bias.float() * (gamma.float() if gamma is not None else 1.0)
                rdot = rdot + grad.float() @ gb
            drs = rdot.to(row_scale.dtype)
    if need_dw2 or need_db2 or need_dscale:
        dw2 = torch.empty((n, hidden), device=dev, dtype=fc2_weight.dtype)
        want_sum = need_db2 or (need_dscale and fc2_bias is not None)
        _, s, rdot = _gemm.gemm(grad.t(), h.t(), dw2, red_scale=row_scale, row_scale=gamma, row_sum=want_sum,
                                row_dot=fc2_weight if need_dscale else None)
        if need_db2:
            db2 = (s if gamma is None else s * gamma.float()).to(fc2_bias.dtype)
        if need_dscale:
            dgamma = (rdot if fc2_bias is None else rdot + fc2_bias.float() * s).to(gamma.dtype)
    if need_dx:
        dx = torch.empty((m, k), device=dev, dtype=cdt)
        _gemm.gemm(dp, fc1_weight.t(), dx)
    if need_dw1 or need_db1:
        dw1 = torch.empty((hidden, k), device=dev, dtype=fc1_weight.dtype)
        _, s1, _ = _gemm.gemm(dp.t(), x.t(), dw1, row_sum=need_db1)
        if need_db1:
            db1 = s1.to(cdt)
    return dx, dw1 if need_dw1 else None, db1, dw2 if need_dw2 else None, db2, dgamma, drs


@kernel_op("vitkern::mlp_bwd", fake=_mlp_bwd_fake)
def _mlp_bwd_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    pre: torch.Tensor,
    h: torch.Tensor,
    activation: Optional[str],
    need_dx: bool,
    need_dw1: bool,
    need_db1: bool,
    need_dw2: bool,
    need_db2: bool,
    need_dscale: bool,
    need_drs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad, x, fc1_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h, activation,
            need_dx, need_dw1, need_db1, need_dw2, need_db2, need_dscale, need_drs)
    outs = mlp_backward(*args)
    return tuple(o if o is not None else torch.empty_like(f) for o, f in zip(outs, _mlp_bwd_fake(*args)))


def mlp_triton(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The "triton" backend of :func:`mlp` (arguments already checked and cast)."""
    k = x.shape[-1]
    n = fc2_weight.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)  # not reshape(-1, k): that is ambiguous for k = 0
    x2 = x.reshape(m, k)
    res2 = residual.reshape(m, n) if residual is not None else None
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual_scale, row_scale))
    save_pre = activation is not None and needs
    y, _, _ = torch.ops.vitkern.mlp_fwd(x2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, res2, residual_scale,
                                        row_scale, activation, save_pre)
    return y.reshape(*lead, n)


register_impl("mlp", "triton", mlp_triton)
