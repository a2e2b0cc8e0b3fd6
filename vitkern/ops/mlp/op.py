"""The Triton backend of ``mlp``: the registered ops ``vitkern::mlp_fwd`` / ``vitkern::mlp_bwd``
(fakes, autograd through :mod:`vitkern.ops._autograd`) and the backend's implementation function.
The kernels run in :mod:`vitkern.ops.mlp.launch`, imported where they are called (this module
imports no Triton)."""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._autograd import fill_outputs, kernel_op, requires_grad
from vitkern.ops.activation import Activation
from vitkern.ops.linear.rows import as_rows

__all__ = ["mlp_triton"]


def _mlp_fwd_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, residual_scale, row_scale,
                  activation, save_pre):
    m, hidden, n = x.shape[0], fc1_weight.shape[0], fc2_weight.shape[0]
    y = x.new_empty((m, n), dtype=residual.dtype if residual is not None else x.dtype)
    pre = x.new_empty((m, hidden) if save_pre else (0,))
    h = x.new_empty((m, hidden))
    return y, pre, h


def _mlp_save(inputs, outputs):
    x, w1, _b1, w2, b2, _residual, gamma, row_scale, activation, _save_pre = inputs
    _, pre, h = outputs
    return (x, w1, w2, b2, gamma, row_scale, pre, h), activation


def _mlp_backward(activation, saved, grads, need):
    x, w1, w2, b2, gamma, row_scale, pre, h = saved
    grad = grads[0]
    dx, dw1, db1, dw2, db2, dgamma, drs = torch.ops.vitkern.mlp_bwd(
        grad, x, w1, w2, b2, gamma, row_scale, pre, h, activation,
        need[0], need[1], need[2], need[3], need[4], need[6], need[7],
    )
    return dx, dw1, db1, dw2, db2, grad, dgamma, drs, None, None


@kernel_op("vitkern::mlp_fwd", fake=_mlp_fwd_fake, save=_mlp_save, backward=_mlp_backward)
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
    from vitkern.ops.mlp import launch as _launch

    m, hidden = x.shape[0], fc1_weight.shape[0]
    save_pre = save_pre and activation is not None
    pre = torch.empty((m, hidden) if save_pre else (0,), device=x.device, dtype=x.dtype)
    y, h = _launch.mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, residual_scale, row_scale,
                               Activation.parse(activation), pre if save_pre else None)
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
    from vitkern.ops.mlp import launch as _launch

    args = (grad, x, fc1_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h, activation,
            need_dx, need_dw1, need_db1, need_dw2, need_db2, need_dscale, need_drs)
    outs = _launch.mlp_backward(*args[:9], Activation.parse(activation), *args[10:])
    return fill_outputs(outs, _mlp_bwd_fake(*args))


def mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, activation="gelu", residual=None,
               residual_scale=None, row_scale=None):
    """The "triton" backend of :func:`vitkern.mlp` (arguments already checked and cast)."""
    x2, res2, out_shape = as_rows(x, residual, fc2_weight.shape[0])
    save_pre = activation is not None and requires_grad(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual_scale, row_scale)
    y, _, _ = torch.ops.vitkern.mlp_fwd(x2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, res2, residual_scale,
                                        row_scale, activation, save_pre)
    return y.reshape(out_shape)
