"""The "cuda" backend of ``mlp``: ``vitkern_cuda::mlp_fwd`` / ``mlp_bwd`` of the C++/CUDA extension
(schemas and fakes in :mod:`vitkern._extension`, kernels in ``csrc/``).

Forward: fc1 and fc2 as ``linear``'s "cuda" backend (:mod:`vitkern.ops.linear.cuda`). Backward
computes the hidden gradient with the DGELU_BGRAD epilogue (GELU derivative and ``db1`` inside
fc2's dX GEMM) for ``"gelu_tanh"``, with a plain GEMM and the exact erf derivative in one pass for
``"gelu"``. See :mod:`vitkern.ops.cuda_backend` for the numerics and the unfused fallbacks.

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

__all__ = ["mlp_cuda"]


def _mlp_supports(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, activation="gelu", residual=None,
                  residual_scale=None, row_scale=None):
    return activation_reason(activation) or scales_reason(residual, residual_scale, row_scale) or tensor_reason(
        x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
        residual=residual, residual_scale=residual_scale, row_scale=row_scale,
    )


def mlp_cuda(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, activation="gelu", residual=None,
             residual_scale=None, row_scale=None):
    """The "cuda" backend of :func:`vitkern.mlp` (``vitkern_cuda::mlp_fwd``)."""
    x2, res2, out_shape = as_rows(x, residual, fc2_weight.shape[0])
    save_pre = activation is not None and requires_grad(x, fc1_weight, fc1_bias)
    save_branch = requires_grad(residual_scale, row_scale)
    out, _, _, _ = torch.ops.vitkern_cuda.mlp_fwd(
        x2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, int(Activation.parse(activation)), res2, residual_scale,
        row_scale, save_pre, save_branch, allow_tf32(),
    )
    return out.reshape(out_shape)


class _State(NamedTuple):
    activation: int
    allow_tf32: bool  # backward GEMMs at the forward's precision


def _save(inputs, outputs):
    x, w1, _b1, w2, _b2, activation, _residual, residual_scale, row_scale, _save_pre, _save_branch, tf32 = inputs
    _, pre, h, branch = outputs
    return (x, w1, w2, residual_scale, row_scale, pre, h, branch), _State(activation, tf32)


def _backward(state: _State, saved, grads, need):
    x, w1, w2, residual_scale, row_scale, pre, h, branch = saved
    grad = grads[0]
    flags = (need[0], need[1], need[2], need[3], need[4], need[7], need[8])
    outs = (None,) * 7
    if any(flags):  # not the residual's alone
        outs = torch.ops.vitkern_cuda.mlp_bwd(
            grad, x, w1, w2, residual_scale, row_scale, pre, h, branch, state.activation, *flags, state.allow_tf32
        )
    dx, dw1, db1, dw2, db2, dscale, drs = outs
    return dx, dw1, db1, dw2, db2, None, grad, dscale, drs, None, None, None


_extension._on_load(lambda: register_autograd("vitkern_cuda::mlp_fwd", save=_save, backward=_backward))
