"""The Triton backend of ``linear``: the registered ops ``vitkern::linear_fwd`` /
``vitkern::linear_bwd`` (fakes, autograd through :mod:`vitkern.ops._autograd`) and the backend's
implementation function. The kernels run in :mod:`vitkern.ops.linear.launch`, imported where they
are called (this module imports no Triton)."""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._autograd import fill_outputs, kernel_op, requires_grad
from vitkern.ops.activation import Activation
from vitkern.ops.linear.rows import as_rows

__all__ = ["linear_triton"]


def _linear_fwd_fake(x, weight, bias, residual, residual_scale, row_scale, activation, save_pre):
    m, n = x.shape[0], weight.shape[0]
    y = x.new_empty((m, n), dtype=residual.dtype if residual is not None else x.dtype)
    pre = x.new_empty((m, n) if save_pre else (0,))
    return y, pre


def _linear_save(inputs, outputs):
    x, weight, bias, _residual, residual_scale, row_scale, activation, _save_pre = inputs
    return (x, weight, bias, residual_scale, row_scale, outputs[1]), activation


def _linear_backward(activation, saved, grads, need):
    x, weight, bias, residual_scale, row_scale, pre = saved
    grad = grads[0]
    dx, dw, db, dgamma, drs = torch.ops.vitkern.linear_bwd(
        grad, x, weight, bias, residual_scale, row_scale, pre, activation, need[0], need[1], need[2], need[4], need[5]
    )
    return dx, dw, db, grad, dgamma, drs, None, None


@kernel_op("vitkern::linear_fwd", fake=_linear_fwd_fake, save=_linear_save, backward=_linear_backward)
def _linear_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    activation: Optional[str],
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from vitkern.ops.linear import launch as _launch

    m, n = x.shape[0], weight.shape[0]
    pre = torch.empty((m, n) if save_pre else (0,), device=x.device, dtype=x.dtype)
    y = _launch.linear_forward(x, weight, bias, residual, residual_scale, row_scale, Activation.parse(activation),
                               pre if save_pre else None)
    return y, pre


def _linear_bwd_fake(grad, x, weight, bias, residual_scale, row_scale, pre, activation,
                     need_dx, need_dw, need_db, need_dscale, need_drs):
    m, k = x.shape
    n = weight.shape[0]
    return (
        x.new_empty((m, k) if need_dx else (0,)),
        weight.new_empty((n, k) if need_dw else (0,)),
        x.new_empty((n,) if need_db else (0,), dtype=bias.dtype if bias is not None else x.dtype),
        x.new_empty((n,) if need_dscale else (0,),
                    dtype=residual_scale.dtype if residual_scale is not None else x.dtype),
        x.new_empty((m,) if need_drs else (0,), dtype=row_scale.dtype if row_scale is not None else x.dtype),
    )


@kernel_op("vitkern::linear_bwd", fake=_linear_bwd_fake)
def _linear_bwd_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    pre: torch.Tensor,
    activation: Optional[str],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_dscale: bool,
    need_drs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.linear import launch as _launch

    args = (grad, x, weight, bias, residual_scale, row_scale, pre, activation,
            need_dx, need_dw, need_db, need_dscale, need_drs)
    outs = _launch.linear_backward(*args[:7], Activation.parse(activation), *args[8:])
    return fill_outputs(outs, _linear_bwd_fake(*args))


def linear_triton(x, weight, bias=None, *, activation=None, residual=None, residual_scale=None, row_scale=None):
    """The "triton" backend of :func:`vitkern.linear` (arguments already checked and cast)."""
    x2, res2, out_shape = as_rows(x, residual, weight.shape[0])
    save_pre = activation is not None and requires_grad(x, weight, bias, residual_scale, row_scale)
    y, _ = torch.ops.vitkern.linear_fwd(x2, weight, bias, res2, residual_scale, row_scale, activation, save_pre)
    return y.reshape(out_shape)
