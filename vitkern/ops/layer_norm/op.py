"""The registered LayerNorm ops (``vitkern::layer_norm_fwd``, ``vitkern::add_layer_norm_fwd``,
``vitkern::layer_norm_bwd``: custom ops with fakes), their autograd, and the Triton backend's
implementations with their ``supports`` predicate.

The forward ops take ``out_dtype`` (None: y in the rows' dtype) and save (x or s, weight, mean,
rstd); the backward reads dy in whatever dtype y had. Backward is the registered
``vitkern::layer_norm_bwd``. Outputs never alias inputs and no output is Optional: the backward
op returns empty (0,) tensors for the parameter gradients it was not asked for. The launchers are
imported where the ops run, so that importing this module needs no Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._autograd import kernel_op
from vitkern.ops.layer_norm.configs import MAX_WIDTH


def _stats_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _layer_norm_fwd_fake(x, weight, bias, eps, out_dtype=None):
    return torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device), _stats_fake(x), _stats_fake(x)


def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps, out_dtype=None):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=out_dtype or dtype, device=x.device)
    s = torch.empty(x.shape, dtype=dtype, device=x.device)
    return y, s, _stats_fake(x), _stats_fake(x)


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, ds, compute_dw, db_dtype, dx_low_dtype):
    n = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_dtype = weight.dtype if weight is not None else x.dtype
    dw = torch.empty((n if compute_dw and weight is not None else 0,), dtype=dw_dtype, device=x.device)
    db = torch.empty((n if db_dtype is not None else 0,), dtype=db_dtype or x.dtype, device=x.device)
    dx_low = torch.empty(x.shape if dx_low_dtype is not None else (0,), dtype=dx_low_dtype or x.dtype,
                         device=x.device)
    return dx, dw, db, dx_low


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
    dx_low_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.layer_norm import launch as _launch

    dx, dw, db, dx_low = _launch._layer_norm_bwd(dy, x, weight, mean, rstd, ds, compute_dw, db_dtype, dx_low_dtype)
    if dw is None:
        dw = torch.empty((0,), dtype=(weight if weight is not None else x).dtype, device=x.device)
    if db is None:
        db = torch.empty((0,), dtype=db_dtype or x.dtype, device=x.device)
    if dx_low is None:
        dx_low = torch.empty((0,), dtype=x.dtype, device=x.device)
    return dx, dw, db, dx_low


def _layer_norm_save(inputs, output):
    x, weight, bias, _eps, _out_dtype = inputs
    _, mean, rstd = output
    return (x, weight, mean, rstd), (bias.dtype if bias is not None else None)


def _layer_norm_backward(bias_dtype, saved, grads, need):
    x, weight, mean, rstd = saved
    dy = grads[0]
    dx, dw, db, _ = torch.ops.vitkern.layer_norm_bwd(dy, x, weight, mean, rstd, None, need[1],
                                                     bias_dtype if need[2] else None, None)
    return dx, dw, db, None, None


@kernel_op(
    "vitkern::layer_norm_fwd",
    fake=_layer_norm_fwd_fake,
    save=_layer_norm_save,
    backward=_layer_norm_backward,
    non_differentiable=(1, 2),
)
def _layer_norm_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.layer_norm import launch as _launch

    y, _, mean, rstd = _launch._layer_norm_fwd(x, None, weight, bias, eps, out_dtype)
    return y, mean, rstd


def _add_layer_norm_save(inputs, output):
    x, residual, weight, bias, _eps, _out_dtype = inputs
    _, s, mean, rstd = output
    return (s, weight, mean, rstd), (x.dtype, residual.dtype, bias.dtype if bias is not None else None)


def _add_layer_norm_backward(state, saved, grads, need):
    x_dtype, residual_dtype, bias_dtype = state
    s, weight, mean, rstd = saved
    dy, ds = grads[0], grads[1]
    # the gradient of the sum, in s's dtype and, when one input is narrower (a 16-bit branch on
    # a float32 residual stream), in that input's dtype too, from the same pass: the branch's GEMM
    # backward reads 16 bits and no cast pass runs
    low = next((d for d, n in ((x_dtype, need[0]), (residual_dtype, need[1])) if n and d != s.dtype), None)
    dsum, dw, db, dsum_low = torch.ops.vitkern.layer_norm_bwd(dy, s, weight, mean, rstd, ds, need[2],
                                                              bias_dtype if need[3] else None, low)

    def grad_in(dtype):
        return dsum_low if dtype == low else dsum.to(dtype)

    gx = grad_in(x_dtype) if need[0] else None
    gr = grad_in(residual_dtype) if need[1] else None
    return gx, gr, dw, db, None, None


@kernel_op(
    "vitkern::add_layer_norm_fwd",
    fake=_add_layer_norm_fwd_fake,
    save=_add_layer_norm_save,
    backward=_add_layer_norm_backward,
    non_differentiable=(2, 3),
)
def _add_layer_norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.layer_norm import launch as _launch

    return _launch._layer_norm_fwd(x, residual, weight, bias, eps, out_dtype)


# --------------------------------------------------------------------------------------------
# The Triton backend (what register_impl gets: the public arguments after checks and autocast)
# --------------------------------------------------------------------------------------------


def _triton_supports_width(n: int) -> Optional[str]:
    if not 1 <= n <= MAX_WIDTH:
        return f"the Triton LayerNorm kernels take widths 1..{MAX_WIDTH} (x.shape[-1] = {n})"
    return None


def _layer_norm_triton_supports(x, weight=None, bias=None, eps=1e-5, out_dtype=None) -> Optional[str]:
    return _triton_supports_width(x.shape[-1])


def _add_layer_norm_triton_supports(x, residual, weight=None, bias=None, eps=1e-5, out_dtype=None) -> Optional[str]:
    return _triton_supports_width(x.shape[-1])


def _layer_norm_triton(x, weight=None, bias=None, eps=1e-5, out_dtype=None):
    return torch.ops.vitkern.layer_norm_fwd(x, weight, bias, eps, out_dtype)[0]


def _add_layer_norm_triton(x, residual, weight=None, bias=None, eps=1e-5, out_dtype=None):
    y, s, _, _ = torch.ops.vitkern.add_layer_norm_fwd(x, residual, weight, bias, eps, out_dtype)
    return y, s
