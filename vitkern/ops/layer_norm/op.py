"""The registered LayerNorm ops (``vitkern::layer_norm_fwd``, ``vitkern::add_layer_norm_fwd``,
``vitkern::layer_norm_bwd``: custom ops with fakes), their autograd, and the Triton backend's
implementations with their ``supports`` predicate.

The forward ops save (x or s, weight, mean, rstd); backward is the registered
``vitkern::layer_norm_bwd``. Outputs never alias inputs and no output is Optional: the backward
op returns empty (0,) tensors for the parameter gradients it was not asked for. The launchers are
imported where the ops run, so that importing this module needs no Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._common import kernel_op
from vitkern.ops.layer_norm.configs import MAX_WIDTH


def _stats_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _layer_norm_fwd_fake(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), _stats_fake(x), _stats_fake(x)


def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    s = torch.empty(x.shape, dtype=dtype, device=x.device)
    return y, s, _stats_fake(x), _stats_fake(x)


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, ds, compute_dw, db_dtype):
    n = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_dtype = weight.dtype if weight is not None else x.dtype
    dw = torch.empty((n if compute_dw and weight is not None else 0,), dtype=dw_dtype, device=x.device)
    db = torch.empty((n if db_dtype is not None else 0,), dtype=db_dtype or x.dtype, device=x.device)
    return dx, dw, db


@kernel_op("vitkern::layer_norm_bwd", fake=_layer_norm_bwd_fake)
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ds: Optional[torch.Tensor],
    compute_dw: bool,
    db_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.layer_norm import launch as _launch

    dx, dw, db = _launch._layer_norm_bwd(dy, x, weight, mean, rstd, ds, compute_dw, db_dtype)
    if dw is None:
        dw = torch.empty((0,), dtype=(weight if weight is not None else x).dtype, device=x.device)
    if db is None:
        db = torch.empty((0,), dtype=db_dtype or x.dtype, device=x.device)
    return dx, dw, db


def _param_grads(ctx, dw: torch.Tensor, db: torch.Tensor, w_index: int):
    gw = dw if ctx.needs_input_grad[w_index] else None
    gb = db if ctx.needs_input_grad[w_index + 1] else None
    return gw, gb


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    db_dtype = ctx.bias_dtype if ctx.needs_input_grad[2] else None
    dx, dw, db = torch.ops.vitkern.layer_norm_bwd(dy, x, weight, mean, rstd, None, compute_dw, db_dtype)
    gw, gb = _param_grads(ctx, dw, db, 1)
    return (dx if ctx.needs_input_grad[0] else None), gw, gb, None


@kernel_op(
    "vitkern::layer_norm_fwd",
    fake=_layer_norm_fwd_fake,
    setup_context=_layer_norm_setup,
    backward=_layer_norm_backward,
)
def _layer_norm_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.layer_norm import launch as _launch

    y, _, mean, rstd = _launch._layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, dy, ds, dmean, drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[2]
    db_dtype = ctx.bias_dtype if ctx.needs_input_grad[3] else None
    dsum, dw, db = torch.ops.vitkern.layer_norm_bwd(dy, s, weight, mean, rstd, ds, compute_dw, db_dtype)
    gx = dsum.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    gr = dsum.to(ctx.residual_dtype) if ctx.needs_input_grad[1] else None
    gw, gb = _param_grads(ctx, dw, db, 2)
    return gx, gr, gw, gb, None


@kernel_op(
    "vitkern::add_layer_norm_fwd",
    fake=_add_layer_norm_fwd_fake,
    setup_context=_add_layer_norm_setup,
    backward=_add_layer_norm_backward,
)
def _add_layer_norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.layer_norm import launch as _launch

    return _launch._layer_norm_fwd(x, residual, weight, bias, eps)


# --------------------------------------------------------------------------------------------
# The Triton backend (what register_impl gets: the public arguments after checks and autocast)
# --------------------------------------------------------------------------------------------


def _triton_supports_width(n: int) -> Optional[str]:
    if not 1 <= n <= MAX_WIDTH:
        return f"the Triton LayerNorm kernels take widths 1..{MAX_WIDTH} (x.shape[-1] = {n})"
    return None


def _layer_norm_triton_supports(x, weight=None, bias=None, eps=1e-5) -> Optional[str]:
    return _triton_supports_width(x.shape[-1])


def _add_layer_norm_triton_supports(x, residual, weight=None, bias=None, eps=1e-5) -> Optional[str]:
    return _triton_supports_width(x.shape[-1])


def _layer_norm_triton(x, weight=None, bias=None, eps=1e-5):
    return torch.ops.vitkern.layer_norm_fwd(x, weight, bias, eps)[0]


def _add_layer_norm_triton(x, residual, weight=None, bias=None, eps=1e-5):
    y, s, _, _ = torch.ops.vitkern.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return y, s
