"""The transformer MLP: ``fc2(act(fc1(x)))`` with the residual epilogue of ``linear`` on fc2.

Public function (re-exported as ``vitkern.mlp``)::

    h = act(x @ fc1_weight.T + fc1_bias)                  # stored in the compute dtype
    y = h @ fc2_weight.T + fc2_bias                       # no residual
    y = residual + row_scale[:, None] * residual_scale * (h @ fc2_weight.T + fc2_bias)

Layers as in :mod:`vitkern.ops.linear`: ``reference.py`` (:func:`mlp_ref`), ``native.py``
(backend "torch": fc1, GELU, fc2 and the epilogue as PyTorch ops in the compute dtype, the
PyTorch-native fast path "auto" measures the kernels against), ``launch.py`` (the
Triton launchers on :mod:`vitkern.ops.gemm`), ``op.py`` (the Triton backend's registered ops and
autograd), ``cuda.py`` (the CUDA extension's backend). Every implementation is called as
``impl(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation=..., residual=...,
residual_scale=..., row_scale=...)`` after the public function's checks and autocast casts
(``activation`` a public name, ``row_scale`` None or flattened to ``(M,)``).
"""

from __future__ import annotations

from typing import Optional

import torch

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
from vitkern.ops.activation import Activation
from vitkern.ops.linear import check_epilogue, check_epilogue_dtypes
from vitkern.ops.mlp import cuda as _cuda
from vitkern.ops.mlp.native import mlp_torch
from vitkern.ops.mlp.op import mlp_triton
from vitkern.ops.mlp.reference import mlp_ref

__all__ = ["mlp", "mlp_ref"]


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
        activation: ``"gelu"`` (erf, default), ``"gelu_tanh"``, ``"quick_gelu"`` or None (identity).
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
    activation = Activation.parse(activation).public_name
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
register_impl("mlp", "torch", mlp_torch)
register_impl("mlp", "triton", mlp_triton)
register_impl("mlp", "cuda", _cuda.mlp_cuda, _cuda._mlp_supports)
