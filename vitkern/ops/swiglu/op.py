"""The Triton backend of ``swiglu`` / ``swiglu_mlp``: the registered ops ``vitkern::swiglu_fwd``
/ ``vitkern::swiglu_bwd`` (fakes, autograd through :mod:`vitkern.ops._autograd`) and the
backend's implementation functions. One op pair serves both: ``fc2_weight`` None is the gate
alone (``swiglu``). The kernels run in :mod:`vitkern.ops.swiglu.launch`, imported where they are
called (this module imports no Triton)."""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._autograd import fill_outputs, kernel_op, requires_grad
from vitkern.ops.linear.rows import as_rows

__all__ = ["swiglu_triton", "swiglu_mlp_triton"]


def _hidden(fc1_weight, value_weight) -> int:
    return fc1_weight.shape[0] if value_weight is not None else fc1_weight.shape[0] // 2


def _swiglu_fwd_fake(x, fc1_weight, fc1_bias, value_weight, value_bias, fc2_weight, fc2_bias, residual,
                     residual_scale, row_scale, save_pre):
    m, hidden = x.shape[0], _hidden(fc1_weight, value_weight)
    n = fc2_weight.shape[0] if fc2_weight is not None else hidden
    y = x.new_empty((m, n), dtype=residual.dtype if residual is not None else x.dtype)
    pre = x.new_empty((m, 2 * hidden) if save_pre else (0,))
    h = x.new_empty((m, hidden) if fc2_weight is not None else (0,))
    return y, pre, h


def _swiglu_save(inputs, outputs):
    x, w1, _b1, wv, _bv, w2, b2, _residual, gamma, row_scale, _save_pre = inputs
    _, pre, h = outputs
    return (x, w1, wv, w2, b2, gamma, row_scale, pre, h), None


def _swiglu_backward(_state, saved, grads, need):
    x, w1, wv, w2, b2, gamma, row_scale, pre, h = saved
    grad = grads[0]
    dx, dw1, db1, dwv, dbv, dw2, db2, dgamma, drs = torch.ops.vitkern.swiglu_bwd(
        grad, x, w1, wv, w2, b2, gamma, row_scale, pre, h,
        need[0], need[1], need[2], need[3], need[4], need[5], need[6], need[8], need[9],
    )
    return dx, dw1, db1, dwv, dbv, dw2, db2, grad, dgamma, drs, None


@kernel_op("vitkern::swiglu_fwd", fake=_swiglu_fwd_fake, save=_swiglu_save, backward=_swiglu_backward)
def _swiglu_fwd_op(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    value_weight: Optional[torch.Tensor],
    value_bias: Optional[torch.Tensor],
    fc2_weight: Optional[torch.Tensor],
    fc2_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.swiglu import launch as _launch

    m, hidden = x.shape[0], _hidden(fc1_weight, value_weight)
    pre = torch.empty((m, 2 * hidden) if save_pre else (0,), device=x.device, dtype=x.dtype)
    y, h = _launch.swiglu_forward(x, fc1_weight, fc1_bias, value_weight, value_bias, fc2_weight, fc2_bias, residual,
                                  residual_scale, row_scale, pre if save_pre else None)
    if h is None:
        h = x.new_empty((0,))
    return y, pre, h


def _swiglu_bwd_fake(grad, x, fc1_weight, value_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h,
                     need_dx, need_dw1, need_db1, need_dwv, need_dbv, need_dw2, need_db2, need_dscale, need_drs):
    m, k = x.shape
    hidden = _hidden(fc1_weight, value_weight)
    n = fc2_weight.shape[0] if fc2_weight is not None else hidden
    e = (0,)
    return (
        x.new_empty((m, k) if need_dx else e),
        x.new_empty(tuple(fc1_weight.shape) if need_dw1 else e),
        x.new_empty((fc1_weight.shape[0],) if need_db1 else e),
        x.new_empty((hidden, k) if need_dwv else e),
        x.new_empty((hidden,) if need_dbv else e),
        x.new_empty((n, hidden) if need_dw2 else e),
        x.new_empty((n,) if need_db2 else e),
        x.new_empty((n,) if need_dscale else e),
        x.new_empty((m,) if need_drs else e, dtype=row_scale.dtype if row_scale is not None else x.dtype),
    )


@kernel_op("vitkern::swiglu_bwd", fake=_swiglu_bwd_fake)
def _swiglu_bwd_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    value_weight: Optional[torch.Tensor],
    fc2_weight: Optional[torch.Tensor],
    fc2_bias: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    pre: torch.Tensor,
    h: torch.Tensor,
    need_dx: bool,
    need_dw1: bool,
    need_db1: bool,
    need_dwv: bool,
    need_dbv: bool,
    need_dw2: bool,
    need_db2: bool,
    need_dscale: bool,
    need_drs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    from vitkern.ops.swiglu import launch as _launch

    args = (grad, x, fc1_weight, value_weight, fc2_weight, fc2_bias, residual_scale, row_scale, pre, h,
            need_dx, need_dw1, need_db1, need_dwv, need_dbv, need_dw2, need_db2, need_dscale, need_drs)
    outs = _launch.swiglu_backward(*args)
    return fill_outputs(outs, _swiglu_bwd_fake(*args))


def swiglu_mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, value_weight=None, value_bias=None,
                      residual=None, residual_scale=None, row_scale=None):
    """The "triton" backend of :func:`vitkern.swiglu_mlp` (arguments already checked and cast)."""
    x2, res2, out_shape = as_rows(x, residual, fc2_weight.shape[0])
    save_pre = requires_grad(x, fc1_weight, fc1_bias, value_weight, value_bias, fc2_weight, fc2_bias,
                             residual_scale, row_scale)
    y, _, _ = torch.ops.vitkern.swiglu_fwd(x2, fc1_weight, fc1_bias, value_weight, value_bias, fc2_weight, fc2_bias,
                                           res2, residual_scale, row_scale, save_pre)
    return y.reshape(out_shape)


def swiglu_triton(x, fc1_weight, fc1_bias=None, *, value_weight=None, value_bias=None):
    """The "triton" backend of :func:`vitkern.swiglu` (arguments already checked and cast)."""
    x2, _, out_shape = as_rows(x, None, _hidden(fc1_weight, value_weight))
    save_pre = requires_grad(x, fc1_weight, fc1_bias, value_weight, value_bias)
    y, _, _ = torch.ops.vitkern.swiglu_fwd(x2, fc1_weight, fc1_bias, value_weight, value_bias, None, None, None,
                                           None, None, save_pre)
    return y.reshape(out_shape)
