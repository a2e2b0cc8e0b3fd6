"""The "cuda" backend of ``linear``: ``vitkern_cuda::fused_dense_fwd`` / ``fused_dense_bwd`` of the
C++/CUDA extension (schemas and fakes in :mod:`vitkern._extension`, kernels in ``csrc/``).

Forward: bias and the tanh GELU in the cuBLASLt GEMM's epilogue (GELU_AUX_BIAS also stores the
pre-activation for backward); a plain residual through cuBLASLt's C matrix (beta = 1); the exact
erf GELU (``"gelu"``; cuBLASLt's GELU is the tanh approximation and is never substituted for it),
LayerScale, the drop-path row scale and a residual under them in one pass after a BIAS-epilogue
GEMM. Backward: ``dT = g * row_scale * gamma * act'(pre)`` in one pass (none when it is ``g``
itself), ``dX = dT W``, ``dW = dT^T X`` with the BGRADB epilogue producing ``db``. See
:mod:`vitkern.ops.cuda_backend` for the numerics and the unfused fallbacks.

The implementation is registered when this module is imported, whether or not the extension is
built; the autograd formula once the extension loads (:func:`vitkern._extension._on_load`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vitkern import _extension
from vitkern._extension import allow_tf32
from vitkern.ops._autograd import register_autograd, requires_grad
from vitkern.ops.activation import Activation
from vitkern.ops.cuda_backend import activation_reason, scales_reason, tensor_reason
from vitkern.ops.linear.rows import as_rows

__all__ = ["linear_cuda"]


def _linear_supports(x, weight, bias=None, *, activation=None, residual=None, residual_scale=None, row_scale=None):
    return activation_reason(activation) or scales_reason(residual, residual_scale, row_scale) or tensor_reason(
        x=x, weight=weight, bias=bias, residual=residual, residual_scale=residual_scale, row_scale=row_scale
    )


def linear_cuda(x, weight, bias=None, *, activation=None, residual=None, residual_scale=None, row_scale=None):
    """The "cuda" backend of :func:`vitkern.linear` (``vitkern_cuda::fused_dense_fwd``)."""
    x2, res2, out_shape = as_rows(x, residual, weight.shape[0])
    # pre: the pre-activation for act' in backward, or the unscaled branch for the LayerScale /
    # row-scale gradients.
    save_pre = (activation is not None and requires_grad(x, weight, bias, residual_scale, row_scale)) or (
        requires_grad(residual_scale, row_scale)
    )
    out, _ = torch.ops.vitkern_cuda.fused_dense_fwd(
        x2, weight, bias, int(Activation.parse(activation)), res2, residual_scale, row_scale, save_pre, allow_tf32()
    )
    return out.reshape(out_shape)


class _State(NamedTuple):
    activation: int
    allow_tf32: bool  # backward GEMMs at the forward's precision


def _save(inputs, outputs):
    x, weight, _bias, activation, _residual, residual_scale, row_scale, _save_pre, tf32 = inputs
    return (x, weight, residual_scale, row_scale, outputs[1]), _State(activation, tf32)


def _backward(state: _State, saved, grads, need):
    x, weight, residual_scale, row_scale, pre = saved
    grad = grads[0]
    dx = dw = db = dscale = drs = None
    if any(need[i] for i in (0, 1, 2, 5, 6)):  # not the residual's alone
        dx, dw, db, dscale, drs = torch.ops.vitkern_cuda.fused_dense_bwd(
            grad, x, weight, residual_scale, row_scale, pre, state.activation,
            need[0], need[1], need[2], need[5], need[6], state.allow_tf32,
        )
    return dx, dw, db, None, grad, dscale, drs, None, None


_extension._on_load(lambda: register_autograd("vitkern_cuda::fused_dense_fwd", save=_save, backward=_backward))
